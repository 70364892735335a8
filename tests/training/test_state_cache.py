"""Training from cached encoder states: the cache holds exactly what inference computes, resumes shard by shard,
refuses another encoder's states; the CTC head's loss and greedy decoding; stages that freeze trained parts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from jobs.corpus.make import build_shards
from jobs.corpus.manifest_schema import Manifest, load_manifest
from jobs.samples import default_dest, fetch_librivox
from jobs.training.config import TrainConfig
from jobs.training.driver import publish, run
from jobs.training.state_cache import DONE_FILE, CachedStates, build_cache, cached_training_rows
from jobs.training.objective import CTC_HEAD_FILE
from jobs.training.worker import STATE_FILE
from nota_model.audio import load_audio
from nota_model.build import load_model
from nota_model.checkpoint import read_state_dict
from nota_model.config import load_config
from nota_model.errors import ConfigError
from nota_model.training import CTCHead, ctc_greedy, ctc_loss, prepare_for_training

SPEECH_ONLY = {"audio_encoder": {"kind": "none"}, "speech_encoder": {"audio_context": {"mode": "clip", "margin_seconds": 0.5}}}


@pytest.fixture(scope="module")
def speech_only():
    return load_model(load_config("tiny", SPEECH_ONLY)).model


@pytest.fixture(scope="module")
def librivox_manifest(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("librivox")
    items = fetch_librivox(default_dest())
    (directory / "corpus.yaml").write_text(f"name: librivox\ntask: asr\nitems: {items}\nitems_per_shard: 2\n")
    return str(directory / "corpus.yaml")


def test_cached_states_are_what_inference_computes_and_the_cache_resumes(speech_only, librivox_manifest, tmp_path):
    manifest = load_manifest(librivox_manifest)
    assert build_cache(speech_only, manifest, tmp_path) == {"cached": 5}
    cache = CachedStates.open(tmp_path, speech_only.config)
    assert [row["shard"] for row in cache.rows] == [0, 0, 1, 1, 2]
    items = {item["id"]: item for item in manifest.work_items().to_pylist()}
    for row in cache.rows:
        clip = load_audio(Path(items[row["id"]]["audio"]).read_bytes(), speech_only.config.audio)
        (expected,) = speech_only.speech_states([clip])
        assert torch.equal(cache.states(row), expected.half().float())
        assert row["reference"] == items[row["id"]]["reference"]
        with torch.no_grad():
            (tokens,) = speech_only.tokens_from_speech_states([expected])
        assert torch.equal(tokens, speech_only.audio_tokens([clip])[0])

    (tmp_path / "index-00001.parquet").unlink()  # a build killed in shard 1
    (tmp_path / DONE_FILE).unlink()
    before = (tmp_path / "states-00000.f16").stat().st_mtime_ns
    assert build_cache(speech_only, manifest, tmp_path) == {"cached": 5}
    assert (tmp_path / "states-00000.f16").stat().st_mtime_ns == before  # finished shards are kept
    assert len(CachedStates.open(tmp_path, speech_only.config).rows) == 5
    rows = cached_training_rows([cache])
    assert [row["answer"] for row in rows] == [ref for row in cache.rows for ref in row["reference"]]


def test_a_tar_corpus_is_cached_from_its_stream_and_ids_stay_unique_across_the_corpus_when_resumed(speech_only, tmp_path):
    clips = [json.loads(line) for line in fetch_librivox(default_dest()).read_text().splitlines()[:2]]
    folder = tmp_path / "audio"
    folder.mkdir()
    for name, clip in zip(("a", "b"), clips):
        shutil.copy(clip["audio"], folder / f"{name}.wav")
        (folder / f"{name}.txt").write_text(clip["reference"])
    tar_corpus = load_manifest(build_shards(folder, None, "two", "asr", str(tmp_path / "two"), items_per_shard=1))
    rows = [{"id": "a", "audio": clips[0]["audio"], "reference": "x"}] * 2  # the second one is a duplicate
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    item_list = Manifest(name="list", task="asr", items=str(tmp_path / "list.jsonl"), items_per_shard=1)

    assert build_cache(speech_only, tar_corpus, tmp_path / "tar") == {"cached": 2}
    cache = CachedStates.open(tmp_path / "tar", speech_only.config)
    for row, clip in zip(cache.rows, clips):
        (expected,) = speech_only.speech_states([load_audio(Path(clip["audio"]).read_bytes(), speech_only.config.audio)])
        assert torch.equal(cache.states(row), expected.half().float())
    assert build_cache(speech_only, item_list, tmp_path / "list") == {"cached": 1, "duplicate_id": 1}
    (tmp_path / "list" / "index-00001.parquet").unlink()
    (tmp_path / "list" / DONE_FILE).unlink()
    assert build_cache(speech_only, item_list, tmp_path / "list") == {"cached": 1, "duplicate_id": 1}


def test_a_cache_of_another_set_up_is_refused(speech_only, librivox_manifest, tmp_path):
    build_cache(speech_only, load_manifest(librivox_manifest), tmp_path)
    other = load_config("tiny", {**SPEECH_ONLY, "speech_encoder": {"audio_context": {"mode": "full"}}})
    with pytest.raises(ConfigError, match="another encoder"):
        CachedStates.open(tmp_path, other)
    with pytest.raises(ConfigError, match="holds no feature cache"):
        CachedStates.open(tmp_path / "nothing", other)


def test_states_do_not_stand_in_for_a_ced_branch(tiny):
    with pytest.raises(ConfigError, match="CED"):
        tiny.model.tokens_from_speech_states([torch.zeros(50, tiny.model.config.speech_encoder.width)])


def test_the_ctc_head_teaches_the_connector_to_spell_the_answer(speech_only):
    """A few hundred CTC steps on two clips of random-weight states: the connector alone (no LLM) then spells
    both answers, and the sampled vocabulary gives the full vocabulary's loss when it holds every token."""
    torch.manual_seed(0)
    model = speech_only
    trained = prepare_for_training(model, frozen=["lora"])
    assert trained and not any("lora" in name for name in trained)
    states = [torch.randn(150, model.config.speech_encoder.width), torch.randn(200, model.config.speech_encoder.width)]
    answers = ["ten of clubs", "he was not an ill disposed young man"]
    head = CTCHead(model.llama_model.get_input_embeddings().embedding_dim)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    first = None
    for _ in range(100):
        loss = ctc_loss(model, head, model.tokens_from_speech_states(states), answers, negatives=256)
        first = first or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 10
    model.eval()
    with torch.no_grad():
        tokens = model.tokens_from_speech_states(states)
        assert ctc_greedy(model, head, tokens) == answers
        vocabulary = len(model.llama_model.get_input_embeddings().weight)
        full = ctc_loss(model, head, tokens, answers, negatives=0)
        torch.manual_seed(1)
        everything = ctc_loss(model, head, tokens, answers, negatives=20 * vocabulary)
    assert everything.item() == pytest.approx(_full_vocabulary_ctc(model, head, tokens, answers), rel=1e-5)
    assert full.item() <= everything.item()  # fewer competitors, lower loss


