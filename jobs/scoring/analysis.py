"""Error analysis of a group, mergeable across blocks like the totals (totals.GroupTotals holds one):
the worst items, every distinct word edit with its count, WER by duration bucket, one example of
each error code, a few examples of each flag, and how well the answers' confidence ranks them by WER.
Each part is a top-k, a sum or a concatenation, so per-block parts merge into the whole set's exactly
(ties broken by item id), and only the summary's few rows reach the driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.metrics.wer import EDIT_COLUMNS
from jobs.scoring.item_scores import item_error_rates

WORST_ITEMS = 20  # per group, in the report
TOP_EDITS = 20  # most frequent substitutions, deletions, insertions per group, in the report
DURATION_EDGES_S = (0, 5, 10, 20, 30, 60)  # bucket starts; the last bucket is open-ended
FLAG_EXAMPLES = 2  # items shown per flag in the report: those with the smallest ids
CONFIDENCE_PARTS = 4  # the scored items split by confidence into quarters, the most confident first
EDIT_KINDS = ("substitution", "deletion", "insertion")
WORST_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("wer", pa.float64()), pa.field("word_edits", pa.int64()),
                          pa.field("reference", pa.string()), pa.field("hypothesis", pa.string())])
EDITS_SCHEMA = pa.schema([pa.field("kind", pa.string()), pa.field("reference", pa.string()),
                          pa.field("hypothesis", pa.string()), pa.field("count", pa.int64())])
WORST_ORDER = [("wer", "descending"), ("word_edits", "descending"), ("id", "ascending")]


@dataclass
class Analysis:
    worst: pa.Table = field(default_factory=WORST_SCHEMA.empty_table)  # at most WORST_ITEMS with edits, worst first
    edits: pa.Table = field(default_factory=EDITS_SCHEMA.empty_table)  # every distinct word edit, counted
    buckets: np.ndarray = field(default_factory=lambda: np.zeros((len(DURATION_EDGES_S), 3), dtype=np.int64))  # items, word edits, reference words
    error_examples: dict[str, tuple[str, str]] = field(default_factory=dict)  # code -> (smallest id, its message)
    flag_examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # flag -> (id, text), smallest ids
    # (mean token log-probability, word edits, reference words) of each scored ASR item with a mean log-probability
    confidence: np.ndarray = field(default_factory=lambda: np.empty((0, 3)))

    @classmethod
    def of(cls, items: pa.Table) -> Analysis:
        """The analysis of one group's items (items.item_table rows)."""
        errors = items.filter(pc.is_valid(items["error"])).sort_by([("id", "ascending")])
        examples = {}
        for item_id, code, message in zip(*(errors[name].to_pylist() for name in ("id", "error", "error_message"))):
            examples.setdefault(code, (item_id, message or ""))
        asr = items.filter(pc.is_valid(items["scored_reference"]))
        if not asr.num_rows:
            return cls(error_examples=examples, flag_examples=_flag_examples(items))
        counts = {name: asr[name].to_numpy() for name in EDIT_COLUMNS}
        wer = item_error_rates(counts)["wer"]
        word_edits = counts["word_substitutions"] + counts["word_deletions"] + counts["word_insertions"]
        reference_words = counts["word_hits"] + counts["word_substitutions"] + counts["word_deletions"]
        rated = pc.is_valid(asr["mean_logprob"]).to_numpy(zero_copy_only=False)
        confidence = np.column_stack([asr["mean_logprob"].to_numpy(zero_copy_only=False)[rated],
                                      word_edits[rated], reference_words[rated]]).astype(np.float64)
        worst = pa.table({"id": asr["id"], "wer": wer, "word_edits": word_edits, "reference": asr["scored_reference"],
                          "hypothesis": asr["scored_hypothesis"]}, schema=WORST_SCHEMA)
        bucket = np.digitize(asr["modelled_audio_seconds"].to_numpy(), DURATION_EDGES_S[1:])
        buckets = np.stack([np.bincount(bucket, weights=w, minlength=len(DURATION_EDGES_S))
                            for w in (np.ones(len(bucket)), word_edits, reference_words)], axis=1).astype(np.int64)
        flat = pc.list_flatten(asr["word_edits"])
        edits = pa.table({name: pc.struct_field(flat, name) for name in ("kind", "reference", "hypothesis")})
        return cls(_worst(worst.filter(pc.greater(worst["word_edits"], 0))), _counted(edits.append_column("count", pa.array(np.ones(len(edits), np.int64)))),
                   buckets, examples, _flag_examples(items), confidence)

    def merge(self, other: Analysis) -> Analysis:
        examples = dict(self.error_examples)
        for code, example in other.error_examples.items():
            examples[code] = min(examples.get(code, example), example)
        flag_examples = {flag: sorted(self.flag_examples.get(flag, []) + other.flag_examples.get(flag, []))[:FLAG_EXAMPLES]
                         for flag in self.flag_examples | other.flag_examples}
        return Analysis(_worst(pa.concat_tables([self.worst, other.worst])),
                        _counted(pa.concat_tables([self.edits, other.edits])), self.buckets + other.buckets, examples,
                        flag_examples, np.concatenate([self.confidence, other.confidence]))

    def summary(self) -> dict[str, Any]:
        """What the report shows (plain, JSON-able): the worst items, the TOP_EDITS most frequent word edits
        of each kind (most frequent first, ties alphabetical), WER by duration bucket, an example an error code."""
        ranked = self.edits.sort_by([("count", "descending"), ("reference", "ascending"), ("hypothesis", "ascending")])
        top = {kind: ranked.filter(pc.equal(ranked["kind"], kind)).slice(0, TOP_EDITS).drop_columns(["kind"]).to_pylist()
               for kind in EDIT_KINDS}
        ends = [*DURATION_EDGES_S[1:], None]
        buckets = [{"from_s": start, "to_s": end, "items": int(items), "word_edits": int(edits),
                    "reference_words": int(words), "wer": edits / words if words else None}
                   for start, end, (items, edits, words) in zip(DURATION_EDGES_S, ends, self.buckets) if items]
        return {"worst_items": self.worst.to_pylist(), "word_edits": top, "wer_by_duration": buckets,
                "error_examples": {code: {"id": item_id, "message": message}
                                   for code, (item_id, message) in sorted(self.error_examples.items())},
                "flag_examples": {flag: [{"id": item_id, "text": text} for item_id, text in found]
                                  for flag, found in sorted(self.flag_examples.items())},
                "confidence_quarters": confidence_parts(self.confidence)}


