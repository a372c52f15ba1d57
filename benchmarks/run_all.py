"""Every benchmark of condlora on one device, summarised as a Markdown table.

    python benchmarks/run_all.py [--device cpu|cuda] [--out benchmarks/results-<device>.md] [--quick]
                                 [--compile MODE] [--budget SECONDS]

Runs lora_overhead.py (the nano U-Net), paper_overhead.py for EDM and IDDPM, sampling_throughput.py,
autolora_overhead.py and op_count.py in turn, each in its own process, keeps every "ratio ..." and
"... images/s" line they print, and writes them with the device line and the date. `--quick` narrows the
papers' networks to 32 channels and small batches (for a laptop CPU); without it the paper figures use the
CIFAR-10 width at batch 64 and 128, and sampling throughput runs at batch 512 with the CIFAR-10 presets
added. `--compile MODE` adds the LoRA overhead benchmarks with both networks compiled (e.g.
reduce-overhead, CUDA graphs on a GPU), right after the eager ones. `--budget` bounds the whole run: a job
still running when the seconds are spent is stopped, what it had measured is kept (every script prints
each ratio as soon as it has it) and the jobs after it are listed as not run. A job that fails is
recorded with the end of its error and the others still run (the exit status says so at the end). The
Markdown file is rewritten after every job, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def _jobs(device: str, quick: bool, compile_mode: str) -> list[tuple[str, list[str]]]:
    narrow = ["--model-channels", "32", "--batch", "16", "32", "--repeats", "5"] if quick else []
    throughput = ["--batch", "100"] if quick else ["--batch", "512", "--paper"]
    overheads = [
        ("nano U-Net, TimeLoRA + ClassLoRA", ["lora_overhead.py", "--device", device]),
        ("EDM DDPM++, UC-LoRA", ["paper_overhead.py", "--family", "edm", "--device", device, *narrow]),
        ("IDDPM, TimeLoRA + ClassLoRA", ["paper_overhead.py", "--family", "iddpm", "--device", device, *narrow]),
    ]
    compiled = [
        (f"{title}, compiled {compile_mode}", [*command, "--compile", compile_mode]) for title, command in overheads
    ]
    return [
        *overheads,
        *(compiled if compile_mode else []),
        ("sampling throughput", ["sampling_throughput.py", "--device", device, *throughput]),
        ("AutoLoRA guidance", ["autolora_overhead.py", "--device", device]),
        ("operations, bytes and FLOPs LoRA adds (device-independent)", ["op_count.py"]),
    ]


def _run(command: list[str], seconds: float | None) -> tuple[list[str], str]:
    """The lines a job printed, and why it ended early ("" if it finished): stopped when `seconds` ran out
    (with every process it started: compile workers too), or failed (with the end of its error)."""
    argv = [sys.executable, "-u", str(HERE / command[0]), *command[1:]]  # -u: nothing printed is held back
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, _ = job.communicate()
        return stdout.decode(errors="replace").splitlines(), f"stopped after {seconds:.0f} s, the rest of the budget"
    printed = stdout.decode(errors="replace").splitlines()
    if job.returncode:
        error = [line.strip() for line in stderr.decode(errors="replace").strip().splitlines()[-3:]]
        return printed, f"failed with exit status {job.returncode}: {' / '.join(error)}"
    return printed, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", help="the Markdown file (default: benchmarks/results-<device>.md)")
    parser.add_argument("--quick", action="store_true", help="narrow networks and small batches (laptop CPU)")
    parser.add_argument("--compile", default="", help="also run the overhead benchmarks compiled in this mode")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds for the whole run (default: no limit)")
    args = parser.parse_args()
    out = Path(args.out or HERE / f"results-{args.device.replace(':', '')}.md")
    lines = [f"# condlora benchmarks, {datetime.date.today().isoformat()}", ""]
    deadline = time.monotonic() + args.budget if args.budget else None
    failed = []
    for title, command in _jobs(args.device, args.quick, args.compile):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            lines += [f"## {title}", "", f"`python benchmarks/{' '.join(command)}`: not run, the budget was spent", ""]
            continue
        print(f"== {title}: {' '.join(command)}", flush=True)
        printed, stopped = _run(command, left)
        print("\n".join(printed), f"({stopped})" if stopped else "", flush=True)
        # a job ended early keeps its timings too: they are all there is of a measurement it did not finish
        kept = [line for line in printed[1:] if stopped or line.startswith("ratio ") or line.endswith("images/s")]
        kept = kept or ["nothing measured"]
        failed += [title] if stopped.startswith("failed") else []
        head = printed[0] if printed else "nothing printed"
        lines += [
            f"## {title}",
            "",
            f"`python benchmarks/{' '.join(command)}`, {head}" + (f" ({stopped})" if stopped else ""),
            "",
        ]
        lines += ["| measurement |", "|---|", *[f"| `{' '.join(line.split())}` |" for line in kept], ""]
        out.write_text("\n".join(lines))
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (the table says why)")


if __name__ == "__main__":
    main()
