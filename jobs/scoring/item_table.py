"""Stage 1: each item's scoring fields, from a block of prediction rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.metrics.registry import Metric, Source
from jobs.metrics.wer import EDIT_COLUMNS, align, transcript
from jobs.scoring.coco_tools import tokenize
from jobs.scoring.references import referenced

GROUP_KEYS = ("corpus", "task", "model")
CAPTIONING = "aac"  # the task the caption metrics score
READ_COLUMNS = ["id", *GROUP_KEYS, "error", "error_message", "reference", "text", "audio_seconds", "output_tokens", "ttft_s", "tpot_s",
                "model_s", "created_at", "worker", "job_id", "segments", "mean_logprob", "flags"]
# A piece shorter than the item's audio by more than this was cut from a long recording.
WHOLE_CLIP_TOLERANCE_S = 0.01
WINDOW_S = 30.0  # the models' window (audio.max_seconds): audio without a piece was a long recording only over it
CAPTION_FAILURES = (OSError, RuntimeError)
WORD_EDIT = pa.struct([pa.field("kind", pa.string()), pa.field("reference", pa.string()), pa.field("hypothesis", pa.string())])


def item_table(block: pa.Table, references: pa.Table | None, metrics: Sequence[Metric]) -> pa.Table:
    """One row per item: its id, group keys ('' for null), error, whether it is scored, its answer and the
    answer's signals (`mean_logprob`, `flags`: null in outputs made before rows carried them), edit counts,
    normalized texts and word edits (ASR), tokenized captions (captioning), the speed fields of items
    the model answered, and a column of each ITEM_MEAN metric of `metrics` (null where it does not
    score the item). `references` (REFERENCE_SCHEMA) replace the rows' own where they match
    (references.referenced)."""
    if references is not None:
        block = block.set_column(block.schema.get_field_index("reference"), "reference", referenced(block, references))
    keys = {key: pc.fill_null(block[key], "") for key in GROUP_KEYS}
    succeeded = pc.is_null(block["error"])
    scored = pc.and_(succeeded, pc.fill_null(pc.greater(pc.list_value_length(block["reference"]), 0), False))
    modelled = pc.and_(pc.is_valid(block["model_s"]), pc.is_valid(block["created_at"]))
    end_s = pc.divide(pc.cast(pc.cast(block["created_at"], pa.timestamp("us", tz="UTC")), pa.int64()), 1e6)
    columns = {
        "id": block["id"],
        **keys,
        "error": block["error"],
        "error_message": block["error_message"],
        "scored": scored,
        "segmented": _segmented(block),
        "text": block["text"],
        "mean_logprob": block["mean_logprob"],
        "flags": block["flags"],
        "audio_seconds": pc.fill_null(pc.if_else(succeeded, block["audio_seconds"], 0.0), 0.0),
        "modelled": modelled,
        "worker": pc.fill_null(block["worker"], "unknown"),
        "job_id": pc.fill_null(block["job_id"], ""),
        "modelled_audio_seconds": pc.fill_null(block["audio_seconds"], 0.0),
        "output_tokens": pc.fill_null(pc.cast(block["output_tokens"], pa.int64()), 0),
        "ttft_s": block["ttft_s"],
        "tpot_s": block["tpot_s"],
        "model_s": block["model_s"],
        "end_s": end_s,
        "start_s": pc.subtract(end_s, block["model_s"]),
        **_asr_edits(block, pc.and_(scored, pc.equal(keys["task"], "asr"))),
        **_captions(block, pc.and_(scored, pc.equal(keys["task"], CAPTIONING))),
        **{metric.name: _item_values(block, _of_task(scored, keys["task"], metric.task), metric)
           for metric in metrics if metric.source is Source.ITEM_MEAN},
    }
    return pa.table(columns)


def _of_task(scored: pa.Array, tasks: pa.Array, task: str | None) -> pa.Array:
    """The scored items of `task` (of any task for None)."""
    return scored if task is None else pc.and_(scored, pc.equal(tasks, task))


def _item_values(block: pa.Table, chosen: pa.Array, metric: Metric) -> pa.Array:
    """The metric's value of each chosen item, from its references and answer; null for the others."""
    where = np.flatnonzero(chosen.to_numpy(zero_copy_only=False))
    rows = block.take(where)
    values = metric.item_values(rows["reference"].to_pylist(), rows["text"].to_pylist())
    return _scattered_array(len(block), where, pa.array(values, pa.float64()))


