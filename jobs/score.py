"""Score stored predictions: quality and speed per (corpus, task, model), as Parquet, JSON and a report.

    python -m jobs.score --predictions URL [--references MANIFEST_OR_URL] --output URL
                         [--spice-lib DIR] [--submission URL] [--storage-options JSON]

Reads only the job's Parquet, with Ray Data on the cluster (`RAY_ADDRESS`, else a local Ray) where
the input is large, in this process where it is small (jobs.scoring: the same stages either way).
Items with an `error` are counted and left out of quality metrics.
- speech recognition (`asr`): corpus WER after the Whisper English normalizer, S/D/I, CER (jiwer);
- captioning (`aac`): CIDEr-D, SPICE, SPIDEr, METEOR, BLEU-1..4, ROUGE-L (pycocoevalcap, PTB tokenizer);
- speed: items/s, audio seconds per wall second, output tokens/s, ttft/tpot percentiles, per worker too.

Writes under --output: `metrics.parquet` (long format, METRICS_SCHEMA), `items.parquet` (a folder of
Parquet files, one row an item: jobs.scoring.item_scores.items_schema), `metrics.json` (with each
group's error analysis), `report.md` (with the error analysis: worst items, frequent word edits, WER by
duration, error codes) and its charts. `--references` (a manifest, or a JSONL/Parquet of `id`, `reference` and maybe `corpus`)
replaces the rows' references: read as an Arrow table (on the cluster by a Ray task, so the driver
holds only its ObjectRef) and joined to each block on (corpus, id), else on id alone
(jobs.scoring.references). `--submission` writes the seed's submission CSV (`testset_id,text`) per corpus there.
"""

from __future__ import annotations

import argparse
import sys

from jobs.command_line import add_storage_options_argument, module_entry, storage_options


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--references", help="a corpus manifest, or a JSONL/Parquet of id and reference, replacing the rows' references")
    parser.add_argument("--spice-lib", help="folder with the Stanford CoreNLP 3.6.0 jars SPICE needs (default: $NOTA_SPICE_LIB)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="the job's output URL, one corpus folder, or one part file")
    parser.add_argument("--output", required=True, help="where metrics.parquet, metrics.json and report.md go")
    parser.add_argument("--submission", help="write the seed's submission CSV per corpus (CORPUS.csv) under this URL")
    add_storage_options_argument(parser)
    add_scoring_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = storage_options(args.storage_options, [args.predictions, args.output, args.references, args.submission])
    from jobs.scoring import report  # Ray and the scorer load once the arguments are known good
    from jobs.scoring.scorer import score

    groups = score(args.predictions, args.output, args.references, args.spice_lib, args.submission, options)
    print(report.summary(groups))
    return 0


if __name__ == "__main__":
    sys.exit(module_entry(main))
