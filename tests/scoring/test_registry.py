"""The metric registry: a metric registered once (here a toy, the answer's words per item and their mean
over the corpus) is computed, written and reported everywhere the built-in ones are, by either scorer."""

import json
from collections.abc import Sequence

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs.metrics import registry
from jobs.metrics.registry import Metric, Source, register, registered
from jobs.rescore import rescore
from jobs.scoring.item_scores import items_schema
from jobs.scoring.scorer import score
from tests.scoring.test_score import SPEECH, speech_rows, write_run


def answer_words(references: Sequence[Sequence[str]], answers: Sequence[str]) -> list[float]:
    return [float(len(answer.split())) for answer in answers]


@pytest.fixture
def answer_length(monkeypatch: pytest.MonkeyPatch) -> Metric:
    """The toy metric, registered into a copy of the registry that the test's end puts back as it was."""
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    return register(Metric("answer_words", "asr", "answer words", "lower", Source.ITEM_MEAN, item_values=answer_words))


def items(scores) -> dict[str, dict]:
    table = ds.dataset(str(scores / "items.parquet"), format="parquet", schema=items_schema(registered())).to_table()
    return {item["id"]: item for item in table.to_pylist()}


def test_a_registered_metric_reaches_every_output_and_the_comparison(tmp_path, answer_length):
    run_a = write_run(tmp_path / "a", speech_rows([hyp for _, hyp in SPEECH]))  # 4, 4 and 1 words; utt-3 failed
    run_b = write_run(tmp_path / "b", speech_rows(["one", "two", "three four five six seven eight"], model="m2"))
    document = rescore({"base": run_a, "new": run_b}, str(tmp_path / "cmp"))
    scores = tmp_path / "cmp/runs/base"
    metrics = {r["metric"]: r["value"] for r in pq.read_table(scores / "metrics.parquet").to_pylist() if r["worker"] is None}
    assert metrics["answer_words"] == 3.0 and metrics["wer"] == pytest.approx(1 / 3)
    assert json.loads((scores / "metrics.json").read_text())["groups"][0]["quality"]["answer_words"] == 3.0
    assert {item_id: item["answer_words"] for item_id, item in items(scores).items()} == {
        "utt-0": 4.0, "utt-1": 4.0, "utt-2": 1.0, "utt-3": None}
    report = (scores / "report.md").read_text().splitlines()
    (header,) = [line for line in report if line.startswith("| corpus | task | model |")]
    (line,) = [line for line in report if line.startswith("| speech | asr | m1 | 4 | 1 | 3 | 0 | 33.3 |")]
    assert header.endswith("| answer words ↓ |") and line.endswith("| 3 |")
    (compared,) = [row for row in document["comparison"] if row["metric"] == "answer_words"]
    assert (compared["baseline_value"], compared["value"]) == (3.0, pytest.approx(8 / 3))


def test_ray_data_scores_a_registered_metric_as_the_in_process_scorer(local_ray, tmp_path, answer_length):
    run = write_run(tmp_path / "run", speech_rows([hyp for _, hyp in SPEECH]))
    (in_process,) = score(run, str(tmp_path / "in-process"), distributed=False)
    (on_ray,) = score(run, str(tmp_path / "ray-data"), distributed=True)
    assert on_ray["quality"] == in_process["quality"] and in_process["quality"]["answer_words"] == 3.0
    assert items(tmp_path / "ray-data") == items(tmp_path / "in-process")
