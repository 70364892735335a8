"""The `nota-batch` command: one subcommand per job, each the `main` of its `python -m jobs.X` module.

    nota-batch [--debug] {infer,score,rescore,manifest,train,bench,packs,samples} [ARGS...]
    nota-batch --version

Exit codes, the same under `python -m jobs.X`:
    0  done
    1  items failed (`infer --strict`)
    2  a usage, config, manifest or output-mismatch error: one line on stderr saying what to do; the traceback
       with `--debug` (`NOTA_DEBUG=1` under `python -m`), else only in the debug log
  130  interrupted (Ctrl-C): `interrupted`, or the command's own line (`infer`: the items kept, run it again to resume)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from nota_model.errors import NotaError

USAGE_ERROR = 2
INTERRUPTED = 130
COMMANDS = {
    "infer": ("jobs.infer", "run a model over a corpus on Ray Data, one Parquet row per item; score it"),
    "score": ("jobs.score", "score stored predictions: metrics, report, submission CSVs"),
    "rescore": ("jobs.rescore", "score several runs with the same code and compare them"),
    "manifest": ("jobs.manifest", "validate a manifest, build tar shards, import the seed's files"),
    "train": ("jobs.train", "train or fine-tune the NOTA model on Ray Train"),
    "bench": ("jobs.bench", "time a model: TTFT, TPOT, memory per batch size"),
    "packs": ("jobs.packs", "build the model packs (converted weights) into the cache"),
    "samples": ("jobs.samples", "fetch the sample audio and write its item lists"),
    "export": ("jobs.export", "write stored predictions as SRT or WebVTT subtitles, or JSONL"),
    "synthesize": ("jobs.synthesize", "build the synthetic speech corpus NOTA-small trains on"),
}

Main = Callable[[list[str] | None], int | None]


def run_command(main: Main, argv: list[str] | None = None, name: str | None = None, debug: bool = False) -> int:
    """Run a job's `main` and turn what it raises on purpose (a NotaError: bad usage, config, manifest, a
    mismatched output) into one line on stderr and exit code 2, and Ctrl-C into one line and exit code 130."""
    prefix = f"nota-batch {name}" if name else os.path.basename(sys.argv[0])
    try:
        return main(argv) or 0
    except NotaError as err:
        logging.getLogger("nota").debug("%s failed", prefix, exc_info=True)
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: {err}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    except KeyboardInterrupt as interrupt:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: {str(interrupt) or 'interrupted'}", file=sys.stderr, flush=True)  # a command may say more
        return INTERRUPTED


def module_entry(main: Main) -> int:
    """What `python -m jobs.X` runs: `main` with the command line's arguments and the exit codes above."""
    return run_command(main, None, debug=os.environ.get("NOTA_DEBUG", "") not in ("", "0"))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The options before the command, and the command's own arguments (left whole for its `main`)."""
    argv = sys.argv[1:] if argv is None else argv
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    parser = argparse.ArgumentParser(prog="nota-batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="commands:\n" + "\n".join(f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items())
                                     + "\n\n`nota-batch COMMAND --help` shows a command's arguments.")
    parser.add_argument("--version", action="version", version=f"nota-batch {_version()}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND")
    return parser.parse_args(argv[:at + 1]), argv[at + 1:]


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    program, sys.argv[0] = sys.argv[0], f"nota-batch {args.command}"  # the command's usage line names it so
    try:
        return run_command(module.main, rest, name=args.command, debug=args.debug)
    finally:
        sys.argv[0] = program


def _version() -> str:
    try:
        return version("nota-batch")
    except PackageNotFoundError:
        return "(not installed: pip install -e .)"


if __name__ == "__main__":
    sys.exit(main())
