"""The error analysis: hand-counted word edits, buckets and examples, the same from any split into blocks,
and the report's section."""

import random

import pyarrow as pa

from jobs.predictions import OUTPUT_SCHEMA
from jobs.scoring.scorer import score
from jobs.scoring.analysis import WORST_ITEMS
from jobs.scoring.pipeline import score_blocks
from tests.scoring.test_score import row
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
    """ASR items of 1 to 80 s whose hypotheses substitute, drop and add words at random; some failed."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        reference = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
        hypothesis = [w for w in reference if rng.random() > 0.15]
        hypothesis = [rng.choice(WORDS) if rng.random() < 0.15 else w for w in hypothesis] + rng.choice([[], ["uh"], ["fish"]])
        error = rng.choice(["not_audio", "too_long"]) if i % 13 == 0 else None
        rows.append(row(f"item-{i:03d}", i, reference=[" ".join(reference)], text=None if error else " ".join(hypothesis),
                        error=error, error_message=error and f"{error} at {i}", audio_seconds=rng.uniform(1, 80)))
    return rows


def test_the_analysis_of_blocks_merged_is_the_whole_sets():
    table = pa.Table.from_pylist(random_rows(150), schema=OUTPUT_SCHEMA)
    whole = score_blocks([table]).analysis[KEY]
    merged = score_blocks([table.slice(start, 7) for start in range(0, 150, 7)]).analysis[KEY]
    assert merged == whole
    assert len(whole["worst_items"]) == WORST_ITEMS and len(whole["wer_by_duration"]) == 6
    counts = [e["count"] for e in whole["word_edits"]["substitution"]]
    assert counts == sorted(counts, reverse=True) and counts[0] > 1


def test_the_report_shows_the_error_analysis_and_its_chart(tmp_path):
    predictions = write_shards(tmp_path / "predictions", three_shards())
    score(predictions, str(tmp_path / "scores"), distributed=False)
    report = (tmp_path / "scores/report.md").read_text()
    assert "## Error analysis" in report and "| ran → run | 1 | there | 1 | down | 1 |" in report
    assert "| `not_audio` | 2 | `utt-3` | not audio |" in report and "| 10–20 | 6 | 18 | 3 | 16.7 |" in report
    assert (tmp_path / "scores/charts/wer_by_duration.png").read_bytes().startswith(b"\x89PNG")
