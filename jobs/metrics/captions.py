"""Audio-captioning metrics as maths over PTB-tokenized captions: CIDEr-D, BLEU-1..4 and ROUGE-L by
pycocoevalcap 1.2's own Python scorers, in parts that add up across blocks of items (document
frequencies, BLEU's n-gram statistics, per-item scores), METEOR 1.5's statistics added up as its jar adds
them, and `CaptionScores`, a corpus's figures with METEOR and SPICE beside them. Tokenizing, METEOR's
alignments and scores and SPICE run Java: jobs.scoring.coco_tools."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider_scorer import CiderScorer
from pycocoevalcap.rouge.rouge import Rouge

BLEU_N = 4
CIDER_N = 4  # pycocoevalcap's CiderScorer's n
# BLEU's statistics of a set of items, summed over them: hypothesis words, the closest reference's words,
# and per n the hypothesis n-grams and those matched (clipped by the references' counts)
BLEU_STATISTICS = ("testlen", "reflen", *(f"guess_{n}" for n in range(1, BLEU_N + 1)),
                   *(f"correct_{n}" for n in range(1, BLEU_N + 1)))

# METEOR 1.5's statistics line (MeteorStats): hypothesis and reference lengths and function words, per
# matcher stage (exact, stem, synonym, paraphrase) the hypothesis's and the reference's content and function
# words matched, then chunks and the words matched on each side
METEOR_STAGES = 4
METEOR_FIELDS = 4 + 4 * METEOR_STAGES + 3
METEOR_CHUNKS = 4 + 4 * METEOR_STAGES
METEOR_HYPOTHESIS_MATCHES = [4 + 4 * stage + side for stage in range(METEOR_STAGES) for side in (0, 2)]
METEOR_REFERENCE_MATCHES = [4 + 4 * stage + side for stage in range(METEOR_STAGES) for side in (1, 3)]

Captions = dict[int, list[str]]  # item index -> its captions
Ngram = tuple[str, ...]


@dataclass(frozen=True)
class CaptionScores:
    items: int
    cider_d: float  # CIDEr-D, IDF over all references of the scored items, all references per item
    meteor: float | None  # None only when it could not run; the reason is in `unavailable`
    spice: float | None
    spider: float | None  # (cider_d + spice) / 2
    bleu_1: float  # BLEU-1..4: corpus-level (summed n-gram statistics), against the closest reference's length
    bleu_2: float
    bleu_3: float
    bleu_4: float
    rouge_l: float  # the items' mean ROUGE-L
    unavailable: dict[str, str]  # metric name -> why it is None


def combine(items: int, cider_d: float, meteor: tuple[float | None, str | None],
            spice: tuple[float | None, str | None], bleu: list[float], rouge_l: float) -> CaptionScores:
    """CaptionScores from CIDEr-D, BLEU-1..4, ROUGE-L and the (value, or None and why) of METEOR and SPICE."""
    unavailable = {}
    if meteor[1]:
        unavailable["meteor"] = meteor[1]
    if spice[1]:
        unavailable["spice"] = spice[1]
        unavailable["spider"] = f"needs SPICE: {spice[1]}"
    return CaptionScores(
        items=items,
        cider_d=cider_d,
        meteor=meteor[0],
        spice=spice[0],
        spider=None if spice[0] is None else (cider_d + spice[0]) / 2,
        **{f"bleu_{n}": value for n, value in enumerate(bleu, 1)},
        rouge_l=rouge_l,
        unavailable=unavailable,
    )


def document_frequency(gts: Captions, counts: Counter | None = None) -> Counter:
    """CIDEr-D's document frequencies: in how many items' references each n-gram occurs, the n-grams
    pycocoevalcap's scorer cooks (its whitespace-split words, 1 to CIDER_N at a time), added to `counts`
    when given. Those of disjoint sets of items add up. A Counter reads 0 for an n-gram it lacks, as
    pycocoevalcap's defaultdict does, without adding it."""
    counts = Counter() if counts is None else counts
    counts.update(chain.from_iterable({ngram for ref in refs for ngram in _ngrams(ref.split())} for refs in gts.values()))
    return counts