def confidence_parts(confidence: np.ndarray) -> list[dict[str, Any]]:
    """The scored items split by mean token log-probability into CONFIDENCE_PARTS parts of (nearly) equal size,
    the most confident first, each with its log-probability range and its WER (its edits over its reference
    words); none for fewer items than parts. Items of equal log-probability are ordered by their edits and
    words, so the split is the same whatever blocks the items came in."""
    if len(confidence) < CONFIDENCE_PARTS:
        return []
    logprob, edits, words = confidence.T
    order = np.lexsort((words, edits, -logprob))
    return [{"items": len(part), "highest_logprob": float(logprob[part[0]]), "lowest_logprob": float(logprob[part[-1]]),
             "word_edits": int(edits[part].sum()), "reference_words": int(words[part].sum()),
             "wer": float(edits[part].sum() / words[part].sum()) if words[part].sum() else None}
            for part in np.array_split(order, CONFIDENCE_PARTS)]


def _flag_examples(items: pa.Table) -> dict[str, list[tuple[str, str]]]:
    """Per flag, the FLAG_EXAMPLES items with the smallest ids that raise it, with their answers."""
    flagged = items.filter(pc.fill_null(pc.greater(pc.list_value_length(items["flags"]), 0), False)).sort_by([("id", "ascending")])
    examples: dict[str, list[tuple[str, str]]] = {}
    for item_id, text, flags in zip(*(flagged[name].to_pylist() for name in ("id", "text", "flags"))):
        for flag in flags:
            if len(examples.setdefault(flag, [])) < FLAG_EXAMPLES:
                examples[flag].append((item_id, text or ""))
    return examples


def _worst(items: pa.Table) -> pa.Table:
    return items.sort_by(WORST_ORDER).slice(0, WORST_ITEMS)


def _counted(edits: pa.Table) -> pa.Table:
    """The edits with the counts of equal (kind, reference, hypothesis) rows added up."""
    keys = ["kind", "reference", "hypothesis"]
    summed = edits.group_by(keys, use_threads=False).aggregate([("count", "sum")])  # one hash table, not one a thread
    return pa.table({**{key: summed[key] for key in keys}, "count": summed["count_sum"]}, schema=EDITS_SCHEMA)