def _full_vocabulary_ctc(model, head, tokens, answers) -> float:
    embeddings = model.llama_model.get_input_embeddings().weight
    targets = [model.tokenizer(answer, add_special_tokens=False).input_ids for answer in answers]
    log_probs = torch.nn.utils.rnn.pad_sequence([head.log_probs(item, embeddings) for item in tokens])
    return torch.nn.functional.ctc_loss(
        log_probs, torch.tensor(sum(targets, [])), torch.tensor([len(t) for t in tokens]),
        torch.tensor([len(t) for t in targets]), blank=len(embeddings), zero_infinity=True).item()


def test_jobs_train_runs_the_stages_from_the_cache(local_ray, librivox_manifest, tmp_path, monkeypatch):
    """Stage 1 (CTC only, LoRA frozen) then stage 2 (answer and CTC) from its weights, through Ray Train and the
    feature cache that stage 1's driver builds: the CTC head is saved beside the weights and validated.
    The cache's, the checkpoint's and the storage's paths are relative to the driver's working directory, which
    the workers do not share."""
    monkeypatch.chdir(tmp_path)

    def config(name: str, objective: dict, checkpoint: str | None = None) -> TrainConfig:
        return TrainConfig.model_validate({
            "model": {"config": "tiny", "overrides": SPEECH_ONLY, "checkpoint": checkpoint},
            "datasets": {"train": [librivox_manifest], "feature_cache": "features",
                         "validation": {"manifest": librivox_manifest, "decoding": {"max_new_tokens": 8}}},
            "objective": objective,
            "run": {"name": name, "storage_path": "runs", "max_steps": 3, "batch_size": 2,
                    "use_gpu": False, "max_failures": 0, "schedule": {"warmup_steps": 1}},
        })

    def stage(name: str, objective: dict, checkpoint: str | None = None) -> dict:
        return run(config(name, objective, checkpoint))

    first = stage("connector", {"answer_weight": 0, "ctc_weight": 1, "frozen": ["lora"]})
    assert (tmp_path / "features" / "librivox" / DONE_FILE).exists()
    assert (tmp_path / "runs" / "connector" / "logs" / "metrics.jsonl").exists()
    assert (Path(first["checkpoint"]) / CTC_HEAD_FILE).exists()
    assert 0 <= first["metrics"]["val/ctc_wer"] and "val/wer" not in first["metrics"]
    assert (first["chosen"]["chosen_by"], first["chosen"]["value"]) == ("val/ctc_wer", first["metrics"]["val/ctc_wer"])
    history = torch.load(Path(first["checkpoint"]) / STATE_FILE, weights_only=True)["history"]
    assert [row["loss"] for row in history] == [None] * 3 and all(row["ctc_loss"] > 0 for row in history)

    second = stage("reader", {"answer_weight": 1, "ctc_weight": 0.5, "frozen": ["lora"]}, os.path.relpath(first["weights"]))
    assert {"val/wer", "val/ctc_wer", "val/loss"} <= set(second["metrics"])
    assert (second["chosen"]["chosen_by"], second["chosen"]["step"]) == ("val/wer", 3)
    head = read_state_dict(Path(second["checkpoint"]) / CTC_HEAD_FILE)
    assert not torch.equal(head["blank"], read_state_dict(Path(first["checkpoint"]) / CTC_HEAD_FILE)["blank"])
    # --publish: the run's chosen checkpoint (Ray Train's own files beside it are no checkpoint), in float16
    published = publish(config("reader", {"answer_weight": 1}), "shipped.safetensors")
    assert published["step"] == 3 and Path(published["checkpoint"]).name == "checkpoint_00000003"
    assert {tensor.dtype for tensor in read_state_dict(tmp_path / "shipped.safetensors").values()} == {torch.float16}
