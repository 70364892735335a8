"""The float type by compute capability (monkeypatched: no GPU here): auto, bfloat16 checks, CTranslate2's compute
types, training's autocast and gradient scaler, the float16 warning for Qwen2, and pre-cast encoder weights."""

import json

import pytest
import torch

import jobs.inference.predict as predict
import nota_model.build as build
from jobs.predictions import OutputMismatchError, OutputStore
from jobs.inference.settings import JobSettings
from nota_model import load_config, load_model
from nota_model.config import DecodingConfig
from nota_model.errors import ConfigError
from nota_model.precision import (
    ct2_compute_type,
    float16_overflow_warning,
    llm_dtype,
    needs_grad_scaler,
    resolve_dtype,
    training_autocast_dtype,
)
from tests.conftest import make_clip

V100, A100, H200 = (7, 0), (8, 0), (9, 0)


def test_auto_is_bfloat16_from_capability_8_float16_below_float32_on_cpu():
    assert resolve_dtype("auto", H200) == resolve_dtype("auto", A100) == torch.bfloat16
    assert resolve_dtype("auto", V100) == resolve_dtype("auto", (7, 5)) == torch.float16
    assert resolve_dtype("auto", None) == torch.float32
    assert resolve_dtype("float16", H200) == torch.float16 and resolve_dtype("bfloat16", None) == torch.bfloat16


@pytest.mark.parametrize("check", [lambda: resolve_dtype("bfloat16", V100), lambda: ct2_compute_type("bfloat16", V100),
                                   lambda: ct2_compute_type("int8_bfloat16", (7, 5)),
                                   lambda: training_autocast_dtype("bfloat16", V100)])
def test_bfloat16_on_a_gpu_below_capability_8_is_a_config_error(check):
    with pytest.raises(ConfigError, match="compute capability 8.0 or above.* this one is 7.[05] .*use float16"):
        check()


def test_auto_keeps_an_overflowing_llm_out_of_float16_below_capability_8():
    assert llm_dtype("auto", V100, "qwen2") == llm_dtype("auto", (7, 5), "qwen3") == torch.float32
    assert llm_dtype("auto", V100, "llama") == torch.float16
    assert llm_dtype("auto", A100, "qwen2") == torch.bfloat16 and llm_dtype("auto", None, "qwen2") == torch.float32
    assert llm_dtype("float16", V100, "qwen2") == torch.float16, "asked for float16, it gets float16 (and a warning)"


def test_ctranslate2_compute_types():
    assert ct2_compute_type("auto", None) == "int8" and ct2_compute_type("auto", V100) == "float16"
    assert ct2_compute_type("int8_bfloat16", H200) == "int8_bfloat16" and ct2_compute_type("int8_float16", V100) == "int8_float16"


def test_training_autocast_and_gradient_scaler():
    assert training_autocast_dtype("auto", V100) == torch.float16 and training_autocast_dtype("auto", H200) == torch.bfloat16
    assert training_autocast_dtype("auto", None) is None and training_autocast_dtype("none", H200) is None
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        training_autocast_dtype("float16", None)
    assert needs_grad_scaler(torch.float16, torch.float32)
    assert needs_grad_scaler(torch.bfloat16, torch.float16), "a float16 LLM under bfloat16 autocast still underflows"
    assert needs_grad_scaler(None, torch.float16)
    assert not needs_grad_scaler(torch.bfloat16, torch.bfloat16) and not needs_grad_scaler(None, torch.float32)


def test_qwen2_in_float16_is_warned_about():
    assert "trained in bfloat16 and can overflow float16" in float16_overflow_warning("qwen2", torch.float16)
    assert float16_overflow_warning("qwen2", torch.bfloat16) is None and float16_overflow_warning("llama", torch.float16) is None


def test_identity_names_the_precision(tiny_config):
    assert build.model_identity(tiny_config).endswith("+no-checkpoint+float32")
    assert build.model_identity(tiny_config, capability=V100).endswith("+llm-float32:encoders-float16")
    assert build.model_identity(tiny_config.with_overrides({"dtype": "float16"}), capability=V100).endswith("+float16")
    assert build.model_identity(tiny_config, capability=H200).endswith("+bfloat16")
    whisper = load_config("whisper-base")
    assert build.precision_tag(whisper, None) == "ctranslate2:int8" and build.precision_tag(whisper, V100) == "ctranslate2:float16"
    assert build.precision_tag(load_config("whisper-base", {"engine": "transformers"}), A100) == "bfloat16"


def test_a_v100_loads_qwen2_by_default_as_a_float32_llm_with_float16_encoders(tiny_config, monkeypatch):
    monkeypatch.setattr(build, "device_capability", lambda device: V100)  # the CPU plays a V100's part
    loaded = load_model(tiny_config, device="cpu")
    model = loaded.model
    assert loaded.identity == "tiny+no-checkpoint+llm-float32:encoders-float16" and loaded.precision_warning is None
    assert model.dtype == torch.float32 and model.encoder_dtype == torch.float16
    assert model.speech_encoder.conv1.weight.dtype == model.ced.blocks[0].attn.qkv.weight.dtype == torch.float16
    clips = [make_clip(1.5, seed=1), make_clip(3.0, seed=2)]
    tokens = model.audio_tokens(clips)
    assert all(item.dtype == torch.float32 and torch.isfinite(item).all() for item in tokens), "the LLM's input"
    answers = model.generate(clips, [model.prompt_for("asr")] * 2, model.config.decoding.model_copy(update={"max_new_tokens": 2}))
    assert answers.non_finite == (False, False)


