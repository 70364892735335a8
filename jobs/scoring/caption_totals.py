"""Stage 4: captioning quality per block: each item's CIDEr-D with the whole group's document
frequencies (frequencies.py), METEOR's per-item statistics and SPICE's per-item F-scores; summed, then
the corpus METEOR."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial, reduce
from typing import Any

import pyarrow as pa
import ray

from jobs.metrics.captions import CaptionScores, Ngram, cider_d_items, combine, meteor_from_statistics, meteor_statistics, spice_f_scores
from jobs.scoring.frequencies import DocumentFrequencies
from jobs.scoring.items import GROUP_KEYS
from jobs.scoring.merged import merge_by_key
from jobs.scoring.totals import split


@dataclass
class CaptionTotals:
    items: int = 0
    cider_d: float = 0.0  # sum over the items
    meteor_statistics: list[str] = field(default_factory=list)
    meteor_failure: str | None = None
    spice: float = 0.0  # sum of F-scores (NaN where one has none, as the mean would be)
    spice_failure: str | None = None

    @classmethod
    def of(cls, items: pa.Table, frequencies: Callable[[set[Ngram]], dict[Ngram, float]], corpus_items: int,
           spice_lib: str | None) -> CaptionTotals:
        """`frequencies` looks up the group's document frequencies of n-grams; `corpus_items`: the group's size."""
        gts = dict(enumerate(items["caption_refs"].to_pylist()))
        res = {i: [hypothesis] for i, hypothesis in enumerate(items["caption_hyp"].to_pylist())}
        statistics, meteor_failure = meteor_statistics(gts, res)
        f_scores, spice_failure = spice_f_scores(gts, res, spice_lib)
        cider_d = sum(cider_d_items(gts, res, frequencies, corpus_items))
        return cls(len(res), cider_d, statistics or [], meteor_failure, sum(f_scores or []), spice_failure)

    def merge(self, other: CaptionTotals) -> CaptionTotals:
        return CaptionTotals(self.items + other.items, self.cider_d + other.cider_d,
                             self.meteor_statistics + other.meteor_statistics, self.meteor_failure or other.meteor_failure,
                             self.spice + other.spice, self.spice_failure or other.spice_failure)

    def scores(self) -> CaptionScores:
        meteor = (None, self.meteor_failure) if self.meteor_failure else meteor_from_statistics(self.meteor_statistics)
        spice = (None, self.spice_failure) if self.spice_failure else (self.spice / self.items, None)
        return combine(self.items, self.cider_d / self.items, meteor, spice)


class CaptionsByGroup(dict):
    """CaptionTotals by (corpus, task, model)."""

    @classmethod
    def of(cls, items: pa.Table, frequencies: DocumentFrequencies, corpus_items: dict[tuple[str, ...], int],
           spice_lib: str | None) -> CaptionsByGroup:
        """The totals of the groups in `corpus_items` (group -> its scored items)."""
        return cls({key: CaptionTotals.of(rows, partial(frequencies.lookup, key), corpus_items[key], spice_lib)
                    for key, rows in split(items, list(GROUP_KEYS)).items() if key in corpus_items})

    def merge(self, other: CaptionsByGroup) -> CaptionsByGroup:
        return CaptionsByGroup(merge_by_key(self, other))

    def quality(self) -> dict[tuple[str, ...], tuple[dict[str, Any], dict[str, str]]]:
        """Per group, the metrics that ran and why the others did not."""
        qualities = {}
        for key, totals in self.items():
            scores = asdict(totals.scores())
            unavailable = scores.pop("unavailable")
            qualities[key] = {k: v for k, v in scores.items() if v is not None}, unavailable
        return qualities


class CaptionScorer:
    """A Ray Data actor that scores blocks of captioned items (`CaptionsByGroup`, pickled, one row a
    block). It lives for the whole stage, so it maps the document frequencies' merged parts (object
    references to Arrow blocks of frequencies.PARTS_SCHEMA) once, in place in the object store, and its
    METEOR JVM, slow to start, serves every block it gets."""

    def __init__(self, frequencies: list[ray.ObjectRef], corpus_items: dict[tuple[str, ...], int], spice_lib: str | None):
        self.frequencies = DocumentFrequencies(ray.get(frequencies))
        self.corpus_items, self.spice_lib = corpus_items, spice_lib

    def __call__(self, items: pa.Table) -> pa.Table:
        totals = CaptionsByGroup.of(items, self.frequencies, self.corpus_items, self.spice_lib)
        return pa.table({"captions": pa.array([pickle.dumps(totals)], pa.binary())})


def merged_captions(block: pa.Table) -> CaptionsByGroup:
    """The CaptionsByGroup of a block of CaptionScorer rows, merged."""
    return reduce(CaptionsByGroup.merge, map(pickle.loads, block["captions"].to_pylist()), CaptionsByGroup())
