"""Scoring and re-scoring stored predictions: hand-checked WER and speed, errors left out, outputs, deltas."""

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.predictions import OUTPUT_SCHEMA, OutputStore, RepeatedRunsError
from jobs.rescore import COMPARISON_SCHEMA, rescore
from jobs.score import main
from jobs.scoring.references import REFERENCE_SCHEMA, read_references, referenced
from jobs.scoring.pipeline import score_blocks
from jobs.scoring.scorer import METRICS_SCHEMA, score
from nota_model.errors import NotaError
from tests.s3 import moto_server, s3_filesystem

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
SPEECH = [  # reference, hypothesis: one insertion, one substitution, one deletion over 3 + 4 + 2 reference words
    ("the cat sat", "The cat sat down."),
    ("a dog ran home", "a dog run home"),
    ("hello there", "hello"),
]


def row(item_id: str, index: int, **fields) -> dict:
    base = {name: None for name in OUTPUT_SCHEMA.names}
    return base | {"id": item_id, "corpus": "speech", "shard": 0, "index": index, "task": "asr", "model": "m1",
                   "job_id": "job-1", "created_at": T0} | fields


def speech_rows(hypotheses: list[str], model: str = "m1") -> list[dict]:
    """Batch A (worker w1): items 0, 1, ended at T0+100 s after 4 s; batch B (worker w2): item 2, ended at T0+103 s
    after 2 s. Item 3 failed to decode. Each item: 10 s of audio, 5 output tokens."""
    ends = [(T0 + timedelta(seconds=100), 4.0, "w1", 1.0), (T0 + timedelta(seconds=100), 4.0, "w1", 1.0),
            (T0 + timedelta(seconds=103), 2.0, "w2", 2.0)]
    rows = [
        row(f"utt-{i}", i, reference=[ref], text=hyp, audio_seconds=10.0, output_tokens=5, ttft_s=ttft, tpot_s=0.1,
            model_s=model_s, created_at=end, worker=worker, model=model)
        for i, ((ref, _), hyp, (end, model_s, worker, ttft)) in enumerate(zip(SPEECH, hypotheses, ends))
    ]
    return rows + [row("utt-3", 3, reference=["many words that would count"], error="not_audio",
                       error_message="not audio", model=model)]


