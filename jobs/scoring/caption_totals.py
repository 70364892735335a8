"""Stage 4: captioning quality per block: each item's CIDEr-D with the whole group's document
frequencies (frequencies.py), METEOR's per-item statistics and scores, SPICE's per-item F-scores,
BLEU's n-gram statistics and ROUGE-L; summed, then the corpus METEOR and BLEU. Each block's items and
their scores go to items.parquet (item_scores.py)."""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial, reduce
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from jobs.metrics.captions import (BLEU_STATISTICS, METEOR_FIELDS, CaptionScores, Captions, Ngram, bleu_from_statistics,
                                   bleu_statistics, cider_d_items, combine, meteor_sums, rouge_l_items)
from jobs.scoring.coco_tools import meteor_from_statistics, meteor_item_scores, meteor_statistics, spice_f_scores, start_meteor
from jobs.metrics.registry import Metric
from jobs.scoring.analysis import WORST_ITEMS
from jobs.scoring.frequencies import CountedFrequencies, DocumentFrequencies
from jobs.scoring.item_scores import ItemsOut, caption_item_scores
from jobs.scoring.item_table import GROUP_KEYS
from jobs.scoring.merged import merge_by_key
from jobs.scoring.totals import split

# the lowest-scored captioned items of a group (the error analysis's worst items)
WORST_CAPTIONS_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("cider_d", pa.float64()),
                                   pa.field("references", pa.list_(pa.string())), pa.field("hypothesis", pa.string())])


@dataclass
class CaptionTotals:
    items: int = 0
    cider_d: float = 0.0  # sum over the items
    meteor_sums: np.ndarray = field(default_factory=lambda: np.zeros(METEOR_FIELDS))  # the items' statistics, summed
    meteor_failure: str | None = None
    spice: float = 0.0  # sum of F-scores (NaN where one has none, as the mean would be)
    spice_failure: str | None = None
    bleu: np.ndarray = field(default_factory=lambda: np.zeros(len(BLEU_STATISTICS), dtype=np.int64))  # summed
    rouge_l: float = 0.0  # sum over the items
    worst: pa.Table = field(default_factory=WORST_CAPTIONS_SCHEMA.empty_table)  # the WORST_ITEMS lowest CIDEr-D

    @classmethod
    def of(cls, items: pa.Table, frequencies: Callable[[Iterator[Ngram]], Counter], corpus_items: int,
           spice_lib: str | None) -> tuple[CaptionTotals, dict[str, list[float]]]:
        """The totals of a block of one group's items, and each item's scores (metric name -> values);
        `frequencies` looks up the group's document frequencies of n-grams; `corpus_items`: the group's size.
        METEOR's alignments run in its JVM while this thread scores the other metrics."""
        gts = dict(enumerate(items["caption_refs"].to_pylist()))
        res = {i: [hypothesis] for i, hypothesis in enumerate(items["caption_hyp"].to_pylist())}
        with ThreadPoolExecutor(max_workers=1) as meteor_thread:
            meteor = meteor_thread.submit(_meteor, gts, res)
            f_scores, spice_failure = spice_f_scores(gts, res, spice_lib)
            cider_d, rouge_l, bleu = cider_d_items(gts, res, frequencies, corpus_items), rouge_l_items(gts, res), bleu_statistics(gts, res)
            statistics, meteor_items, meteor_failure = meteor.result()
        worst = pa.table({"id": items["id"], "cider_d": cider_d, "references": items["caption_refs"],
                          "hypothesis": items["caption_hyp"]}, schema=WORST_CAPTIONS_SCHEMA)
        totals = cls(len(res), sum(cider_d), meteor_sums(statistics), meteor_failure, sum(f_scores or []), spice_failure,
                     bleu, sum(rouge_l), _lowest(worst))
        return totals, {"cider_d": cider_d, "rouge_l": rouge_l, **({"meteor": meteor_items} if meteor_items else {})}

    def merge(self, other: CaptionTotals) -> CaptionTotals:
        return CaptionTotals(self.items + other.items, self.cider_d + other.cider_d,
                             self.meteor_sums + other.meteor_sums, self.meteor_failure or other.meteor_failure,
                             self.spice + other.spice, self.spice_failure or other.spice_failure,
                             self.bleu + other.bleu, self.rouge_l + other.rouge_l,
                             _lowest(pa.concat_tables([self.worst, other.worst])))

    def scores(self) -> CaptionScores:
        meteor = (None, self.meteor_failure) if self.meteor_failure else meteor_from_statistics(self.meteor_sums)
        spice = (None, self.spice_failure) if self.spice_failure else (self.spice / self.items, None)
        return combine(self.items, self.cider_d / self.items, meteor, spice, bleu_from_statistics(self.bleu),
                       self.rouge_l / self.items)


