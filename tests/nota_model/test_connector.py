"""The connector made of Whisper decoder layers (`qformer.kind: whisper_decoder`), at tiny sizes with random
weights, from a tiny random Whisper saved as a pack is, and from the real whisper-base pack."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, WhisperConfig, WhisperForConditionalGeneration

from jobs.packs import build
from jobs.samples import default_dest, fetch_librivox
from jobs.training.config import load_train_config
from nota_model import load_audio
from nota_model.build import load_model, save_trained
from nota_model.config import load_config
from nota_model.errors import CheckpointError, ConfigError
from nota_model.qformer import num_windows
from nota_model.training import prepare_for_training
from tests.conftest import make_clip

TINY_DECODER = {"decoder_layers": 3, "decoder_attention_heads": 4, "decoder_ffn_dim": 128}
TINY_WHISPER = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
                "num_mel_bins": 80, "max_source_positions": 1500, "max_target_positions": 16, **TINY_DECODER}


def decoder_config(num_layers=2, whisper_path=None, num_query_tokens=1, **overrides):
    """The `tiny` preset with a connector of `num_layers` Whisper decoder layers (random, or from `whisper_path`)."""
    speech = {"hf_config": TINY_DECODER} if whisper_path is None else {"path": str(whisper_path)}
    qformer = {"kind": "whisper_decoder", "num_layers": num_layers, "num_query_tokens": num_query_tokens}
    base = {"speech_encoder": speech, "qformer": qformer}
    return load_config("tiny", base).with_overrides(overrides)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> tuple[Path, WhisperForConditionalGeneration]:
    """A random Whisper laid out as a converted pack (`WhisperForConditionalGeneration.save_pretrained`)."""
    torch.manual_seed(7)
    whisper = WhisperForConditionalGeneration(WhisperConfig(**TINY_WHISPER)).eval()
    path = tmp_path_factory.mktemp("whisper")
    whisper.save_pretrained(path)
    return path, whisper


@pytest.fixture(scope="module")
def random_decoder():
    return load_model(decoder_config(num_query_tokens=2), device="cpu").model


def test_the_connector_is_the_whisper_decoders_first_layers_bit_for_bit(tiny_whisper):
    path, whisper = tiny_whisper
    model = load_model(decoder_config(num_layers=2, whisper_path=path), device="cpu").model  # with CED: 64 + 32 channels
    decoder = whisper.model.decoder
    assert len(model.speech_Qformer.layers) == 2
    for ours, theirs in zip(model.speech_Qformer.layers, decoder.layers):
        own = ours.state_dict()
        for key, value in theirs.state_dict().items():
            if key.startswith("encoder_attn.") and key.endswith(("k_proj.weight", "v_proj.weight")):
                assert torch.equal(own[key][:, :64], value) and not own[key][:, 64:].any(), key
            else:
                assert torch.equal(own[key], value), key
    assert torch.equal(model.speech_Qformer.layer_norm.weight, decoder.layer_norm.weight)
    start = decoder.embed_tokens.weight[whisper.config.decoder_start_token_id]
    assert torch.equal(model.speech_query_tokens[0, 0], start + decoder.embed_positions.weight[0])


def test_one_query_reads_a_window_as_the_whole_decoders_first_step(tiny_whisper):
    path, whisper = tiny_whisper
    config = decoder_config(num_layers=3, whisper_path=path, audio_encoder={"kind": "none"})
    model = load_model(config, device="cpu").model
    window = torch.randn(4, 17, 64)
    start = torch.full((4, 1), whisper.config.decoder_start_token_id)
    with torch.no_grad():
        expected = whisper.model.decoder(input_ids=start, encoder_hidden_states=window).last_hidden_state
        ours = model.speech_Qformer(model.speech_query_tokens.expand(4, -1, -1), window)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_audio_tokens_have_the_llm_width_and_the_queries_of_every_window(random_decoder):
    tokens = random_decoder.audio_tokens([make_clip(30.0), make_clip(2.5, seed=1)])
    hidden = random_decoder.llama_model.get_input_embeddings().embedding_dim
    assert [t.shape for t in tokens] == [(88 * 2, hidden), (88 * 2, hidden)]
    assert random_decoder.speech_Qformer.hidden_size == 64


def test_an_items_audio_tokens_do_not_depend_on_its_batch_mates():
    config = decoder_config(num_query_tokens=2, speech_encoder={"audio_context": {"mode": "clip"}}, audio_encoder={"kind": "none"})
    model = load_model(config, device="cpu").model
    clips = [make_clip(1.2), make_clip(7.0, seed=1), make_clip(2.5, seed=2)]
    batched = model.audio_tokens(clips)
    assert [len(t) for t in batched] == [16, 46, 22]
    for tokens, clip in zip(batched, clips):
        torch.testing.assert_close(tokens, model.audio_tokens([clip])[0], rtol=1e-5, atol=1e-5)


def test_in_half_precision_the_connector_keeps_float32_weights_and_gives_half_precision_tokens():
    model = load_model(decoder_config(num_query_tokens=2, dtype="bfloat16"), device="cpu").model
    assert model.speech_Qformer.layers[0].fc1.weight.dtype == torch.float32
    tokens = model.audio_tokens([make_clip(1.5), make_clip(0.7)])
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in tokens)


def test_trained_parameters_round_trip_through_a_checkpoint_and_other_kinds_are_refused(tmp_path):
    config = decoder_config(num_query_tokens=2)
    model = load_model(config, device="cpu").model
    generator = torch.Generator().manual_seed(3)
    trained = {key: torch.randn(value.shape, generator=generator) for key, value in model.trained_state_dict().items()}
    assert {"speech_query_tokens", "speech_Qformer.layers.1.encoder_attn.k_proj.weight", "speech_Qformer.layer_norm.bias"} <= trained.keys()
    model.load_state_dict(trained, strict=False)
    save_trained(model, tmp_path / "decoder.safetensors")
    loaded = load_model(config, checkpoint=str(tmp_path / "decoder.safetensors"), device="cpu").model.trained_state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[key], trained[key]) for key in trained)
    with pytest.raises(CheckpointError, match="missing: speech_Qformer.bert"):
        load_model(load_config("tiny", {"qformer": {"num_query_tokens": 2}}), checkpoint=str(tmp_path / "decoder.safetensors"), device="cpu")


def test_the_connector_learns():
    model = load_model(decoder_config(), device="cpu").model
    trained = prepare_for_training(model, frozen=["lora"])
    assert any(name.startswith("speech_Qformer.layers.1.") for name in trained) and "speech_query_tokens" in trained
    model.encode_audio([make_clip(1.0)])[0].square().mean().backward()
    assert model.speech_Qformer.layers[0].encoder_attn.k_proj.weight.grad.abs().sum() > 0
    assert model.speech_query_tokens.grad.abs().sum() > 0


def test_sizes_the_decoder_lacks_are_config_errors():
    with pytest.raises(ConfigError, match="the Whisper decoder has 3 layers"):
        load_model(decoder_config(num_layers=4), device="cpu")
    with pytest.raises(ConfigError, match="decoder_attention_heads"):
        load_model(decoder_config(speech_encoder={"hf_config": {"decoder_attention_heads": 6}}), device="cpu")


def test_the_v2_training_config_trains_the_decoder_connector_from_whisper_base_alone():
    config = load_train_config(str(Path(__file__).parents[2] / "configs/nota-small-v2-connector.yaml"))
    model = config.model.load()
    assert model.qformer.kind == "whisper_decoder" and model.speech_encoder.path == "pack://whisper-base"
    assert model.trained_weights is None and config.model.checkpoint is None and config.objective.frozen == ["lora"]


@pytest.mark.real_weights
def test_from_whisper_base_the_connector_holds_its_decoder_and_hears_english_in_a_librivox_clip():
    """With the whisper-base pack (a random 1-layer LLM of SmolLM2's width, to load fast), the connector's weights
    are the pack's decoder's, its audio tokens are finite, and over a whole clip its one query reads what
    Whisper's decoder reads at its first step: the language, `<|en|>`."""
    pack = build("whisper-base")
    config = load_config("nota-small", {
        "trained_weights": None, "qformer": {"kind": "whisper_decoder", "num_layers": 6}, "lora": {"enabled": False},
        "llm": {"path": None, "tokenizer": "pack://smollm2-135m-instruct",
                "hf_config": {"num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 9,
                              "num_key_value_heads": 3, "vocab_size": 49152}},
    })
    build("smollm2-135m-instruct")
    model = load_model(config, device="cpu").model
    with safe_open(str(pack / "model.safetensors"), "pt") as weights:
        for key, value in model.speech_Qformer.state_dict().items():
            assert torch.equal(value, weights.get_tensor(f"model.decoder.{key}")), key
        embeddings = weights.get_tensor("model.decoder.embed_tokens.weight")
    item = json.loads(fetch_librivox(default_dest()).read_text().splitlines()[1])
    clip = load_audio(item["audio"], config.audio)
    states = model.speech_states([clip])[0]  # the shortest clip, "he was not an ill disposed young man"
    with torch.no_grad():
        tokens = model.tokens_from_speech_states([states])[0]
        read = model.speech_Qformer(model.speech_query_tokens, model.ln_speech(states).unsqueeze(0))[0, 0]
    assert tokens.shape == (num_windows(len(states), 8, 8), 576) and torch.isfinite(tokens).all()
    english = AutoTokenizer.from_pretrained(pack).convert_tokens_to_ids("<|en|>")
    assert int((read @ embeddings.T).argmax()) == english