def write_without_signals(path: Path, rows: list[dict]) -> None:
    """A part file as the job wrote it before rows carried their signals."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA).drop_columns(["speech_share", "mean_logprob", "compression_ratio", "flags"])
    pq.write_table(table, path)


def score_rows(rows: list[dict]) -> list[dict]:
    """The groups of OUTPUT_SCHEMA rows, scored in this process."""
    return score_blocks([pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)]).groups


def write_run(root: Path, rows: list[dict]) -> str:
    OutputStore(str(root), "speech").write_shard(0, rows)
    return str(root)


def test_wer_and_speed_match_hand_computed_values():
    (group,) = score_rows(speech_rows([hyp for _, hyp in SPEECH]))
    assert (group["items"], group["errors"], group["error_codes"], group["scored_items"]) == (4, 1, {"not_audio": 1}, 3)
    quality = group["quality"]
    assert (quality["substitutions"], quality["deletions"], quality["insertions"], quality["reference_words"]) == (1, 1, 1, 9)
    assert quality["wer"] == pytest.approx(3 / 9)  # the error row's 5 reference words are not counted
    speed = group["speed"]
    assert speed["wall_s"] == pytest.approx(7.0)  # batch A starts at 96 s, batch B ends at 103 s
    assert speed["items_per_s"] == pytest.approx(3 / 7)
    assert speed["x_real_time"] == pytest.approx(30 / 7)
    assert speed["output_tokens_per_s"] == pytest.approx(15 / 7)
    assert speed["ttft_s"]["p50"] == pytest.approx(1.0) and speed["ttft_s"]["mean"] == pytest.approx(4 / 3)
    workers = group["workers"]
    assert workers["w1"]["wall_s"] == pytest.approx(4.0) and workers["w1"]["items_per_s"] == pytest.approx(0.5)
    assert workers["w2"]["items_per_s"] == pytest.approx(0.5) and workers["w2"]["x_real_time"] == pytest.approx(5.0)


def test_score_writes_metrics_json_report_and_charts(tmp_path):
    predictions = write_run(tmp_path / "predictions", speech_rows([hyp for _, hyp in SPEECH]))
    assert main(["--predictions", predictions, "--output", str(tmp_path / "scores")]) == 0
    table = pq.read_table(tmp_path / "scores/metrics.parquet")
    assert table.schema.equals(METRICS_SCHEMA, check_metadata=False)
    metrics = {(r["worker"], r["metric"]): r["value"] for r in table.to_pylist()}
    assert metrics[(None, "wer")] == pytest.approx(1 / 3) and metrics[(None, "errors.not_audio")] == 1
    assert metrics[("w2", "items_per_s")] == pytest.approx(0.5)
    document = json.loads((tmp_path / "scores/metrics.json").read_text())
    assert document["groups"][0]["quality"]["wer"] == pytest.approx(1 / 3)
    report = (tmp_path / "scores/report.md").read_text()
    assert "| speech | asr | m1 | 4 | 1 | 3 | 0 | 33.3 |" in report
    assert "1 of 4 items had errors (not_audio 1), left out of quality metrics" in report
    assert "percentiles over items, exact (not\n  a sketch)" in report
    for chart in ("quality", "speed", "latency"):
        assert f"![charts/{chart}.png](charts/{chart}.png)" in report
        assert (tmp_path / f"scores/charts/{chart}.png").read_bytes().startswith(b"\x89PNG")


def test_the_report_table_counts_the_scored_and_the_unscored_items_and_marks_the_better_direction(tmp_path):
    rows = speech_rows([hyp for _, hyp in SPEECH])
    rows[2]["reference"] = None  # answered, but nothing to score it against: out of WER, counted in the table
    assert main(["--predictions", write_run(tmp_path / "predictions", rows), "--output", str(tmp_path / "scores")]) == 0
    report = (tmp_path / "scores/report.md").read_text()
    assert "| corpus | task | model | items | errors | scored | unscored | WER % ↓ | CER % ↓ | CIDEr-D ↑ |" in report
    assert "| speech | asr | m1 | 4 | 1 | 2 | 1 | 28.6 |" in report  # 1 insertion + 1 substitution over 3 + 4 words


def test_references_from_a_manifest_replace_the_rows(tmp_path):
    rows = [r | {"reference": None} for r in speech_rows([hyp for _, hyp in SPEECH])]
    (tmp_path / "items.jsonl").write_text("".join(
        json.dumps({"id": f"utt-{i}", "audio": f"{i}.wav", "reference": ref}) + "\n" for i, (ref, _) in enumerate(SPEECH)))
    (tmp_path / "speech.yaml").write_text("name: speech\ntask: asr\nitems: items.jsonl\n")
    predictions = write_run(tmp_path / "predictions", rows)
    (without,) = score(predictions, str(tmp_path / "a"))
    assert without["quality"] == {} and "pass --references" in without["unavailable"]["quality"]
    (group,) = score(predictions, str(tmp_path / "b"), references=str(tmp_path / "speech.yaml"))
    assert group["quality"]["wer"] == pytest.approx(3 / 9)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_references_from_jsonl_with_and_without_corpus_and_parquet_lists(tmp_path):
    jsonl = write_jsonl(tmp_path / "refs.jsonl", [{"id": "a", "reference": "one", "extra": 1},
                                                 {"id": 7, "corpus": "c", "reference": ["two", "three"]}])
    assert read_references(jsonl, {}).to_pylist() == [{"corpus": None, "id": "a", "reference": ["one"]},
                                                      {"corpus": "c", "id": "7", "reference": ["two", "three"]}]
    pq.write_table(pa.table({"id": ["a", "b"], "reference": [["x", "y"], None]}), tmp_path / "lists.parquet")
    assert read_references(str(tmp_path / "lists.parquet"), {}).to_pylist() == [{"corpus": None, "id": "a", "reference": ["x", "y"]}]
    pq.write_table(pa.table({"corpus": ["c"], "id": ["a"], "reference": ["x"]}), tmp_path / "strings.parquet")
    assert read_references(str(tmp_path / "strings.parquet"), {}).to_pylist() == [{"corpus": "c", "id": "a", "reference": ["x"]}]
    assert read_references(str(tmp_path / "lists.parquet"), {}).schema == REFERENCE_SCHEMA


def test_references_keep_the_last_of_a_repeated_key(tmp_path):
    jsonl = write_jsonl(tmp_path / "refs.jsonl", [{"id": "a", "reference": "first"}, {"id": "a", "corpus": "c", "reference": "other"},
                                                 {"id": "a", "reference": "last"}])
    assert sorted(read_references(jsonl, {}).to_pylist(), key=str) == [
        {"corpus": "c", "id": "a", "reference": ["other"]}, {"corpus": None, "id": "a", "reference": ["last"]}]


def test_references_without_id_or_reference_are_a_clear_error(tmp_path):
    with pytest.raises(NotaError, match="line 2: no reference"):
        read_references(write_jsonl(tmp_path / "refs.jsonl", [{"id": "a", "reference": "x"}, {"id": "b", "text": "y"}]), {})
    pq.write_table(pa.table({"reference": ["x"]}), tmp_path / "refs.parquet")
    with pytest.raises(NotaError, match="no id"):
        read_references(str(tmp_path / "refs.parquet"), {})


def test_references_join_prefers_corpus_and_id_keeps_unmatched_rows_and_the_row_order():
    references = pa.Table.from_pylist([
        {"corpus": None, "id": "u2", "reference": ["any corpus"]}, {"corpus": "speech", "id": "u2", "reference": ["speech's"]},
        {"corpus": None, "id": "u0", "reference": ["u0 anywhere"]}, {"corpus": "other", "id": "u5", "reference": ["not this corpus"]},
    ], schema=REFERENCE_SCHEMA)
    block = pa.Table.from_pylist([  # in no particular order, one id twice in two corpora
        {"corpus": "speech", "id": "u5", "reference": ["own 5"]}, {"corpus": "speech", "id": "u2", "reference": None},
        {"corpus": "speech", "id": "u9", "reference": ["own 9"]}, {"corpus": "music", "id": "u2", "reference": ["own"]},
        {"corpus": None, "id": "u0", "reference": None}, {"corpus": "speech", "id": "u1", "reference": None},
    ], schema=REFERENCE_SCHEMA)  # the columns the join reads, typed as in OUTPUT_SCHEMA
    assert referenced(block, references).to_pylist() == [["own 5"], ["speech's"], ["own 9"], ["any corpus"], ["u0 anywhere"], None]
    assert referenced(block.slice(0, 0), references).to_pylist() == []


def test_distributed_scoring_with_references_gives_the_in_process_groups(local_ray, tmp_path):
    rows = [r | {"reference": None} for r in speech_rows([hyp for _, hyp in SPEECH])]
    store = OutputStore(str(tmp_path / "predictions"), "speech")
    for shard, part in enumerate([rows[:2], rows[2:]]):
        store.write_shard(shard, [r | {"shard": shard} for r in part])
    references = write_jsonl(tmp_path / "refs.jsonl", [
        {"id": "utt-0", "corpus": "speech", "reference": SPEECH[0][0]}, {"id": "utt-0", "reference": "not these words"},
        {"id": "utt-1", "reference": [SPEECH[1][0]]}, {"id": "utt-2", "corpus": "speech", "reference": SPEECH[2][0]}])
    (distributed,) = score(str(tmp_path / "predictions"), str(tmp_path / "a"), references=references, distributed=True)
    (in_process,) = score(str(tmp_path / "predictions"), str(tmp_path / "b"), references=references, distributed=False)
    assert distributed["quality"] == in_process["quality"] and in_process["quality"]["wer"] == pytest.approx(3 / 9)
    assert (distributed["items"], distributed["scored_items"]) == (in_process["items"], in_process["scored_items"]) == (4, 3)
    with pytest.raises(NotaError, match="line 1: no id"):
        score(str(tmp_path / "predictions"), str(tmp_path / "c"), references=write_jsonl(tmp_path / "bad.jsonl", [{"reference": "x"}]),
              distributed=True)


def test_submission_csv_is_the_seeds_format_in_corpus_order(tmp_path):
    rows = speech_rows(["one, two", "three", "four"])
    rows[0], rows[3] = rows[3], rows[0]
    score(write_run(tmp_path / "predictions", rows), str(tmp_path / "scores"), submission=str(tmp_path / "csv"))
    assert (tmp_path / "csv/speech.csv").read_text() == 'testset_id,text\nutt-0,"one, two"\nutt-1,three\nutt-2,four\nutt-3,\n'


def submission_csv(rows: list[dict]) -> str:
    """The submission CSV of rows given in corpus order, by the csv module."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows([("testset_id", "text"), *((r["id"], "" if r["error"] else r["text"]) for r in rows)])
    return buffer.getvalue()


