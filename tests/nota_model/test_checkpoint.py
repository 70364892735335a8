import os
import stat

import pytest
import torch
from transformers import AutoTokenizer, WhisperConfig, WhisperModel

from nota_model.build import build_audio_encoder, load_model, save_trained
from nota_model.ced import CEDEncoder
from nota_model.checkpoint import publish_trained, read_checkpoint, save_state_dict
from nota_model.errors import CheckpointError, ConfigError, WeightsNotFoundError
from tests.conftest import make_clip

SEED_KEYS = [
    "speech_query_tokens",
    "ln_speech.weight",
    "ln_audio.bias",
    "speech_llama_proj.weight",
    "speech_Qformer.bert.embeddings.LayerNorm.weight",
    "speech_Qformer.bert.encoder.layer.0.attention.self.query.weight",
    "speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight",
    "speech_Qformer.bert.encoder.layer.1.intermediate_query.dense.weight",
    "speech_Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias",
    "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
    "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight",
    "llama_model.base_model.model.model.layers.1.mlp.gate_proj.lora_A.default.weight",
]


def trained_with_noise(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in model.trained_state_dict().items()}


def seed_style_checkpoint(model, trained):
    """What the seed's saver wrote: trained parameters (mixed fp16/fp32) plus unfiltered leftovers."""
    state = {k: (v.half() if i % 2 else v) for i, (k, v) in enumerate(trained.items())}
    state["llama_model.base_model.model.lm_head.weight"] = model.llama_model.get_output_embeddings().weight.detach().half()
    state["speech_Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    for key, value in model.ced.state_dict().items():
        state[f"ced.{key}"] = value.clone()
    state["ced.outputlayer.1.weight"] = torch.zeros(527, 32)
    run_config = {
        "model": {"second_per_window": 0.333333, "second_stride": 0.333333, "lora_rank": 4, "lora_alpha": 16,
                  "end_sym": "<|im_end|>", "prompt_template": "USER: {}\nASSISTANT:", "llama_path": "/data/qwen"},
        "run": {"epochs": 30},
    }
    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "config": run_config, "epoch": 29}


def test_trained_keys_carry_the_seed_names(tiny):
    keys = set(tiny.model.trained_state_dict())
    assert set(SEED_KEYS) <= keys
    assert not any(k.startswith(("speech_encoder.", "ced.")) for k in keys)


def test_seed_pth_loads_safely_and_reports_what_it_ignored(tiny_config, tmp_path):
    model = load_model(tiny_config, device="cpu").model
    trained = trained_with_noise(model)
    path = tmp_path / "checkpoint_best.pth"
    torch.save(seed_style_checkpoint(model, trained), path)
    loaded = load_model(tiny_config, checkpoint=str(path), device="cpu")
    report = loaded.checkpoint_report
    assert "llama_model.base_model.model.lm_head.weight" in report.ignored
    assert "speech_Qformer.bert.embeddings.position_ids" in report.ignored
    assert "ced.outputlayer.1.weight" in report.ignored
    assert "ced.init_bn.1.running_mean" in report.loaded
    for key, value in loaded.model.trained_state_dict().items():
        expected = trained[key].half().float() if list(trained).index(key) % 2 else trained[key]
        torch.testing.assert_close(value, expected)
    assert loaded.identity.startswith("tiny+ckpt:sha256:") and len(loaded.checkpoint_sha256) == 64


def test_a_checkpoint_trained_with_other_windows_or_prompts_is_refused(tiny_config, tmp_path):
    model = load_model(tiny_config, device="cpu").model
    checkpoint = seed_style_checkpoint(model, trained_with_noise(model))
    checkpoint["config"]["model"].update(second_per_window=0.2525, end_sym="</s>")
    torch.save(checkpoint, tmp_path / "other_windows.pth")
    with pytest.raises(CheckpointError, match=r"second_per_window: trained with 0.2525.*end_sym: trained with '</s>'"):
        load_model(tiny_config, checkpoint=str(tmp_path / "other_windows.pth"), device="cpu")
    save_trained(model, tmp_path / "ours.safetensors")
    with pytest.raises(CheckpointError, match="lora_rank: trained with 4, config has 2"):
        load_model(tiny_config.with_overrides({"lora": {"r": 2}}), checkpoint=str(tmp_path / "ours.safetensors"), device="cpu")


def test_safetensors_round_trip_gives_the_same_outputs(tiny_config, tmp_path):
    first = load_model(tiny_config, device="cpu").model
    first.load_state_dict(trained_with_noise(first), strict=False)
    save_trained(first, tmp_path / "trained.safetensors")
    second = load_model(tiny_config, checkpoint=str(tmp_path / "trained.safetensors"), device="cpu").model
    clips = [make_clip(2.0)]
    prompts = [tiny_config.prompt.task_prompt("asr")]
    fresh = load_model(tiny_config, device="cpu").model
    assert (fresh.next_token_logits(clips, prompts) - first.next_token_logits(clips, prompts)).abs().max() > 1e-3
    torch.testing.assert_close(second.next_token_logits(clips, prompts), first.next_token_logits(clips, prompts))


