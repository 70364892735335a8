"""jobs.training.driver.choose_checkpoint: a run's checkpoint is chosen by its WER on the validation manifest
(the real-speech development set), never by recency where validation records exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.training.config import RunSection
from jobs.training.driver import choose_checkpoint
from jobs.training.worker import VALIDATION_FILE
from nota_model.errors import ConfigError


def _run(tmp_path: Path, validations: dict[int, dict | None]) -> RunSection:
    """A run folder with one checkpoint per step, each with `validation.json` holding those metrics (None: not
    validated), and a Ray Train file beside them."""
    root = tmp_path / "runs" / "dev"
    for step, metrics in validations.items():
        checkpoint = root / f"checkpoint_{step:08d}"
        checkpoint.mkdir(parents=True)
        if metrics is not None:
            (checkpoint / VALIDATION_FILE).write_text(json.dumps({"step": step, "metrics": metrics, "predictions": []}))
    root.mkdir(parents=True, exist_ok=True)
    (root / "checkpoint_tmp_ray").mkdir()
    return RunSection(name="dev", storage_path=str(tmp_path / "runs"), max_steps=400)


def test_the_lowest_dev_wer_is_chosen_the_later_of_equals_and_unvalidated_ones_never(tmp_path):
    # 600 has no answer WER: a CTC WER is not compared with answer WERs
    run = _run(tmp_path, {100: {"val/wer": 0.5}, 200: {"val/wer": 0.3}, 300: {"val/wer": 0.3, "val/ctc_wer": 0.1},
                          400: None, 500: {"val/wer": 0.4}, 600: {"val/ctc_wer": 0.05}})
    chosen = choose_checkpoint(run)
    assert (chosen["step"], chosen["chosen_by"], chosen["value"]) == (300, "val/wer", 0.3)
    assert Path(chosen["checkpoint"]).name == "checkpoint_00000300"


def test_a_stage_that_decodes_no_text_is_chosen_by_its_ctc_wer(tmp_path):
    run = _run(tmp_path, {100: {"val/ctc_wer": 0.8, "val/wer": None}, 200: {"val/ctc_wer": 0.6}, 300: {"val/ctc_wer": 0.7}})
    assert (choose_checkpoint(run)["step"], choose_checkpoint(run)["chosen_by"]) == (200, "val/ctc_wer")


def test_without_validation_the_latest_checkpoint_is_chosen_and_without_checkpoints_it_is_an_error(tmp_path):
    assert choose_checkpoint(_run(tmp_path / "a", {100: None, 200: None})) | {"checkpoint": None} == {
        "step": 200, "checkpoint": None, "chosen_by": "latest", "value": None}
    with pytest.raises(ConfigError, match="no checkpoint"):
        choose_checkpoint(_run(tmp_path / "b", {}))
