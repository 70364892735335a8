"""Export a predictions folder as subtitles or JSONL (jobs.transcripts).

    python -m jobs.export --predictions URL --format srt|vtt|jsonl --output URL [--storage-options JSON]

srt / vtt: OUTPUT/CORPUS/ID.srt (or .vtt), cues cut at the item's word times (two lines of about 42
characters, 7 s at most, a new cue at a pause, a full cue ended at a clause), else a cue a piece of its
`segments`; ID is the item's id percent-encoded (`/` as %2F, so `a/b` and `a_b` never share a file; `urllib.parse.unquote` gives it back),
a WebVTT file names it in a NOTE too; items with an error or no text are skipped and counted, and so is a
repeated id. jsonl: OUTPUT/CORPUS.jsonl, a line an item (id, text, segments, language, words, error, ...).
"""

from __future__ import annotations

import argparse
import sys

from jobs.command_line import add_storage_options_argument, module_entry, storage_options
from jobs.transcripts import FORMATS, export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="the job's output URL, one corpus folder, or one part file")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="folder URL the files go to")
    add_storage_options_argument(parser)
    args = parser.parse_args(argv)
    counts = export(args.predictions, args.output, args.format,
                    storage_options(args.storage_options, [args.predictions, args.output]))
    print(f"{counts['written']} items written to {args.output}"
          + (f", {counts['skipped']} skipped (an error or no text)" if counts["skipped"] else "")
          + (f", {counts['duplicates']} skipped (an id written before: run `jobs.manifest validate`)"
             if counts["duplicates"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(module_entry(main))
