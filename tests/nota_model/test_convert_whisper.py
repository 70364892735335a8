"""CTranslate2 Whisper conversion, against model.bin files written here from tiny random transformers Whispers
with the layout of the real faster-whisper files (fused QKV, zero key bias, aliases, fp16/bf16 storage)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from tokenizers import Tokenizer, models
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer

from nota_model.convert_whisper import convert_ct2_whisper, main, read_ct2, standard_vocabulary
from nota_model.errors import ConversionError

WIDTH, HEADS, LAYERS = 64, 4, 2
DTYPE_CODES = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}
CT2_CONFIG = {"suppress_ids": [1, 2, 7], "suppress_ids_begin": [220, 50257], "alignment_heads": [[1, 0], [1, 3]]}


def tiny_whisper(vocab_size: int) -> WhisperForConditionalGeneration:
    eot = 50256 if vocab_size == 51864 else 50257
    config = WhisperConfig(
        vocab_size=vocab_size, d_model=WIDTH, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=2 * WIDTH,
        decoder_ffn_dim=2 * WIDTH, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=eot + 1,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    for name, parameter in model.named_parameters():
        if "layer_norm" not in name:  # norms keep their ones and zeros, which CTranslate2 aliases
            parameter.data.normal_()
    return model


def ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    """What CTranslate2's Whisper converter stores, in its names and storage dtypes."""
    weights = {key: value.detach() for key, value in model.state_dict().items()}
    out = {f"{side}/num_heads": torch.tensor(HEADS, dtype=torch.int16) for side in ("encoder", "decoder")}
    out["decoder/activation"] = torch.tensor(3, dtype=torch.int8)
    out["decoder/alignment_layer"] = torch.tensor(-1, dtype=torch.int32)

    def linear(ct2: str, *modules: str) -> None:
        out[f"{ct2}/weight"] = torch.cat([weights[f"{module}.weight"] for module in modules])
        out[f"{ct2}/bias"] = torch.cat([weights.get(f"{module}.bias", torch.zeros(WIDTH)) for module in modules])

    def norm(ct2: str, module: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = weights[f"{module}.weight"], weights[f"{module}.bias"]

    for side in ("encoder", "decoder"):
        out[f"{side}/position_encodings/encodings"] = weights[f"model.{side}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(LAYERS):
            ct2, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            linear(f"{ct2}/self_attention/linear_0", *(f"{hf}.self_attn.{p}_proj" for p in "qkv"))
            linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
            norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
            norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
            if side == "decoder":
                linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
                linear(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn.k_proj", f"{hf}.encoder_attn.v_proj")
                linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
                norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    out["decoder/embeddings/weight"] = weights["model.decoder.embed_tokens.weight"]
    out["decoder/projection/weight"] = weights["proj_out.weight"]
    return {name: value.to(storage_dtype(name)) if value.is_floating_point() else value for name, value in out.items()}


def storage_dtype(name: str) -> torch.dtype:
    """Mixed on purpose, to read every float format: norms f32, biases bf16, other weights f16."""
    return torch.float32 if "norm" in name else torch.bfloat16 if name.endswith("bias") else torch.float16


def string(text: str) -> bytes:
    return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"


def write_ct2(path: Path, variables: dict[str, torch.Tensor], spec: str = "WhisperSpec") -> Path:
    """CTranslate2's serialisation: sorted variables, later exact duplicates stored as aliases."""
    body, aliases, seen = [], [], {}
    for name in sorted(variables):
        value = variables[name].contiguous()
        raw = value.reshape(-1).view(torch.uint8).numpy().tobytes()
        key = (value.dtype, tuple(value.shape), raw)
        if value.dim() and key in seen:
            aliases.append(string(name) + string(seen[key]))
            continue
        seen[key] = name
        header = struct.pack(f"<B{value.dim()}I", value.dim(), *value.shape)
        body.append(string(name) + header + struct.pack("<BI", DTYPE_CODES[value.dtype], len(raw)) + raw)
    head = struct.pack("<I", 6) + string(spec) + struct.pack("<II", 3, len(body))
    path.write_bytes(head + b"".join(body) + struct.pack("<I", len(aliases)) + b"".join(aliases))
    return path


@pytest.fixture(scope="module", params=[51865, 51864], ids=["multilingual", "english"])
def converted(request, tmp_path_factory) -> tuple[WhisperForConditionalGeneration, Path]:
    tmp = tmp_path_factory.mktemp("whisper")
    model = tiny_whisper(request.param)
    model_bin = write_ct2(tmp / "model.bin", ct2_variables(model))
    (tmp / "config.json").write_text(json.dumps(CT2_CONFIG))
    return model, convert_ct2_whisper(model_bin, tmp / "hf", ct2_config=tmp / "config.json")


def test_round_trip_gives_the_original_weights(converted):
    model, out_dir = converted
    loaded = safetensors.torch.load_file(str(out_dir / "model.safetensors"))
    original = model.state_dict()
    assert set(loaded) == set(original) - {"proj_out.weight"}
    for key, value in loaded.items():  # transformers names follow the same storage rule
        assert value.dtype == torch.float32 and torch.equal(value, original[key].to(storage_dtype(key)).float()), key


def test_config_and_generation_config(converted):
    model, out_dir = converted
    config = WhisperConfig.from_pretrained(out_dir)
    for field in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                  "decoder_attention_heads", "encoder_ffn_dim", "num_mel_bins", "max_source_positions",
                  "max_target_positions", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        assert getattr(config, field) == getattr(model.config, field), field
    generation = json.loads((out_dir / "generation_config.json").read_text())
    assert generation["_from_model_config"] is False
    assert generation["suppress_tokens"] == CT2_CONFIG["suppress_ids"]
    assert generation["alignment_heads"] == CT2_CONFIG["alignment_heads"]
    multilingual = config.vocab_size == 51865
    assert generation["is_multilingual"] is multilingual
    assert generation["no_timestamps_token_id"] == (50363 if multilingual else 50362)
    if multilingual:
        assert generation["lang_to_id"]["<|en|>"] == 50259 and len(generation["lang_to_id"]) == 99
        assert generation["task_to_id"] == {"translate": 50358, "transcribe": 50359}
    else:
        assert "lang_to_id" not in generation
    assert json.loads((out_dir / "preprocessor_config.json").read_text())["feature_size"] == 80


def test_converted_model_generates(converted):
    model, out_dir = converted
    loaded = WhisperForConditionalGeneration.from_pretrained(out_dir)
    features = torch.randn(1, 80, 3000)
    kwargs = {"language": "en", "task": "transcribe"} if model.config.vocab_size == 51865 else {}
    assert loaded.generate(features, max_new_tokens=3, **kwargs).shape[0] == 1


@pytest.fixture(scope="module")
def model_bin(tmp_path_factory) -> Path:
    return write_ct2(tmp_path_factory.mktemp("ct2") / "model.bin", ct2_variables(tiny_whisper(51865)))


def test_read_ct2_resolves_aliases_and_bf16(model_bin):
    spec, variables = read_ct2(model_bin)
    assert spec == "WhisperSpec"
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    assert variables["decoder/layer_1/ffn/layer_norm/gamma"] is variables["decoder/layer_0/ffn/layer_norm/gamma"]
    assert variables["encoder/conv1/bias"].dtype == np.float32
    assert variables["encoder/conv1/weight"].dtype == np.float16


@pytest.mark.parametrize("keep", [0, 2, 10, 300, -5])
def test_truncated_file(model_bin, tmp_path, keep):
    (tmp_path / "model.bin").write_bytes(model_bin.read_bytes()[:keep])
    with pytest.raises(ConversionError, match="empty" if keep == 0 else "truncated"):
        convert_ct2_whisper(tmp_path / "model.bin", tmp_path / "out")
    assert not (tmp_path / "out").exists()


HEADER = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, 1)
NOT_CT2 = "not a CTranslate2 model.bin"
REFUSED = {  # name: (file contents from a good model.bin's, error message)
    "random bytes": (lambda good: np.random.default_rng(0).bytes(4096), NOT_CT2),
    "gguf": (lambda good: b"GGUF" + struct.pack("<IQQ", 3, 0, 0), NOT_CT2),
    "safetensors": (lambda good: safetensors.torch.save({"x": torch.zeros(3)}), NOT_CT2),
    "other spec": (lambda good: good.replace(string("WhisperSpec"), string("BartSpec")), "a BartSpec model, not Whisper"),
    "unknown dtype": (lambda good: HEADER + string("x") + struct.pack("<BIBI", 1, 2, 9, 2) + bytes(2), "unknown dtype"),
    "trailing bytes": (lambda good: good + bytes(7), "7 bytes after its end"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_file(model_bin, tmp_path, case):
    make, message = REFUSED[case]
    (tmp_path / "model.bin").write_bytes(make(model_bin.read_bytes()))
    with pytest.raises(ConversionError, match=message):
        convert_ct2_whisper(tmp_path / "model.bin", tmp_path / "out")


def test_nonzero_key_bias_and_missing_weight_are_refused(tmp_path):
    variables = ct2_variables(tiny_whisper(51865))
    variables["encoder/layer_1/self_attention/linear_0/bias"][WIDTH] = 0.5
    with pytest.raises(ConversionError, match="key part of the fused bias"):
        convert_ct2_whisper(write_ct2(tmp_path / "k.bin", variables), tmp_path / "out")
    variables = ct2_variables(tiny_whisper(51865))
    del variables["decoder/layer_1/attention/linear_2/weight"]
    with pytest.raises(ConversionError, match="missing_keys.*decoder.layers.1.encoder_attn.out_proj.weight"):
        convert_ct2_whisper(write_ct2(tmp_path / "m.bin", variables), tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["k.bin", "m.bin"]  # no staging left behind


def fake_tokenizer_json(path: Path, vocab_size: int) -> Path:
    """A tokenizers file with Whisper's special tokens at their ids (the text tokens are placeholders)."""
    specials = standard_vocabulary(vocab_size)
    tokenizer = Tokenizer(models.BPE({f"t{i}": i for i in range(min(specials.values()))}, []))
    tokenizer.add_special_tokens(list(specials))
    tokenizer.save(str(path))
    return path


def test_tokenizer_is_saved_and_must_match(model_bin, tmp_path):
    convert_ct2_whisper(model_bin, tmp_path / "out", tokenizer_json=fake_tokenizer_json(tmp_path / "t.json", 51865))
    processor = WhisperProcessor.from_pretrained(tmp_path / "out")
    assert isinstance(processor.tokenizer, WhisperTokenizer)
    assert processor.tokenizer.convert_tokens_to_ids("<|transcribe|>") == 50359
    english = fake_tokenizer_json(tmp_path / "en.json", 51864)
    with pytest.raises(ConversionError, match="does not belong to this Whisper"):
        convert_ct2_whisper(model_bin, tmp_path / "out", tokenizer_json=english)


def test_cli_replaces_output(model_bin, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("stale")
    assert main([str(model_bin), str(tmp_path / "out")]) == 0
    assert "converted in" in capsys.readouterr().out
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert main([str(tmp_path / "out" / "config.json"), str(tmp_path / "x")]) == 1
