import pytest

from nota_model.build import build_audio_encoder
from nota_model.config import NotaConfig, load_config, preset_names
from nota_model.errors import ConfigError


def test_presets_describe_the_seed_and_tiny_models():
    assert {"nota-0.5b", "tiny"} <= set(preset_names())
    seed = load_config("nota-0.5b")
    assert seed.speech_encoder.width == 1280 and seed.speech_encoder.num_mel_bins == 128
    assert seed.audio_encoder.embed_dim == 384 and seed.encoder_width == 1664
    assert seed.qformer.window_frames == 17 and seed.qformer.stride_frames == 17
    assert seed.lora.r == 8 and seed.lora.alpha == 32 and set(seed.lora.target_modules) == {"q_proj", "v_proj", "gate_proj"}
    assert seed.decoding.num_beams == 4 and seed.decoding.max_new_tokens == 200
    assert seed.prompt.template == "USER: {}\nASSISTANT:"
    assert seed.prompt.task_prompt("aac").endswith("Please write down what your hear in the audio.")


def test_yaml_round_trip_and_overrides(tmp_path):
    config = load_config("tiny", {"decoding": {"num_beams": 2}, "lora": {"r": 2}})
    assert config.decoding.num_beams == 2 and config.lora.r == 2 and config.lora.alpha == 16
    path = tmp_path / "model.yaml"
    path.write_text(config.to_yaml())
    assert load_config(str(path)) == config


def test_a_config_that_extends_a_preset_is_the_preset_with_its_own_keys_over_it(tmp_path):
    path = tmp_path / "tiny-merged.yaml"
    path.write_text("extends: tiny\nname: tiny-merged\nlora: {merge: true}\n")
    expected = load_config("tiny", {"name": "tiny-merged", "lora": {"merge": True}})
    assert load_config(str(path)) == expected and expected.lora.r == load_config("tiny").lora.r
    path.write_text("extends: tinny\n")
    with pytest.raises(ConfigError, match="extends 'tinny', which is no preset"):
        load_config(str(path))


def test_the_fast_nota_small_preset_is_nota_small_with_its_recipe():
    recipe = {"name": "nota-small-fast", "dtype": "bfloat16", "lora": {"merge": True}}
    assert load_config("nota-small-fast") == load_config("nota-small", recipe)


def test_unknown_keys_and_bad_values_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="qformr"):
        load_config("tiny", {"qformr": {}})
    with pytest.raises(ConfigError, match="num_heads"):
        load_config("tiny", {"qformer": {"hidden_size": 65}})
    with pytest.raises(ConfigError, match="presets"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown task"):
        load_config("tiny").prompt.task_prompt("translate")


def test_word_timestamps_are_the_whisper_presets_and_no_nota_models():
    assert all(load_config(name).decoding.word_timestamps for name in ("whisper-base", "whisper-tiny.en"))
    with pytest.raises(ConfigError, match="decoding.word_timestamps: the NOTA model gives no word times"):
        load_config("tiny", {"decoding": {"word_timestamps": True}})


def test_config_describes_the_original_salmonn():
    salmonn = NotaConfig.model_validate(
        {
            "name": "salmonn-7b",
            "speech_encoder": {"hf_config": {"d_model": 1280, "num_mel_bins": 80, "encoder_layers": 32}},
            "audio_encoder": {"kind": "beats", "embed_dim": 768},
            "llm": {"hf_config": {"model_type": "llama", "hidden_size": 4096}},
            "lora": {"r": 8, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
            "prompt": {"bos_token": "<s>", "end_symbol": "</s>", "template": "USER: {}\nASSISTANT:"},
        }
    )
    assert salmonn.encoder_width == 1280 + 768
    with pytest.raises(ConfigError, match="beats"):
        build_audio_encoder(salmonn.audio_encoder)
