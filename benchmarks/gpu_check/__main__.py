"""`python -m benchmarks.gpu_check`: the command line (the package's docstring says what it does)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchmarks.gpu_check as package
from benchmarks.gpu_check.context import Context
from benchmarks.gpu_check.runner import STEPS, check, run_step
from benchmarks.gpu_wheels import install


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, logs")
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU, run anyway (needs --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: tiny model, small batches, few steps")
    parser.add_argument("--step", choices=[step.name for step in STEPS], help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--device", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.step:
        return run_step(args.step, Context(out, args.device, args.quick))

    import torch

    if not torch.cuda.is_available():
        if not (args.allow_cpu and args.quick):
            print(f"gpu_check: NO GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device, "
                  "so nothing was measured. On a GPU machine install torch's CUDA build (README, GPU install); "
                  "to test this script on CPU pass --allow-cpu --quick.", file=sys.stderr)
            return 2
        print("gpu_check: no GPU: running the quick CPU mode (--allow-cpu --quick); its numbers say nothing about GPUs",
              flush=True)
    wheels = install()
    print(f"gpu_check: wheels: {wheels}", flush=True)
    report = check(Context(out, "cuda" if torch.cuda.is_available() else "cpu", args.quick), wheels)
    print(f"gpu_check: report in {out / 'gpu_check.md'}; the report:", flush=True)
    print(json.dumps(report, default=str), flush=True)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