def has_captions(block: pa.Table) -> bool:
    """Whether a block of prediction rows holds captioning items."""
    return pc.any(pc.equal(block["task"], CAPTIONING)).as_py() is True


def captioned(items: pa.Table) -> pa.Table:
    """The items with a tokenized hypothesis: those the caption metrics score."""
    return items.filter(pc.is_valid(items["caption_hyp"]))


def _segmented(block: pa.Table) -> pa.Array:
    """Whether each item was a long recording cut into pieces: none (silence over the window; a clip within it
    without speech never reached the model), several, or one piece shorter than the item (a recording of one
    piece is the whole clip). Outputs written before long recordings were segmented have no `segments`: none of
    their items was."""
    if "segments" not in block.column_names:
        return pa.array(np.zeros(block.num_rows, dtype=bool))
    segments = block["segments"]
    pieces = pc.fill_null(pc.list_value_length(segments), 1)
    first = pc.list_element(pc.if_else(pc.greater(pieces, 0), segments, pa.scalar([{"start": 0.0, "end": 0.0}], segments.type)), 0)
    span = pc.subtract(pc.struct_field(first, "end"), pc.struct_field(first, "start"))
    shorter = pc.less(span, pc.subtract(block["audio_seconds"], WHOLE_CLIP_TOLERANCE_S))
    one_shorter = pc.and_(pc.and_(pc.equal(pieces, 1), pc.is_valid(segments)), shorter)
    silent_recording = pc.and_(pc.equal(pieces, 0), pc.greater(block["audio_seconds"], WINDOW_S))
    return pc.fill_null(pc.or_(pc.or_(pc.greater(pieces, 1), silent_recording), one_shorter), False)


def _asr_edits(block: pa.Table, chosen: pa.Array) -> dict[str, np.ndarray | pa.Array]:
    """Each scored ASR item's edit counts (0 for the others), its normalized reference and hypothesis and
    the words of its word edits (null for the others)."""
    where = np.flatnonzero(chosen.to_numpy(zero_copy_only=False))
    rows = block.take(where)
    aligned = align([transcript(r) for r in rows["reference"].to_pylist()], rows["text"].to_pylist())
    counts = {name: _scatter(len(block), where, aligned.counts[name]) for name in EDIT_COLUMNS}
    texts = {"scored_reference": aligned.references, "scored_hypothesis": aligned.hypotheses}
    return {**counts, **{name: _scattered_array(len(block), where, pa.array(values, pa.string()))
                         for name, values in texts.items()},
            "word_edits": _scattered_array(len(block), where, _word_edit_lists(aligned.word_edits))}


def _word_edit_lists(word_edits: list[list[tuple[str, str, str]]]) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum([len(edits) for edits in word_edits], dtype=np.int32)]).astype(np.int32)
    flat = [edit for edits in word_edits for edit in edits]
    fields = [pa.array([edit[k] for edit in flat], pa.string()) for k in range(3)]
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.StructArray.from_arrays(fields, fields=list(WORD_EDIT)))


def _scattered_array(length: int, where: np.ndarray, values: pa.Array) -> pa.Array:
    """`values` at the rows `where`, null elsewhere."""
    if len(where) == length:
        return values
    positions = np.full(length, -1, dtype=np.int64)
    positions[where] = np.arange(len(where))
    return values.take(pa.array(positions, mask=positions < 0))


def _scatter(length: int, where: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(length, dtype=values.dtype)
    out[where] = values
    return out


def _captions(block: pa.Table, chosen: pa.Array) -> dict[str, pa.Array]:
    """The PTB-tokenized references and hypothesis of each scored captioning item (one tokenizer run a
    block), or why the tokenizer could not run."""
    where = np.flatnonzero(chosen.to_numpy(zero_copy_only=False))
    refs, hyps, failure = [None] * len(block), [None] * len(block), [None] * len(block)
    if len(where):
        rows = block.take(where)
        try:
            gts, res = tokenize(rows["reference"].to_pylist(), rows["text"].to_pylist())
        except CAPTION_FAILURES as err:
            gts, res, reason = {}, {}, f"caption metrics could not run: {err}"
            for i in where:
                failure[i] = reason
        for k, i in enumerate(where):
            refs[i], hyps[i] = gts.get(k), res.get(k, [None])[0]
    return {"caption_refs": pa.array(refs, pa.list_(pa.string())), "caption_hyp": pa.array(hyps, pa.string()),
            "caption_failure": pa.array(failure, pa.string())}
