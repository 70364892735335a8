"""Build the synthetic speech-recognition training corpus (`jobs.corpus.synthetic_speech`) once, into the cache.

    python -m jobs.synthesize [--dest DIR] [--train-items 10000] [--train-parts 1] [--perturb speed,vtlp]
                              [--held-out-items 400] [--seed 0] [--workers 2]

Needs Debian's synthesisers and texts: apt-get install espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k
festvox-us-slt-hts wordnet-base wamerican. `--train-parts K` builds the training split in K parts of `--train-items`
each (`train`, `train-2`, ...; manifests `manifests/synthetic-speech-train*.yaml`). `--perturb speed,vtlp` (or
`speed`, or `vtlp`) builds the last part K perturbed, as `train-K-speed-vtlp` in place of `train-K`: the same texts,
voices and augmentation as `train-K` (its perturbed twin), other ids, each item's speech speed-perturbed (x 0.9,
1.0 or 1.1, tempo and pitch) and vocal-tract-length warped (alpha in [0.9, 1.1]) before its augmentation, the
factors in `train-K-speed-vtlp-items.jsonl`; the parts before K and held-out are as without it (`--train-parts 2
--perturb speed,vtlp`: train-2's twin, manifests/synthetic-speech-train-2-speed-vtlp.yaml). Idempotent and
resumable: a split whose manifest exists is kept, and a killed build continues with the items it has not rendered.
Prints the manifests as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.command_line import module_entry
from jobs.corpus.synthetic_speech import build
from jobs.corpus.voices import PERTURBATIONS
from jobs.samples import default_dest, fetch_cards, fetch_librivox
from nota_model.storage import cache_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=cache_dir() / "corpora" / "synthetic-speech")
    parser.add_argument("--train-items", type=int, default=10000)
    parser.add_argument("--train-parts", type=int, default=1, help="more training parts: train-2, train-3, ...")
    parser.add_argument("--perturb", default="",
                        help=f"the last training part perturbed by some of: {','.join(PERTURBATIONS)}")
    parser.add_argument("--held-out-items", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.train_parts < 1:
        parser.error("--train-parts: give 1 or more")
    perturb = tuple(kind.strip() for kind in args.perturb.split(",") if kind.strip())
    if set(perturb) - set(PERTURBATIONS):
        parser.error(f"--perturb: give some of {','.join(PERTURBATIONS)}, comma-separated, not {args.perturb!r}")
    samples = default_dest()
    evaluation = [json.loads(line)["reference"] for fetch in (fetch_librivox, fetch_cards)
                  for line in fetch(samples).read_text().splitlines()]
    manifests = build(args.dest, args.train_items, args.held_out_items, args.seed, evaluation, args.workers,
                      args.train_parts, perturb)
    print(json.dumps({split: str(path) for split, path in manifests.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(module_entry(main))