def test_weights_are_written_to_regular_files_only(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # like /dev/null: not a file that safetensors may replace
    for target in (fifo, tmp_path):
        with pytest.raises(CheckpointError, match="not a regular file"):
            save_state_dict({"w": torch.zeros(2)}, target)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_published_weights_are_float16_keep_their_settings_and_load_as_the_configs_own(tiny_config, tmp_path):
    trained = load_model(tiny_config, device="cpu").model
    trained.load_state_dict(trained_with_noise(trained), strict=False)
    save_trained(trained, tmp_path / "trained.safetensors")
    publish_trained(tmp_path / "trained.safetensors", tmp_path / "shipped.safetensors", {"run": "r", "step": "7"})
    shipped = read_checkpoint(tmp_path / "shipped.safetensors")
    assert {tensor.dtype for tensor in shipped.tensors.values()} == {torch.float16}
    assert shipped.trained_with == read_checkpoint(tmp_path / "trained.safetensors").trained_with
    config = tiny_config.with_overrides({"trained_weights": str(tmp_path / "shipped.safetensors")})
    loaded = load_model(config, device="cpu")  # no checkpoint given: the config's own
    assert "Q-Former, projection and LoRA" not in loaded.random_parts and "+ckpt:sha256:" in loaded.identity
    clips, prompts = [make_clip(2.0)], [tiny_config.prompt.task_prompt("asr")]
    torch.testing.assert_close(loaded.model.next_token_logits(clips, prompts), trained.next_token_logits(clips, prompts),
                               atol=2e-2, rtol=0)


def test_checkpoint_errors_are_specific(tiny_config, tmp_path):
    model = load_model(tiny_config, device="cpu").model
    trained = trained_with_noise(model)

    missing = dict(trained)
    del missing["speech_llama_proj.weight"]
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="1 missing: speech_llama_proj.weight"):
        load_model(tiny_config, checkpoint=str(tmp_path / "missing.pth"), device="cpu")

    wider = load_model(tiny_config.with_overrides({"qformer": {"hidden_size": 32, "intermediate_size": 64}}), device="cpu")
    torch.save({"model": wider.model.trained_state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="another architecture.*wrong shape"):
        load_model(tiny_config, checkpoint=str(tmp_path / "other.pth"), device="cpu")

    no_lora = tiny_config.with_overrides({"lora": {"enabled": False}})
    torch.save({"model": trained}, tmp_path / "lora.pth")
    with pytest.raises(CheckpointError, match="unexpected: llama_model.*lora"):
        load_model(no_lora, checkpoint=str(tmp_path / "lora.pth"), device="cpu")

    (tmp_path / "cut.pth").write_bytes((tmp_path / "lora.pth").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(tiny_config, checkpoint=str(tmp_path / "cut.pth"), device="cpu")

    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_model(tiny_config, checkpoint=str(tmp_path / "nowhere.pth"), device="cpu")


class Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_objects_are_never_unpickled(tiny_config, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"speech_query_tokens": torch.zeros(1)}, "extra": Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_model(tiny_config, checkpoint=str(tmp_path / "evil.pth"), device="cpu")
    assert not marker.exists()


def test_components_load_from_their_own_weights(tiny_config, tmp_path):
    whisper = WhisperModel(WhisperConfig(**tiny_config.speech_encoder.hf_config, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64))
    whisper.save_pretrained(tmp_path / "whisper")
    ced = CEDEncoder(tiny_config.audio_encoder)
    published = {k: v for k, v in ced.state_dict().items() if not k.startswith("front_end.fbank")}
    published["time_pos_embed"] = published["time_pos_embed"][..., :63].clone()  # a 10 s checkpoint
    torch.save({**published, "outputlayer.1.weight": torch.zeros(527, 32)}, tmp_path / "ced.pt")
    config = tiny_config.with_overrides(
        {"speech_encoder": {"path": str(tmp_path / "whisper")}, "audio_encoder": {"path": str(tmp_path / "ced.pt")}}
    )
    model = load_model(config, device="cpu").model
    torch.testing.assert_close(model.speech_encoder.layers[1].fc1.weight, whisper.encoder.layers[1].fc1.weight)
    torch.testing.assert_close(model.ced.blocks[1].attn.qkv.weight, ced.blocks[1].attn.qkv.weight)
    assert model.ced.time_pos_embed.shape[-1] == 187

    with pytest.raises(ConfigError, match="d_model"):
        load_model(config.with_overrides({"speech_encoder": {"hf_config": {"d_model": 128}}}), device="cpu")
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3)}, tmp_path / "bad_ced.pt")
    with pytest.raises(CheckpointError, match="missing"):
        build_audio_encoder(config.audio_encoder.model_copy(update={"path": str(tmp_path / "bad_ced.pt")}))


def test_llm_loads_from_a_transformers_directory(tiny, tiny_config, tmp_path):
    base = tiny.model.llama_model.get_base_model()
    base.save_pretrained(tmp_path / "llm")
    tokenizer = AutoTokenizer.from_pretrained(tiny.model.tokenizer.name_or_path)
    tokenizer.save_pretrained(tmp_path / "llm")
    config = tiny_config.with_overrides({"llm": {"path": str(tmp_path / "llm"), "tokenizer": None}})
    model = load_model(config, device="cpu").model
    torch.testing.assert_close(model.llama_model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert len(model.tokenizer) == len(tiny.model.tokenizer)
