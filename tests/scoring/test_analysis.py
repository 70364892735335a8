"""The error analysis: hand-counted word edits, buckets and examples, the flags' counts and examples and the
WER by quarter of confidence, the same from any split into blocks, and the report's sections."""

import random

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.predictions import OUTPUT_SCHEMA, OutputStore
from jobs.scoring.scorer import score
from jobs.scoring.analysis import CONFIDENCE_PARTS, FLAG_EXAMPLES, WORST_ITEMS
from nota_model.signals import FLAGS
from jobs.scoring.pipeline import score_blocks
from tests.scoring.test_score import row, write_without_signals
from tests.scoring.test_stages import pa_table, three_shards, write_shards

KEY = ("speech", "asr", "m1")
WORDS = ["cat", "dog", "sat", "ran", "home", "there", "hello", "red", "blue", "fish"]


def test_word_edits_buckets_worst_items_and_error_examples_by_hand():
    found = score_blocks([pa_table(three_shards())]).analysis[KEY]
    assert found["word_edits"] == {"substitution": [{"reference": "ran", "hypothesis": "run", "count": 1}],
                                   "deletion": [{"reference": "there", "hypothesis": "", "count": 1}],
                                   "insertion": [{"reference": "", "hypothesis": "down", "count": 1}]}
    # six scored items of 10 s: 3 + 4 + 2 reference words twice, three edits
    assert found["wer_by_duration"] == [{"from_s": 10, "to_s": 20, "items": 6, "word_edits": 3, "reference_words": 18, "wer": 3 / 18}]
    assert [(i["id"], i["wer"]) for i in found["worst_items"]] == [("utt-2", 1 / 2), ("utt-0", 1 / 3), ("utt-1", 1 / 4)]
    assert found["error_examples"] == {"not_audio": {"id": "utt-3", "message": "not audio"}}  # utt-3 and utt-3-b: the smaller id


