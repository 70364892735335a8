"""items.parquet: one row an item, whose edit counts re-add to the groups' totals, the same rows from
the in-process and the Ray Data scorer, and captioned items with pycocoevalcap's own per-item scores."""

import json
import shutil

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from jobs.scoring import coco_tools
from jobs.predictions import OutputStore
from jobs.scoring.scorer import score
from jobs.metrics.registry import registered
from jobs.scoring.item_scores import items_schema
from tests.scoring.test_score import SPEECH, speech_rows
from tests.scoring.test_stages import GTS, RES, three_shards, write_shards

java = pytest.mark.skipif(shutil.which("java") is None, reason="the caption metrics run on Java")


def items(scores) -> list[dict]:
    table = ds.dataset(str(scores / "items.parquet"), format="parquet", schema=items_schema(registered())).to_table()
    return sorted(table.to_pylist(), key=lambda item: item["id"])


def metrics(scores) -> dict:
    """The group-wide figures in metrics.parquet (the first of a name: `items` is also a speed figure)."""
    found = {}
    for r in pq.read_table(scores / "metrics.parquet").to_pylist():
        found.setdefault((r["corpus"], r["metric"]), r["value"])
    return found


def test_item_edits_re_add_to_the_groups_totals_and_hand_counted_items(tmp_path):
    predictions = write_shards(tmp_path / "predictions", three_shards())
    score(predictions, str(tmp_path / "scores"), distributed=False)
    rows, totals = items(tmp_path / "scores"), metrics(tmp_path / "scores")
    assert len(rows) == totals[("speech", "items")] == 8
    edits = {name: sum(r[f"word_{name}"] or 0 for r in rows) for name in ("substitutions", "deletions", "insertions", "hits")}
    assert [edits[n] for n in ("substitutions", "deletions", "insertions")] == [
        totals[("speech", n)] for n in ("substitutions", "deletions", "insertions")]
    assert edits["hits"] + edits["substitutions"] + edits["deletions"] == totals[("speech", "reference_words")]
    by_id = {r["id"]: r for r in rows}
    first = by_id["utt-0"]  # "the cat sat" -> "The cat sat down.": one insertion, normalised as scored
    assert (first["reference"], first["hypothesis"]) == (["the cat sat"], "the cat sat down")
    assert (first["word_insertions"], first["word_hits"], first["wer"]) == (1, 3, pytest.approx(1 / 3))
    assert by_id["utt-1"]["wer"] == pytest.approx(1 / 4) and by_id["utt-2"]["word_deletions"] == 1
    failed = by_id["utt-3"]
    assert (failed["error"], failed["error_message"], failed["wer"], failed["reference"]) == ("not_audio", "not audio", None, None)
    assert by_id["utt-0"]["audio_seconds"] == 10.0 and by_id["utt-0"]["cider_d"] is None


def test_ray_data_and_in_process_scorers_write_the_same_items(local_ray, tmp_path):
    predictions = write_shards(tmp_path / "predictions", three_shards())
    score(predictions, str(tmp_path / "in-process"), distributed=False)
    score(predictions, str(tmp_path / "ray-data"), distributed=True)
    assert items(tmp_path / "ray-data") == items(tmp_path / "in-process")
    analysis = [json.loads((tmp_path / run / "metrics.json").read_text())["analysis"] for run in ("ray-data", "in-process")]
    assert analysis[0] == analysis[1] and analysis[0][0]["worst_items"]


def test_a_second_score_replaces_the_items_of_the_first(tmp_path):
    first = write_shards(tmp_path / "first", three_shards())
    second = str(tmp_path / "second")
    OutputStore(second, "speech").write_shard(0, speech_rows([hyp for _, hyp in SPEECH])[:1])
    score(first, str(tmp_path / "scores"), distributed=False)
    score(second, str(tmp_path / "scores"), distributed=False)
    assert [r["id"] for r in items(tmp_path / "scores")] == ["utt-0"]


@java
def test_captioned_items_carry_pycocoevalcaps_per_item_scores(scored_captions):
    written, on_ray = items(scored_captions.in_process), items(scored_captions.on_ray)
    scores = ("cider_d", "meteor", "rouge_l")
    assert [{k: v for k, v in r.items() if k not in scores} for r in on_ray] == [
        {k: v for k, v in r.items() if k not in scores} for r in written]
    for name in scores:
        assert [r[name] for r in on_ray] == pytest.approx([r[name] for r in written], abs=1e-12)
    _, cider = Cider().compute_score(GTS, RES)
    _, rouge = Rouge().compute_score(GTS, RES)
    _, meteor = coco_tools._meteor_scorer().compute_score(GTS, RES)
    assert [r["cider_d"] for r in written] == pytest.approx(list(cider), abs=1e-9)
    assert [r["rouge_l"] for r in written] == pytest.approx(list(rouge), abs=1e-12)
    assert [r["meteor"] for r in written] == pytest.approx(meteor, abs=1e-9)
    assert written[0]["reference"] == GTS[0] and written[0]["hypothesis"] == RES[0][0] and written[0]["wer"] is None
    # the analysis's worst captioned items: the lowest CIDEr-D first, the same from both scorers
    worst = [json.loads((scores / "metrics.json").read_text())["analysis"][0]["worst_items"]
             for scores in (scored_captions.in_process, scored_captions.on_ray)]
    assert [item["id"] for item in worst[0]] == [f"c{i}" for i in sorted(range(4), key=lambda i: cider[i])]
    assert [item["id"] for item in worst[1]] == [item["id"] for item in worst[0]]
    assert "| `c3` | " in (scored_captions.in_process / "report.md").read_text()
