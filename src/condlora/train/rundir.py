"""The run directory: a fresh run never writes over another one, and a resumed run tidies what a kill left.

A run directory holds only what condlora writes there (`RUN_ENTRIES`): config.json, metrics.csv,
checkpoints/, base.safetensors (a frozen base the run initialised), samples/, the final samples.png / .npz,
figures/ and the outputs of `condlora sample`.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import os
import shutil
from pathlib import Path

RUN_ENTRIES = (
    "config.json",
    "metrics.csv",
    "checkpoints",
    "samples",
    "samples.png",
    "samples.npz",
    "figures",
    "samples-step*",
    ".config.json.tmp-*",
    ".metrics.csv.tmp-*",
    "base.safetensors",
    ".base.safetensors.tmp-*",
)


class RunDirectoryError(ValueError):
    """The output directory cannot take a fresh run (it holds another one, or files condlora did not write)."""


def _is_run_entry(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_ENTRIES)


def check_fresh_run_dir(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse to start a fresh run in `out_dir` unless it is new or empty, or `overwrite` is set and it holds
    only files condlora writes. Touches nothing."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise RunDirectoryError(f"output directory {out_dir} exists and is not a directory")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    if not overwrite:
        what = "already holds a run" if "config.json" in entries or "checkpoints" in entries else "is not empty"
        raise RunDirectoryError(
            f"{out_dir} {what} ({shown}); nothing was changed. Continue that run with "
            f"`condlora train --resume {out_dir}`, replace it with --overwrite (deletes it), "
            "or choose another --train.out_dir"
        )
    foreign = [name for name in entries if not _is_run_entry(name)]
    if foreign:
        raise RunDirectoryError(
            f"--overwrite would delete the run in {out_dir}, but it also holds files condlora did not write "
            f"({', '.join(foreign[:6])}); nothing was changed. Move them away or choose another --train.out_dir"
        )


def clear_run_dir(out_dir: Path) -> None:
    """Delete an earlier run's files from `out_dir` (after `check_fresh_run_dir(out_dir, overwrite=True)`)."""
    if not out_dir.is_dir():
        return
    for entry in out_dir.iterdir():
        if not _is_run_entry(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def trim_metrics(path: Path, last_step: int) -> int:
    """Drop the rows of metrics.csv after `last_step` (a resumed run writes those steps again), atomically.

    Returns the number of rows dropped.
    """
    if not path.is_file():
        return 0
    rows = list(csv.reader(io.StringIO(path.read_text())))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    kept = [row for row in body if row and int(row[0]) <= last_step]
    if len(kept) == len(body):
        return 0
    out = io.StringIO()
    csv.writer(out).writerows([header, *kept])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(out.getvalue())
    os.replace(tmp, path)
    return len(body) - len(kept)