def _ngrams(words: list[str]) -> Iterator[Ngram]:
    """The 1- to CIDER_N-grams of `words`, as pycocoevalcap's precook makes them."""
    return chain.from_iterable(zip(*(words[start:] for start in range(n))) for n in range(1, CIDER_N + 1))


def cider_d_items(gts: Captions, res: Captions, frequencies: Callable[[Iterator[Ngram]], Counter],
                  corpus_items: int) -> list[float]:
    """Each item's CIDEr-D, by pycocoevalcap's scorer, for items of a corpus of `corpus_items` items;
    `frequencies` gives the corpus's document frequencies of at least the n-grams it is given, those the
    items' captions hold (one n-gram may come more than once). The corpus CIDEr-D is the items' mean."""
    scorer = CiderScorer()
    scorer.crefs = _CorpusSized(corpus_items)  # compute_cider takes log(len(crefs)) as the IDF's numerator
    for i in res:
        scorer += (res[i][0], gts[i])
    cooked = [*scorer.ctest, *(ref for refs in scorer.crefs for ref in refs)]
    scorer.document_frequency = frequencies(ngram for counts in cooked for ngram in counts)
    return [float(score) for score in scorer.compute_cider()]


def bleu_statistics(gts: Captions, res: Captions) -> np.ndarray:
    """The items' BLEU_STATISTICS, summed: what pycocoevalcap's BleuScorer.compute_score adds up over the
    items (option "closest", as its Bleu scorer asks) before it computes the corpus BLEU; those of
    disjoint sets of items add up."""
    scorer = BleuScorer(n=BLEU_N)
    for i in res:
        scorer += (res[i][0], gts[i])
    rows = [[comps["testlen"], scorer._single_reflen(comps["reflen"], "closest", comps["testlen"]), *comps["guess"],
             *comps["correct"]] for comps in scorer.ctest]
    return np.array(rows, dtype=np.int64).reshape(-1, len(BLEU_STATISTICS)).sum(axis=0)


def bleu_from_statistics(statistics: np.ndarray) -> list[float]:
    """Corpus BLEU-1..4 from summed BLEU_STATISTICS, by pycocoevalcap's own compute_score over one
    pseudo-item holding the sums (its corpus score is a function of the sums alone)."""
    testlen, reflen, *rest = (int(value) for value in statistics)
    scorer = BleuScorer(n=BLEU_N)
    scorer.crefs = [None]
    scorer.ctest = [{"testlen": testlen, "reflen": [reflen], "guess": rest[:BLEU_N], "correct": rest[BLEU_N:]}]
    score, _ = scorer.compute_score(option="closest")
    return [float(value) for value in score]


def meteor_sums(statistics: Sequence[str]) -> np.ndarray:
    """The items' METEOR statistics lines added up as the jar's EVAL adds them before it scores the corpus
    (MeteorStats.addStats): field by field, except an item matched whole in one chunk, whose chunk is not
    counted. Those of disjoint sets of items add up; the jar scores the sums as one line (meteor_line). The
    fields are counts, so the sums are exact in any order."""
    fields = np.array([line.split() for line in statistics], dtype=np.float64).reshape(-1, METEOR_FIELDS)
    whole = ((fields[:, METEOR_HYPOTHESIS_MATCHES].sum(axis=1) == fields[:, 0])
             & (fields[:, METEOR_REFERENCE_MATCHES].sum(axis=1) == fields[:, 1]) & (fields[:, METEOR_CHUNKS] == 1))
    fields[whole, METEOR_CHUNKS] = 0
    return fields.sum(axis=0)


def meteor_line(sums: np.ndarray) -> str:
    """Summed METEOR statistics as a statistics line the jar reads."""
    return " ".join(repr(float(value)) for value in sums)


def rouge_l_items(gts: Captions, res: Captions) -> list[float]:
    """Each item's ROUGE-L by pycocoevalcap (the corpus ROUGE-L is their mean)."""
    rouge = Rouge()
    return [float(rouge.calc_score(res[i], gts[i])) for i in res]


class _CorpusSized(list):
    """A block's cooked references whose len() is the size of the whole corpus."""

    def __init__(self, corpus_items: int):
        super().__init__()
        self.corpus_items = corpus_items

    def __len__(self) -> int:
        return self.corpus_items
