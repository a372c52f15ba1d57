"""Every benchmark of condlora on one device, summarised as a Markdown table.

    python benchmarks/run_all.py [--device cpu|cuda] [--out benchmarks/results-<device>.md] [--quick]

Runs lora_overhead.py (the nano U-Net), paper_overhead.py for EDM and IDDPM, sampling_throughput.py,
autolora_overhead.py and op_count.py in turn, each in its own process, keeps every "ratio ..." and
"... images/s" line they print, and writes them with the device line and the date. `--quick` narrows the
papers' networks to 32 channels and small batches (for a laptop CPU); without it the paper figures use the
CIFAR-10 width at batch 64 and 128, and sampling throughput runs at batch 512 with the CIFAR-10 presets
added.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _jobs(device: str, quick: bool) -> list[tuple[str, list[str]]]:
    narrow = ["--model-channels", "32", "--batch", "16", "32", "--repeats", "5"] if quick else []
    throughput = ["--batch", "100"] if quick else ["--batch", "512", "--paper"]
    return [
        ("nano U-Net, TimeLoRA + ClassLoRA", ["lora_overhead.py", "--device", device]),
        ("EDM DDPM++, UC-LoRA", ["paper_overhead.py", "--family", "edm", "--device", device, *narrow]),
        ("IDDPM, TimeLoRA + ClassLoRA", ["paper_overhead.py", "--family", "iddpm", "--device", device, *narrow]),
        ("sampling throughput", ["sampling_throughput.py", "--device", device, *throughput]),
        ("AutoLoRA guidance", ["autolora_overhead.py", "--device", device]),
        ("operations LoRA adds (device-independent)", ["op_count.py"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", help="the Markdown file (default: benchmarks/results-<device>.md)")
    parser.add_argument("--quick", action="store_true", help="narrow networks and small batches (laptop CPU)")
    args = parser.parse_args()
    out = Path(args.out or HERE / f"results-{args.device.replace(':', '')}.md")
    lines = [f"# condlora benchmarks, {datetime.date.today().isoformat()}", ""]
    for title, command in _jobs(args.device, args.quick):
        print(f"== {title}: {' '.join(command)}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{command[0]} failed:\n{done.stderr[-2000:]}")
        printed = done.stdout.splitlines()
        print(done.stdout, flush=True)
        kept = [line for line in printed if line.startswith("ratio ") or line.endswith("images/s")]
        lines += [f"## {title}", "", f"`python benchmarks/{' '.join(command)}`, {printed[0]}", ""]
        lines += ["| measurement |", "|---|", *[f"| `{' '.join(line.split())}` |" for line in kept], ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