def test_submission_files_are_streamed_in_shard_and_index_order(tmp_path):
    rows = speech_rows(["one, two", "three", "four"])
    shards = {shard: [r | {"id": f"s{shard}-{r['id']}", "shard": shard} for r in rows] for shard in (0, 2, 99999, 100000)}
    store = OutputStore(str(tmp_path / "predictions"), "speech")
    for shard in (100000, 99999, 0, 2):  # written out of order; by name, part-100000 sorts before part-99999
        store.write_shard(shard, shards[shard][::-1])
    score(str(tmp_path / "predictions"), str(tmp_path / "scores"), submission=str(tmp_path / "csv"), distributed=False)
    expected = submission_csv([r for shard in shards.values() for r in shard])
    assert (tmp_path / "csv/speech.csv").read_text() == expected
    assert expected.splitlines()[1:3] == ["s0-utt-0,\"one, two\"", "s0-utt-1,three"]


def test_rescore_compares_runs_and_is_idempotent(tmp_path):
    run_a = write_run(tmp_path / "a", speech_rows([hyp for _, hyp in SPEECH]))
    run_b = write_run(tmp_path / "b", speech_rows([ref for ref, _ in SPEECH], model="m2"))  # perfect transcripts
    first = rescore({"base": run_a, "new": run_b}, str(tmp_path / "cmp"))
    deltas = {r["metric"]: r for r in first["comparison"]}
    assert deltas["wer"]["baseline_value"] == pytest.approx(1 / 3) and deltas["wer"]["value"] == 0.0
    assert deltas["wer"]["delta"] == pytest.approx(-1 / 3) and deltas["wer"]["relative_delta"] == pytest.approx(-1.0)
    assert (deltas["wer"]["baseline_model"], deltas["wer"]["model"]) == ("m1", "m2")
    assert deltas["items_per_s"]["delta"] == 0.0
    table = pq.read_table(tmp_path / "cmp/comparison.parquet")
    assert table.schema.equals(COMPARISON_SCHEMA, check_metadata=False) and table.num_rows == len(first["comparison"])
    assert (tmp_path / "cmp/runs/new/metrics.parquet").exists()

    written = (tmp_path / "cmp/comparison.json").stat().st_mtime_ns
    again = rescore({"base": run_a, "new": run_b}, str(tmp_path / "cmp"))
    assert again["unchanged"] and again["comparison"] == first["comparison"]
    assert (tmp_path / "cmp/comparison.json").stat().st_mtime_ns == written

    write_run(tmp_path / "b", speech_rows([hyp for _, hyp in SPEECH], model="m2"))  # run b re-made: scored anew
    changed = rescore({"base": run_a, "new": run_b}, str(tmp_path / "cmp"))
    assert not changed["unchanged"]
    assert {r["metric"]: r["delta"] for r in changed["comparison"]}["wer"] == 0.0


