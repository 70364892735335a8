"""jobs.train on Ray Train: two gloo workers overfit a handful of real clips, the checkpoint loads for
inference and gives the trainer's own outputs, and a run resumes after worker and driver failures with
the loss curve of an uninterrupted run."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest
import soundfile as sf
import torch

from jobs.samples import default_dest, fetch_librivox
from jobs.training.config import TrainConfig, load_train_config
from jobs.training.driver import run, storage
from jobs.training.logger import MetricsLogger
from jobs.training.worker import SEED_FILE, STATE_FILE, VALIDATION_FILE, WEIGHTS_FILE
from nota_model.audio import load_audio
from nota_model.build import load_model
from nota_model.checkpoint import read_state_dict
from nota_model.config import DecodingConfig, load_config
from nota_model.errors import ConfigError
from tests.s3 import CREDENTIALS, moto_server, s3_filesystem

# The tiny preset with random weights, made learnable in a few dozen CPU steps: random Whisper and
# Q-Former at their default init give every clip nearly the same audio tokens (the audio is a 1 % ripple
# on the positional embeddings), and the tied random embeddings at std 0.02 cap the logits at about 1.3,
# so the loss could not fall below about 10.6. Larger inits and a LoRA on every projection fix both.
LEARNABLE_TINY = {
    "speech_encoder": {"hf_config": {"init_std": 0.5}},
    "qformer": {"initializer_range": 0.2},
    "llm": {"hf_config": {"initializer_range": 0.2}},
    "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}


def _manifest(path: Path, items: list[dict]) -> str:
    (path / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (path / "corpus.yaml").write_text("name: overfit\ntask: asr\nitems: items.jsonl\n")
    return str(path / "corpus.yaml")


def _config(tmp_path: Path, manifest: str, name: str, validate_every: int | None = None, logging: dict | None = None,
            **run: object) -> TrainConfig:
    """Validation on the training clips themselves (overfitting is the check)."""
    return TrainConfig.model_validate({
        "logging": logging or {},
        "model": {"config": "tiny", "overrides": LEARNABLE_TINY},
        "datasets": {"train": [manifest], "validation": {"manifest": manifest, "batch_size": 4, "every_steps": validate_every,
                                                          "decoding": {"num_beams": 1, "max_new_tokens": 40}}},
        "run": {"name": name, "storage_path": str(tmp_path / "runs"), "num_workers": 2, "use_gpu": False,
                "batch_size": 2, "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "weight_decay": 0.0},
                "schedule": {"warmup_steps": 3}, "max_failures": 0, **run},
    })


def _state(checkpoint: str) -> dict:
    return torch.load(Path(checkpoint) / STATE_FILE, weights_only=True)


@pytest.fixture(scope="module")
def librivox() -> list[dict]:
    items = [json.loads(line) for line in fetch_librivox(default_dest()).read_text().splitlines()]
    return [items[i] for i in (1, 2, 3, 4)]  # four clips; the fifth's 23-word transcript needs more steps


def test_two_workers_overfit_real_clips_and_the_checkpoint_serves_inference(local_ray, tmp_path, librivox):
    steps = 50
    # 4 clips, 2 workers x 2 a step: an epoch is one step. Validate and save at the end only.
    config = _config(tmp_path, _manifest(tmp_path, librivox), "overfit", validate_every=steps, max_steps=steps,
                     checkpoint_every_steps=steps, seed_checkpoint=True, log_every_steps=10)
    summary = run(config)

    checkpoint = summary["checkpoint"]
    assert Path(checkpoint).name == f"checkpoint_{steps:08d}"
    losses = [entry["loss"] for entry in _state(checkpoint)["history"]]
    assert len(losses) == steps
    print("loss curve:", [round(loss, 3) for loss in losses])
    assert losses[0] > 10 and losses[-1] < losses[0] / 4, losses

    validation = json.loads((Path(checkpoint) / VALIDATION_FILE).read_text())
    predictions = {row["id"]: row["text"] for row in validation["predictions"]}
    references = {item["id"]: item["reference"] for item in librivox}
    print("predictions:", predictions)
    exact = [predictions[i] == references[i] for i in references]
    assert sum(exact) >= 3, predictions
    assert all(predictions[i].split()[:3] == references[i].split()[:3] for i in references), predictions
    assert validation["metrics"]["val/wer"] < 0.1
    assert summary["metrics"]["val/wer"] == validation["metrics"]["val/wer"]
    assert summary["metrics"]["samples_per_s"] > 0 and "max_rss_gb" in summary["metrics"]

    # The inference side loads the trainer's checkpoint (safetensors and the seed's .pth) and says the same.
    model_config = load_config("tiny", LEARNABLE_TINY)
    clips = [load_audio(item["audio"], model_config.audio) for item in librivox]
    prompts = [model_config.prompt.task_prompt("asr")] * len(clips)
    decoding = DecodingConfig(num_beams=1, max_new_tokens=40)
    for name in (WEIGHTS_FILE, SEED_FILE):
        loaded = load_model(model_config, checkpoint=f"{checkpoint}/{name}", device="cpu")
        texts = loaded.model.generate(clips, prompts, decoding).texts
        assert texts == [predictions[item["id"]] for item in librivox]

    logs = Path(summary["log_dir"])
    assert list((logs / "tensorboard").glob("events.out.tfevents.*"))
    progress = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in progress] == [10, 20, 30, 40, 50]
    assert all(row["steps_per_s"] > 0 and row["lr"] > 0 for row in progress)


def _synthetic_manifest(path: Path) -> str:
    items = []
    for number, answer in enumerate(["one two", "three four five", "six", "seven eight"]):
        t = np.arange(16000) / 16000
        audio = (0.3 * np.sin(2 * np.pi * (200 + 150 * number) * t)).astype(np.float32)
        sf.write(path / f"clip{number}.wav", audio, 16000)
        items.append({"id": f"clip{number}", "audio": str(path / f"clip{number}.wav"), "reference": answer})
    return _manifest(path, items)


def test_a_resumed_run_on_s3_continues_with_the_uninterrupted_loss_curve(local_ray, tmp_path):
    manifest = _synthetic_manifest(tmp_path)
    settings = {"validate_every": 6, "max_steps": 6, "batch_size": 1, "checkpoint_every_steps": 2, "log_every_steps": 1}
    whole = run(_config(tmp_path, manifest, "whole", **settings))

    with moto_server() as endpoint:
        # Ray workers do not see this process's test credentials: the storage options carry them.
        options = {**endpoint, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
        fs = s3_filesystem(options)
        fs.mkdir("train-checkpoints")
        # A worker dies at step 3: Ray Train restarts the group from the step-2 checkpoint. A second failure
        # at step 5 exceeds max_failures and fails the driver's fit; the same command again resumes from step 4.
        interrupted = _config(tmp_path, manifest, "interrupted", logging={"dir": str(tmp_path / "logs")}, **{
            **settings, "max_failures": 1, "storage_path": "s3://train-checkpoints/runs", "storage_options": options})
        markers = str(tmp_path / "failed")
        with pytest.raises(Exception, match="injected failure at step 5"):
            run(interrupted, fail_at_steps=[3, 5], fail_marker=markers)
        assert Path(f"{markers}-3").exists() and Path(f"{markers}-5").exists()
        resumed = run(interrupted)
        assert resumed["checkpoint"] == "s3://train-checkpoints/runs/interrupted/checkpoint_00000006"
        fs.get(resumed["checkpoint"] + "/", str(tmp_path / "downloaded") + "/", recursive=True)
        assert fs.exists("train-checkpoints/runs/interrupted/logs/metrics.jsonl")

    expected, got = _state(whole["checkpoint"]), _state(str(tmp_path / "downloaded"))
    assert got["step"] == expected["step"] == 6
    assert [h["step"] for h in got["history"]] == list(range(1, 7))
    np.testing.assert_allclose([h["loss"] for h in got["history"]], [h["loss"] for h in expected["history"]], rtol=1e-5)
    np.testing.assert_allclose([h["lr"] for h in got["history"]], [h["lr"] for h in expected["history"]], rtol=1e-9)
    whole_weights = read_state_dict(Path(whole["checkpoint"]) / WEIGHTS_FILE)
    resumed_weights = read_state_dict(tmp_path / "downloaded" / WEIGHTS_FILE)
    assert whole_weights.keys() == resumed_weights.keys()
    for key, value in whole_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=1e-5, atol=1e-6)


def test_config_errors_name_the_problem(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("datasets: {train: [m.yaml]}\nrun: {name: x, storage_path: /tmp/x, epochs: 1, max_steps: 3}\n")
    with pytest.raises(ConfigError, match="exactly one of run.epochs and run.max_steps"):
        load_train_config(str(path))
    path.write_text("datasets: {train: [m.yaml], prompts: {asr: [no placeholder]}}\nrun: {name: x, storage_path: /tmp/x, epochs: 1}\n")
    with pytest.raises(ConfigError, match="SpeechHere"):
        load_train_config(str(path))
    path.write_text("datasets: {train: [m.yaml]}\nrun: {name: x, storage_path: /tmp/x, epochs: 1, bogus: 1}\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_train_config(str(path))
    path.write_text("model: {config: tiny}\ndatasets: {train: [m.yaml]}\nrun: {name: x, storage_path: /tmp/x, max_steps: 3}\n")
    config = load_train_config(str(path), {"run": {"max_steps": 7}})
    assert config.run.max_steps == 7 and config.model.config == "tiny" and config.run.optimizer.lr == 1e-4
    for option in ({"lora": {"merge": True}}, {"llm": {"quantization": "int8"}}):  # inference recipes do not train
        with pytest.raises(ConfigError, match="inference options"):
            load_train_config(str(path), {"model": {"overrides": option}}).model.load()
    assert load_train_config(str(path), {"model": {"overrides": {"qformer": {"pool_tokens": 2}}}}).model.load().qformer.pool_tokens == 2


def test_shipped_training_configs_are_valid():
    for path in sorted(Path(__file__).parents[2].glob("configs/train-*.yaml")):
        config = load_train_config(str(path))
        assert config.model.load().model_kind == "nota", path


@pytest.mark.parametrize("stages, count", [("nota-small-[0-9]-*.yaml", 6), ("nota-small-v2-*.yaml", 2)])  # v1's, v2's
def test_nota_small_stages_start_from_earlier_stages_and_not_from_the_weights_they_ship(stages, count):
    # A stage that started from the shipped file would train on from its own output when run again; and each
    # starts from a checkpoint an earlier stage writes (out/train/RUN/checkpoint_STEP/...).
    runs = {}
    for path in sorted(Path(__file__).parents[2].glob(f"configs/{stages}")):
        config = load_train_config(str(path))
        model = config.model.load()
        assert model.name == "nota-small" and model.trained_weights is None, path
        if runs:
            run, step = Path(config.model.checkpoint).parts[-3:-1]
            assert step.startswith("checkpoint_") and int(step.removeprefix("checkpoint_")) <= runs.get(run, -1), path
        runs[config.run.name] = config.run.max_steps
    assert len(runs) == count


def test_metrics_go_to_jsonl_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, values, step):
            calls.setdefault("log", []).append((step, values))

        def finish(self):
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.update(init=kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = TrainConfig.model_validate({
        "datasets": {"train": ["m.yaml"]},
        "run": {"name": "logged", "storage_path": str(tmp_path / "runs"), "max_steps": 3},
        "logging": {"wandb": {"enabled": True, "mode": "offline", "project": "p"}},
    })
    logger = MetricsLogger(config)
    logger.log(3, {"step": 3, "loss": 1.5, "lr": 1e-4, "val/wer": 0.2, "val/caption_error": "no java"})
    logger.close()
    assert config.log_dir() == tmp_path / "runs" / "logged" / "logs"
    assert json.loads((config.log_dir() / "metrics.jsonl").read_text())["loss"] == 1.5
    assert list((config.log_dir() / "tensorboard").glob("events.out.tfevents.*"))
    assert calls["init"]["mode"] == "offline" and calls["init"]["id"] == "logged" and calls["init"]["resume"] == "allow"
    assert calls["log"] == [(3, {"train/loss": 1.5, "train/lr": 1e-4, "val/wer": 0.2})] and calls["finished"]


def test_object_storage_goes_through_a_pyarrow_filesystem():
    config = TrainConfig.model_validate({"datasets": {"train": ["m.yaml"]}, "run": {
        "name": "r", "storage_path": "memory://bucket/runs", "max_steps": 1}})
    path, filesystem = storage(config.run)
    assert path == "/bucket/runs" and isinstance(filesystem, pyarrow.fs.PyFileSystem)
    assert config.log_dir().parts[-3:] == ("train", "r", "logs")
    local = config.run.model_copy(update={"storage_path": "out/runs"})
    assert storage(local) == (str(Path("out/runs").absolute()), None)