def test_a_v100_loads_qwen2_in_float16_when_asked_with_a_warning_and_encoders_cast_once(tiny_config, monkeypatch):
    monkeypatch.setattr(build, "device_capability", lambda device: V100)  # the CPU plays a V100's part
    loaded = load_model(tiny_config.with_overrides({"dtype": "float16"}), device="cpu")
    model = loaded.model
    assert loaded.identity == "tiny+no-checkpoint+float16" and model.dtype == torch.float16 and model.encoder_dtype is None
    assert "qwen2 LLM runs in float16" in loaded.precision_warning and "qwen2 LLM runs in float16" in loaded.warning()
    assert model.speech_encoder.conv1.weight.dtype == model.speech_encoder.layers[0].fc1.weight.dtype == torch.float16
    assert model.ced.blocks[0].attn.qkv.weight.dtype == torch.float16
    assert model.ced.patch_embed.proj.weight.dtype == torch.float32, "patch_embed's dtype is init_bn's"
    assert model.speech_encoder.layer_norm.weight.dtype == model.ced.norm.weight.dtype == torch.float32
    assert model.speech_Qformer.bert.embeddings.LayerNorm.weight.dtype == torch.float32, "the connector stays float32"


def test_pre_cast_encoders_give_autocasts_tokens_bit_for_bit(tiny_config, monkeypatch):
    config = tiny_config.with_overrides({"dtype": "bfloat16"})
    clips = [make_clip(1.5, seed=1), make_clip(3.0, seed=2)]
    precast = load_model(config, device="cpu").model
    monkeypatch.setattr(build, "precast_encoders", lambda model, dtype: None)
    autocast_only = load_model(config, device="cpu").model
    assert precast.speech_encoder.conv1.weight.dtype == torch.bfloat16 and autocast_only.speech_encoder.conv1.weight.dtype == torch.float32
    for cast, plain in zip(precast.audio_tokens(clips), autocast_only.audio_tokens(clips), strict=True):
        assert torch.equal(cast, plain)


def test_an_output_claimed_in_one_precision_refuses_another(tiny_config, tmp_path):
    store = OutputStore(str(tmp_path), "corpus")

    def claim(capability):
        store.claim({"model": build.model_identity(tiny_config, capability=capability), "decoding": "d", "long_form": "segment"})

    claim(None)
    claim(None)  # the same precision resumes
    with pytest.raises(OutputMismatchError, match="float32.*not .*bfloat16"):
        claim(H200)
    with pytest.raises(OutputMismatchError, match="llm-float32:encoders-float16"):
        claim(V100)  # a float32 LLM with float16 encoders is not the CPU's float32


def test_an_actor_refuses_another_precision_than_the_runs(tiny_config, local_ray, monkeypatch):
    monkeypatch.setattr(predict, "actor_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(predict, "actor_threads", lambda: None)  # the test process keeps its threads
    settings = JobSettings(corpus="c", job_id="j", model_identity="tiny+no-checkpoint+bfloat16", decoding="d")
    with pytest.raises(ConfigError, match=r"runs tiny\+no-checkpoint\+float32 but the run writes tiny\+no-checkpoint\+bfloat16"):
        predict.Predictor(tiny_config, None, settings)


def test_an_output_written_before_long_form_was_named_so_still_resumes(tmp_path):
    store = OutputStore(str(tmp_path), "corpus")
    run = {"model": "tiny+no-checkpoint+float32", "decoding": "d"}
    (tmp_path / "corpus/_RUN.json").write_text(json.dumps({**run, "long_audio": "segment"}))
    store.claim({**run, "long_form": "segment"})
    with pytest.raises(OutputMismatchError):
        store.claim({**run, "long_form": "truncate"})


def test_an_output_written_before_word_timestamps_resumes_without_them_and_names_the_difference_with_them(tmp_path):
    store = OutputStore(str(tmp_path), "corpus")
    before = DecodingConfig(num_beams=1).model_dump(exclude={"word_timestamps"})
    (tmp_path / "corpus/_RUN.json").write_text(json.dumps({"model": "m", "decoding": json.dumps(before), "long_form": "segment"}))
    store.claim({"model": "m", "decoding": DecodingConfig(num_beams=1).model_dump_json(), "long_form": "segment"})
    with pytest.raises(OutputMismatchError, match="decoding.word_timestamps false there, true here"):
        store.claim({"model": "m", "decoding": DecodingConfig(num_beams=1, word_timestamps=True).model_dump_json(),
                     "long_form": "segment"})