def test_the_comparison_gives_each_metric_in_the_reports_unit_with_its_better_direction(tmp_path):
    run_a = write_run(tmp_path / "a", speech_rows([hyp for _, hyp in SPEECH]))
    run_b = write_run(tmp_path / "b", speech_rows([ref for ref, _ in SPEECH], model="m2"))
    rescore({"base": run_a, "new": run_b}, str(tmp_path / "cmp"))
    table = (tmp_path / "cmp/comparison.md").read_text()
    assert "| speech | asr | WER % | lower | base | 33.33 | new | 0 | -33.33 | -100 |" in table  # as report.md gives it
    assert "| speech | asr | items/s model phase | higher | base | 0.4286 | new | 0.4286 | +0 | +0 |" in table


def test_score_reads_and_writes_object_storage():
    with moto_server() as options:
        fs = s3_filesystem(options)
        fs.mkdir("score-bucket")
        OutputStore("s3://score-bucket/predictions", "speech", options).write_shard(0, speech_rows([h for _, h in SPEECH]))
        (group,) = score("s3://score-bucket/predictions", "s3://score-bucket/scores", storage_options=options)
        assert group["quality"]["wer"] == pytest.approx(1 / 3)
        assert fs.exists("score-bucket/scores/metrics.parquet") and fs.exists("score-bucket/scores/report.md")