class CaptionsByGroup(dict):
    """CaptionTotals by (corpus, task, model)."""

    @classmethod
    def of(cls, items: pa.Table, frequencies: DocumentFrequencies | CountedFrequencies, corpus_items: dict[tuple[str, ...], int],
           spice_lib: str | None, metrics: Sequence[Metric], items_out: ItemsOut | None = None) -> CaptionsByGroup:
        """The totals of the groups in `corpus_items` (group -> its scored items); every item, with its
        scores where its group is scored, to `items_out` (items_schema of `metrics`)."""
        totals, scored = cls(), []
        for key, rows in split(items, list(GROUP_KEYS)).items():
            scores = {}
            if key in corpus_items:
                totals[key], scores = CaptionTotals.of(rows, partial(frequencies.lookup, key), corpus_items[key], spice_lib)
            scored.append(caption_item_scores(rows, scores, metrics))
        if items_out is not None and scored:
            items_out.write(pa.concat_tables(scored))
        return totals

    def merge(self, other: CaptionsByGroup) -> CaptionsByGroup:
        return CaptionsByGroup(merge_by_key(self, other))

    def quality(self) -> dict[tuple[str, ...], tuple[dict[str, Any], dict[str, str], list[dict[str, Any]]]]:
        """Per group, the metrics that ran, why the others did not, and the worst items (lowest CIDEr-D)."""
        qualities = {}
        for key, totals in self.items():
            scores = asdict(totals.scores())
            unavailable = scores.pop("unavailable")
            qualities[key] = {k: v for k, v in scores.items() if v is not None}, unavailable, totals.worst.to_pylist()
        return qualities


def _meteor(gts: Captions, res: Captions) -> tuple[list[str], list[float] | None, str | None]:
    """METEOR's statistics and score of each item, or no scores and why its JVM failed."""
    statistics, failure = meteor_statistics(gts, res)
    if statistics is None:
        return [], None, failure
    scores, failure = meteor_item_scores(statistics)
    return statistics, scores, failure


def _lowest(items: pa.Table) -> pa.Table:
    return items.sort_by([("cider_d", "ascending"), ("id", "ascending")]).slice(0, WORST_ITEMS)


class CaptionScorer:
    """A Ray Data actor that scores blocks of captioned items (`CaptionsByGroup`, pickled, one row a
    block) and writes their per-item scores. It lives for the whole stage, so it maps the document frequencies' merged parts (object
    references to Arrow blocks of frequencies.PARTS_SCHEMA) once, in place in the object store, and its
    METEOR JVM, slow to start, serves every block it gets."""

    def __init__(self, frequencies: list[ray.ObjectRef], corpus_items: dict[tuple[str, ...], int], spice_lib: str | None,
                 metrics: Sequence[Metric], items_out: ItemsOut | None):
        start_meteor()  # its JVM loads while the frequencies are mapped
        self.frequencies = DocumentFrequencies(ray.get(frequencies))
        self.corpus_items, self.spice_lib, self.metrics, self.items_out = corpus_items, spice_lib, metrics, items_out

    def __call__(self, items: pa.Table) -> pa.Table:
        totals = CaptionsByGroup.of(items, self.frequencies, self.corpus_items, self.spice_lib, self.metrics, self.items_out)
        return pa.table({"captions": pa.array([pickle.dumps(totals)], pa.binary())})


def merged_captions(block: pa.Table) -> CaptionsByGroup:
    """The CaptionsByGroup of a block of CaptionScorer rows, merged."""
    return reduce(CaptionsByGroup.merge, map(pickle.loads, block["captions"].to_pylist()), CaptionsByGroup())