def random_rows(count: int, seed: int = 5) -> list[dict]:
    """ASR items of 1 to 80 s whose hypotheses substitute, drop and add words at random, with random flags and
mean log-probabilities (some equal, some missing); some failed."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        reference = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
        hypothesis = [w for w in reference if rng.random() > 0.15]
        hypothesis = [rng.choice(WORDS) if rng.random() < 0.15 else w for w in hypothesis] + rng.choice([[], ["uh"], ["fish"]])
        error = rng.choice(["not_audio", "too_long"]) if i % 13 == 0 else None
        signals = {} if error else {"flags": rng.sample(FLAGS, rng.randint(0, 2)),
                                    "mean_logprob": rng.choice([None, -0.5, -round(rng.uniform(0, 3), 2)])}
        rows.append(row(f"item-{i:03d}", i, reference=[" ".join(reference)], text=None if error else " ".join(hypothesis),
                        error=error, error_message=error and f"{error} at {i}", audio_seconds=rng.uniform(1, 80), **signals))
    return rows


def test_the_analysis_of_blocks_merged_is_the_whole_sets():
    table = pa.Table.from_pylist(random_rows(150), schema=OUTPUT_SCHEMA)
    whole = score_blocks([table]).analysis[KEY]
    merged = score_blocks([table.slice(start, 7) for start in range(0, 150, 7)]).analysis[KEY]
    assert merged == whole
    assert len(whole["worst_items"]) == WORST_ITEMS and len(whole["wer_by_duration"]) == 6
    counts = [e["count"] for e in whole["word_edits"]["substitution"]]
    assert counts == sorted(counts, reverse=True) and counts[0] > 1
    assert all(len(found) == FLAG_EXAMPLES for found in whole["flag_examples"].values()) and len(whole["flag_examples"]) == len(FLAGS)
    assert len(whole["confidence_quarters"]) == CONFIDENCE_PARTS


def signal_rows() -> list[dict]:
    """Five answered items, four with a mean log-probability, and one that failed."""
    return [
        row("a", 0, reference=["the cat sat"], text="the cat sat", mean_logprob=-0.1, flags=[]),
        row("b", 1, reference=["a dog ran home"], text="a dog ran", mean_logprob=-0.2, flags=[]),
        row("c", 2, reference=["hello there"], text="hello", mean_logprob=-1.5, flags=["low_confidence"]),
        row("d", 3, reference=["red blue fish"], text="fish fish fish fish", mean_logprob=-2.0,
            flags=["repetition", "low_confidence"]),
        row("e", 4, reference=["one two"], text="", flags=["no_speech"]),
        row("f", 5, reference=["x"], error="not_audio", error_message="not audio"),
    ]


def test_flags_are_counted_with_examples_and_the_confidence_quarters_rank_the_scored_items_by_hand():
    summary = score_blocks([pa.Table.from_pylist(signal_rows(), schema=OUTPUT_SCHEMA)])
    (group,) = summary.groups
    assert (group["signalled_items"], group["flagged_items"]) == (5, 3)
    assert group["flags"] == {"no_speech": 1, "repetition": 1, "token_limit": 0, "low_confidence": 2}
    found = summary.analysis[KEY]
    assert found["flag_examples"] == {"low_confidence": [{"id": "c", "text": "hello"}, {"id": "d", "text": "fish fish fish fish"}],
                                      "no_speech": [{"id": "e", "text": ""}],
                                      "repetition": [{"id": "d", "text": "fish fish fish fish"}]}
    # e has no log-probability: a, b, c, d one a quarter, the most confident first
    assert [(q["items"], q["highest_logprob"], q["word_edits"], q["reference_words"]) for q in found["confidence_quarters"]] == [
        (1, -0.1, 0, 3), (1, -0.2, 1, 4), (1, -1.5, 1, 2), (1, -2.0, 3, 3)]
    assert [q["wer"] for q in found["confidence_quarters"]] == [0.0, 0.25, 0.5, 1.0]


def test_the_report_shows_the_flags_and_the_wer_by_confidence(tmp_path):
    OutputStore(str(tmp_path / "predictions"), "speech").write_shard(0, signal_rows())
    score(str(tmp_path / "predictions"), str(tmp_path / "scores"), distributed=False)
    report = (tmp_path / "scores/report.md").read_text()
    assert "## Flags and confidence" in report and "3 of 5 answered items flagged:" in report
    assert "| `low_confidence` | 2 | `c`: hello; `d`: fish fish fish fish |" in report and "| `token_limit` | 0 |  |" in report
    assert "| `no_speech` | 1 | `e`: (empty) |" in report
    assert "| 1 (most confident) | 1 | -0.1 to -0.1 | 3 | 0 | 0 |" in report and "| 4 (least confident) | 1 | -2 to -2 | 3 | 3 | 100 |" in report
    assert "- speech / asr / m1: 3 of 5 answered items flagged (no_speech 1, repetition 1, low_confidence 2)." in report
    items = pq.read_table(tmp_path / "scores/items.parquet").to_pylist()
    assert {item["id"]: (item["flags"], item["mean_logprob"]) for item in items}["d"] == (["repetition", "low_confidence"], -2.0)


def test_predictions_written_before_rows_carried_signals_still_score(tmp_path):
    """A part file without the signal columns reads them as null: no flags, no confidence, the same WER."""
    rows = signal_rows()
    write_without_signals(tmp_path / "predictions/speech/part-00000.parquet", rows)
    (group,) = score(str(tmp_path / "predictions"), str(tmp_path / "scores"), distributed=False)
    assert (group["signalled_items"], group["flagged_items"], group["flags"]) == (0, 0, {})
    assert group["quality"]["wer"] == score_blocks([pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)]).groups[0]["quality"]["wer"]
    assert "Its rows carry no signals" in (tmp_path / "scores/report.md").read_text()


def test_the_report_shows_the_error_analysis_and_its_chart(tmp_path):
    predictions = write_shards(tmp_path / "predictions", three_shards())
    score(predictions, str(tmp_path / "scores"), distributed=False)
    report = (tmp_path / "scores/report.md").read_text()
    assert "## Error analysis" in report and "| ran → run | 1 | there | 1 | down | 1 |" in report
    assert "| `not_audio` | 2 | `utt-3` | not audio |" in report and "| 10–20 | 6 | 18 | 3 | 16.7 |" in report
    assert (tmp_path / "scores/charts/wer_by_duration.png").read_bytes().startswith(b"\x89PNG")