def test_captioning_groups_get_cider_d_and_say_why_spice_is_missing(tmp_path, no_spice):
    rows = [  # each hypothesis is its reference, no shared word, 4+ words: CIDEr-D 10 (see test_captions)
        row("dog", 0, corpus="sounds", task="aac", reference=["a small dog barks loudly"], text="A small dog barks loudly"),
        row("rain", 1, corpus="sounds", task="aac", reference=["rain falls on the roof"], text="Rain falls on the roof."),
        row("bad", 2, corpus="sounds", task="aac", reference=["anything"], error="empty_audio"),
    ]
    predictions = str(tmp_path / "predictions")
    OutputStore(predictions, "sounds").write_shard(0, rows)
    (group,) = score(predictions, str(tmp_path / "scores"))
    assert group["scored_items"] == 2 and group["errors"] == 1
    assert group["quality"]["cider_d"] == pytest.approx(10.0) and group["quality"]["meteor"] > 0.9
    assert "spice" not in group["quality"] and "spider" not in group["quality"]
    notes = {r["metric"]: r for r in pq.read_table(tmp_path / "scores/metrics.parquet").to_pylist()}
    assert notes["spice"]["value"] is None and "NOTA_SPICE_LIB" in notes["spice"]["note"]
    assert notes["spider"]["value"] is None and notes["spider"]["note"]
    assert "**spice unavailable**" in (tmp_path / "scores/report.md").read_text()


def test_the_same_corpus_and_model_from_two_outputs_is_refused_not_counted_twice(tmp_path):
    first = write_run(tmp_path / "runs/first", speech_rows([hyp for _, hyp in SPEECH]))
    write_run(tmp_path / "runs/second", speech_rows([hyp for _, hyp in SPEECH]))
    with pytest.raises(RepeatedRunsError, match=r"corpus speech answered by m1 is in 2 outputs \(.*first/speech, .*second/speech\)"):
        score(str(tmp_path / "runs"), str(tmp_path / "scores"), distributed=False)
    write_run(tmp_path / "models/m1", speech_rows([hyp for _, hyp in SPEECH]))
    write_run(tmp_path / "models/m2", speech_rows([hyp for _, hyp in SPEECH], model="m2"))
    groups = score(str(tmp_path / "models"), str(tmp_path / "scores"), distributed=False)
    assert sorted((group["model"], group["items"]) for group in groups) == [("m1", 4), ("m2", 4)]
    (group,) = score(first, str(tmp_path / "scores"), distributed=False)  # one output alone
    assert group["items"] == 4
