"""The `nota-batch` command: one subcommand per job, each the `main` of its `python -m jobs.X` module.

Exit codes, the same under `python -m jobs.X` (jobs.command_line):
    0    done
    1    items failed (`infer --strict`)
    2    a usage, config, manifest or output-mismatch error: one line on stderr saying what to do; the traceback
         with `--debug` (anywhere on the line; `NOTA_DEBUG=1` under `python -m` too), else only in the debug log
    130  interrupted (Ctrl-C, SIGTERM)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from jobs.command_line import run_command, without_debug_flag

# The one list of commands: name -> (module whose `main` runs it, one line of help).
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


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options before the command, and the command's own arguments (left whole for its `main`)."""
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    return _parser().parse_args(argv[:at + 1]), argv[at + 1:]


def _parser() -> argparse.ArgumentParser:
    usage = f"nota-batch [--debug] {{{','.join(COMMANDS)}}} [ARGS...]\n       nota-batch --version"
    epilog = ("commands:\n" + "\n".join(f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items())
              + "\n\n`nota-batch COMMAND --help` shows a command's arguments.")
    parser = argparse.ArgumentParser(prog="nota-batch", usage=usage, description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nota-batch {_version()}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (anywhere on the line)")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, debug = without_debug_flag(sys.argv[1:] if argv is None else argv)
    args, rest = parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    program, sys.argv[0] = sys.argv[0], f"nota-batch {args.command}"  # the command's usage line names it so
    try:
        return run_command(module.main, rest, name=args.command, debug=debug)
    finally:
        sys.argv[0] = program


def _version() -> str:
    try:
        return version("nota-batch")
    except PackageNotFoundError:
        return "(not installed: pip install -e .)"


if __name__ == "__main__":
    sys.exit(main())
