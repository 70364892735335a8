"""Manifests from the command line: validate one, build tar shards and a manifest from a folder of audio, or
import the seed's annotation JSON (jobs.corpus.manifest_schema does the work).

Usage:
  python -m jobs.manifest validate MANIFEST
  python -m jobs.manifest build --audio-dir DIR [--references FILE] --name NAME --task TASK --out URL_PREFIX
  python -m jobs.manifest import-seed SEED.json --name NAME --out MANIFEST.yaml [--audio-root DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from jobs.command_line import add_storage_options_argument, module_entry, storage_options
from jobs.corpus.make import build_shards, import_seed
from jobs.corpus.manifest_schema import Manifest, check_item_tasks, load_manifest


def summarize(manifest: Manifest, items: pa.Table) -> dict[str, Any]:
    return {
        "name": manifest.name,
        "source": manifest.items or manifest.shards,
        "items": items.num_rows,
        "shards": pc.count_distinct(items.column("shard")).as_py(),
        "errors": dict(Counter(code for code in items.column("error").to_pylist() if code)),
        "tasks": dict(Counter(items.column("task").to_pylist())),
        "with_reference": items.num_rows - items.column("reference").null_count,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    options = storage_options(args.storage_options, _urls(args))
    if args.command == "validate":
        manifest = load_manifest(args.manifest, options)
        items = manifest.work_items()
        check_item_tasks(items, where=f"{args.manifest}: ")
        print(json.dumps(summarize(manifest, items), indent=2))
    elif args.command == "build":
        references = None if args.references in (None, "none", "NONE") else args.references
        print(build_shards(args.audio_dir, references, args.name, args.task, args.out, args.items_per_shard, options))
    else:
        print(import_seed(args.seed, args.name, args.out, args.audio_root, options))
    return 0


def _urls(args: argparse.Namespace) -> list[str | None]:
    """The URLs the subcommand was given, whose filesystems the storage options must suit."""
    if args.command == "validate":
        return [args.manifest]
    if args.command == "build":
        return [args.out, args.references]
    return [args.seed, args.out, args.audio_root]


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_storage_options_argument(common)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", parents=[common], help="enumerate a manifest, print a JSON summary")
    validate.add_argument("manifest", help="the manifest (YAML), path or URL")
    build = commands.add_parser("build", parents=[common], help="pack a folder of audio into tar shards and a manifest")
    build.add_argument("--audio-dir", type=Path, required=True, help="local folder of audio files (searched recursively)")
    build.add_argument("--references", help="a .tsv or .jsonl file; `none` (default): <stem>.txt beside each file")
    build.add_argument("--name", required=True, help="the corpus name (the manifest's `name`, the output's folder)")
    build.add_argument("--task", required=True, help="the corpus's task: asr (speech recognition), aac (audio captioning)")
    build.add_argument("--out", required=True, metavar="URL_PREFIX", help="writes URL_PREFIX-00000.tar, ... and .yaml")
    build.add_argument("--items-per-shard", type=int, default=1000, help="items per tar shard (default: 1000)")
    seed = commands.add_parser("import-seed", parents=[common], help="import a seed annotation or test-list JSON")
    seed.add_argument("seed", metavar="FILE", help="the seed's annotation or test-list JSON, path or URL")
    seed.add_argument("--name", required=True, help="the corpus name")
    seed.add_argument("--out", required=True, metavar="MANIFEST.yaml", help="the manifest to write, path or URL")
    seed.add_argument("--audio-root", help="directory or URL the seed's relative paths are under (default: the file's)")
    return parser


if __name__ == "__main__":
    sys.exit(module_entry(main))
