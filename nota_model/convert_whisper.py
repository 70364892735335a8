"""Convert a CTranslate2 (faster-whisper) Whisper `model.bin` into a transformers Whisper directory.

The directory holds float32 `model.safetensors` (fp16/bf16 values upcast exactly: CPU inference wants
float32), `config.json`, a complete `generation_config.json`, `preprocessor_config.json` and, given the
model's `tokenizer.json`, a saved `WhisperTokenizer`. It loads with `WhisperForConditionalGeneration`
and `WhisperProcessor.from_pretrained`.

Usage: python -m nota_model.convert_whisper MODEL_BIN OUT_DIR [--tokenizer tokenizer.json] [--ct2-config config.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from nota_model.errors import ConversionError, NotaError, WeightsNotFoundError

BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
BF16 = 5
# dtype codes of ctranslate2/types.h; bf16 is read as its 16 bits, the upper half of a float32
DTYPES = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", BF16: "<u2"}
MAX_RANK = 8
MAX_VARIABLES = 1_000_000

EMBEDDINGS = "decoder/embeddings/weight"
PROJECTION = "decoder/projection/weight"
PARAMS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "encodings": "weight"}
# Fused CTranslate2 linears list several transformers modules, split in order along the output axis.
TOP_SCOPES = {
    "encoder/conv1": ("model.encoder.conv1",),
    "encoder/conv2": ("model.encoder.conv2",),
    "encoder/position_encodings": ("model.encoder.embed_positions",),
    "encoder/layer_norm": ("model.encoder.layer_norm",),
    "decoder/embeddings": ("model.decoder.embed_tokens",),
    "decoder/position_encodings": ("model.decoder.embed_positions",),
    "decoder/layer_norm": ("model.decoder.layer_norm",),
}
LAYER_SCOPES = {
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention/linear_1": ("self_attn.out_proj",),
    "self_attention/layer_norm": ("self_attn_layer_norm",),
    "attention/linear_0": ("encoder_attn.q_proj",),
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
    "attention/linear_2": ("encoder_attn.out_proj",),
    "attention/layer_norm": ("encoder_attn_layer_norm",),
    "ffn/layer_norm": ("final_layer_norm",),
    "ffn/linear_0": ("fc1",),
    "ffn/linear_1": ("fc2",),
}
LAYER_SCOPE = re.compile(r"(encoder|decoder)/layer_(\d+)/(.+)")
REQUIRED_VARIABLES = (
    EMBEDDINGS,
    "encoder/conv1/weight",
    "encoder/position_encodings/encodings",
    "decoder/position_encodings/encodings",
    "encoder/layer_0/ffn/linear_0/weight",
    "decoder/layer_0/ffn/linear_0/weight",
)
K_BIAS_TOLERANCE = 1e-6

# Used only when a spec lacks `num_heads`: Whisper's sizes tiny, base, small, medium, large.
HEADS_BY_WIDTH = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}
STANDARD_VOCAB_SIZES = (51864, 51865, 51866)  # English-only, multilingual, large-v3 (100 languages)
ENGLISH_ONLY_EOT = 50256  # English-only models keep GPT-2's 50256 text tokens, multilingual ones have 50257
TIMESTAMP_TOKENS = 1501
TASK_TOKENS = (
    "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"
)
REQUIRED_TOKENS = (
    "<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startofprev|>", "<|notimestamps|>"
)
BLANK_TOKEN = 220  # " ": Whisper suppresses it and <|endoftext|> first, unless the ct2 config says otherwise
MAX_INITIAL_TIMESTAMP_INDEX = 50  # Whisper's default: the first timestamp is at most 1 s


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        self.buffer = np.memmap(path, dtype=np.uint8, mode="r")
        self.pos = 0

    def take(self, dtype: str, count: int, what: str) -> np.ndarray:
        end = self.pos + np.dtype(dtype).itemsize * count
        if end > len(self.buffer):
            raise ConversionError(
                f"{self.path} is truncated: {what} needs {end:,} bytes but the file has {len(self.buffer):,}; "
                "re-download it, or re-join all of its parts in order"
            )
        array = np.frombuffer(self.buffer, dtype, count, self.pos)
        self.pos = end
        return array

    def number(self, dtype: str, what: str) -> int:
        return int(self.take(dtype, 1, what)[0])

    def string(self, what: str) -> str:
        raw = self.take("u1", self.number("<u2", what), what).tobytes()
        try:
            if raw.endswith(b"\0"):
                return raw[:-1].decode()
        except UnicodeDecodeError:
            pass
        raise ConversionError(f"{self.path} is not a CTranslate2 model.bin: {what} is not a string")

    def variable(self) -> tuple[str, np.ndarray]:
        name = self.string("a variable name")
        rank = self.number("u1", f"{name}'s rank")
        if rank > MAX_RANK:
            raise ConversionError(f"{self.path} is not a CTranslate2 model.bin: variable {name!r} has rank {rank}")
        dims = tuple(int(dim) for dim in self.take("<u4", rank, f"{name}'s shape"))
        code = self.number("u1", f"{name}'s dtype")
        if code not in DTYPES:
            raise ConversionError(f"{self.path}: variable {name!r} has unknown dtype code {code} (known: 0-{BF16})")
        count, size = int(np.prod(dims)), self.number("<u4", f"{name}'s byte count")
        if size != count * np.dtype(DTYPES[code]).itemsize:
            raise ConversionError(f"{self.path} is corrupt: variable {name!r} {dims} declares {size:,} bytes")
        array = self.take(DTYPES[code], count, f"variable {name!r}").reshape(dims)
        if code == BF16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return name, array


def read_ct2(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and variables of any CTranslate2 `model.bin`, aliases resolved to the same arrays.

    Arrays are read-only views of the file in their stored dtype, except bf16, which becomes float32.
    Bytes after the alias table are an error, not ignored: a correctly joined file has none.
    """
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty: re-download it")
    reader = _Reader(path)
    version = reader.number("<u4", "the format version")
    if version != BINARY_VERSION:
        raise ConversionError(
            f"{path} is not a CTranslate2 model.bin (format version {BINARY_VERSION}): it starts with "
            f"{reader.buffer[:8].tobytes()!r}"
        )
    spec = reader.string("the spec name")
    if not spec.isidentifier():
        raise ConversionError(f"{path} is not a CTranslate2 model.bin: spec name {spec!r}")
    reader.number("<u4", "the spec revision")
    count = reader.number("<u4", "the variable count")
    if count > MAX_VARIABLES:
        raise ConversionError(f"{path} is not a CTranslate2 model.bin: it declares {count:,} variables")
    variables = dict(reader.variable() for _ in range(count))
    for _ in range(reader.number("<u4", "the alias count")):
        alias, target = reader.string("an alias name"), reader.string("an alias target")
        if target not in variables:
            raise ConversionError(f"{path} is corrupt: alias {alias!r} points to missing variable {target!r}")
        variables[alias] = variables[target]
    if reader.pos != len(reader.buffer):
        raise ConversionError(
            f"{path} has {len(reader.buffer) - reader.pos:,} bytes after its end ({reader.pos:,}): "
            "parts joined wrongly, or something appended"
        )
    return spec, variables


def hf_state_dict(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers `WhisperForConditionalGeneration` weights (float32) from WhisperSpec variables."""
    if PROJECTION in variables and not np.array_equal(variables[PROJECTION], variables[EMBEDDINGS]):
        raise ConversionError(f"{PROJECTION} differs from {EMBEDDINGS}: Whisper ties them, this model does not")
    state = {}
    for name, value in variables.items():
        if value.ndim == 0 or name == PROJECTION:  # scalars are spec options (num_heads, activation, ...)
            continue
        scope, _, param = name.rpartition("/")
        targets = _targets(scope)
        if targets is None or param not in PARAMS:
            raise ConversionError(f"unexpected WhisperSpec variable {name!r}: no transformers weight matches it")
        if value.dtype.kind != "f":
            raise ConversionError(
                f"{name} is stored as {value.dtype}: quantized models are not supported, "
                "re-convert with CTranslate2 quantization float16 or float32"
            )
        for target, part in zip(targets, np.split(value, len(targets))):
            if target.endswith("k_proj") and param == "bias":
                _check_zero(name, part)
            else:
                state[f"{target}.{PARAMS[param]}"] = part.astype(np.float32)
    return state


def _targets(scope: str) -> tuple[str, ...] | None:
    if match := LAYER_SCOPE.fullmatch(scope):
        side, index, rest = match.groups()
        names = LAYER_SCOPES.get(rest)
        return names and tuple(f"model.{side}.layers.{index}.{name}" for name in names)
    return TOP_SCOPES.get(scope)


def _check_zero(name: str, k_bias: np.ndarray) -> None:
    # CTranslate2 fills in a zero key bias (transformers' k_proj has none); anything else means another layout
    largest = float(np.abs(k_bias.astype(np.float32)).max())
    if largest > K_BIAS_TOLERANCE:
        raise ConversionError(f"{name}: the key part of the fused bias should be zero, it reaches {largest:g}")


def standard_vocabulary(vocab_size: int) -> dict[str, int]:
    """Whisper's special tokens by position: <|endoftext|> after the text tokens, <|startoftranscript|>,
    the languages, the task tokens, then the timestamps."""
    if vocab_size not in STANDARD_VOCAB_SIZES:
        raise ConversionError(f"{vocab_size} tokens is not a standard Whisper vocabulary: pass the tokenizer.json")
    text_tokens = ENGLISH_ONLY_EOT if vocab_size == STANDARD_VOCAB_SIZES[0] else ENGLISH_ONLY_EOT + 1
    languages = list(LANGUAGES)[: vocab_size - text_tokens - 2 - len(TASK_TOKENS) - TIMESTAMP_TOKENS]
    names = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in languages), *TASK_TOKENS]
    return {name: text_tokens + offset for offset, name in enumerate(names)}


def whisper_config(variables: dict[str, np.ndarray], vocab: dict[str, int]) -> WhisperConfig:
    vocab_size, d_model = variables[EMBEDDINGS].shape
    eot = vocab["<|endoftext|>"]
    return WhisperConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=_heads(variables, "encoder", d_model),
        decoder_attention_heads=_heads(variables, "decoder", d_model),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        suppress_tokens=None,  # generation settings live in generation_config.json only
        begin_suppress_tokens=None,
    )


def _layer_count(variables: dict[str, np.ndarray], side: str) -> int:
    return len({match[1] for name in variables if (match := re.match(rf"{side}/layer_(\d+)/", name))})


def _heads(variables: dict[str, np.ndarray], side: str, d_model: int) -> int:
    if f"{side}/num_heads" in variables:
        return int(variables[f"{side}/num_heads"])
    if d_model not in HEADS_BY_WIDTH:
        raise ConversionError(f"{side}/num_heads is missing and width {d_model} is not a Whisper size")
    return HEADS_BY_WIDTH[d_model]


def generation_config(config: WhisperConfig, vocab: dict[str, int], ct2_config: dict[str, Any]) -> GenerationConfig:
    """Everything `generate(language=..., task=...)` reads; `_from_model_config=False` keeps transformers
    from rebuilding it out of the model config, which would drop the Whisper fields."""
    multilingual = config.eos_token_id != ENGLISH_ONLY_EOT
    fields: dict[str, Any] = dict(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=ct2_config.get("suppress_ids", []),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [BLANK_TOKEN, config.eos_token_id]),
        no_timestamps_token_id=vocab["<|notimestamps|>"],
        prev_sot_token_id=vocab["<|startofprev|>"],
        is_multilingual=multilingual,
        return_timestamps=False,
        max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
    )
    if multilingual:
        fields["lang_to_id"] = {f"<|{code}|>": vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab}
        fields["task_to_id"] = {task: vocab[f"<|{task}|>"] for task in ("translate", "transcribe")}
    if "alignment_heads" in ct2_config:
        fields["alignment_heads"] = ct2_config["alignment_heads"]
    generation = GenerationConfig(**fields)
    generation._from_model_config = False
    return generation


def load_tokenizer(tokenizer_json: Path, vocab_size: int) -> WhisperTokenizer:
    try:
        tokenizer = WhisperTokenizer(tokenizer_file=str(tokenizer_json), pad_token="<|endoftext|>")
    except Exception as err:
        raise ConversionError(f"{tokenizer_json} is not a readable tokenizers file ({err})") from err
    vocab = tokenizer.get_vocab()
    expected = standard_vocabulary(vocab_size) if vocab_size in STANDARD_VOCAB_SIZES else {}
    wrong = [token for token in REQUIRED_TOKENS if vocab.get(token, -1) != expected.get(token, vocab.get(token))]
    if wrong or len(tokenizer) > vocab_size:
        raise ConversionError(
            f"{tokenizer_json} does not belong to this Whisper: {len(tokenizer)} tokens for a model of {vocab_size}, "
            f"{wrong} missing or at other ids"
        )
    return tokenizer


def convert_ct2_whisper(
    model_bin: Path, out_dir: Path, tokenizer_json: Path | None = None, ct2_config: Path | None = None
) -> Path:
    """Write the transformers Whisper of a CTranslate2 `model.bin` to `out_dir` (replaced atomically), verified."""
    spec, variables = read_ct2(model_bin)
    if spec != WHISPER_SPEC:
        raise ConversionError(f"{model_bin} is a {spec} model, not Whisper ({WHISPER_SPEC})")
    if missing := [name for name in REQUIRED_VARIABLES if name not in variables]:
        raise ConversionError(f"{model_bin} is not a complete WhisperSpec: it lacks {missing}")
    state = hf_state_dict(variables)
    options = _read_json(ct2_config) if ct2_config else {}
    vocab_size = variables[EMBEDDINGS].shape[0]
    tokenizer = load_tokenizer(tokenizer_json, vocab_size) if tokenizer_json else None
    vocab = tokenizer.get_vocab() if tokenizer is not None else standard_vocabulary(vocab_size)
    config = whisper_config(variables, vocab)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        tensors = {name: torch.from_numpy(value) for name, value in state.items()}
        safetensors.torch.save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(staging)
        generation_config(config, vocab, options).save_pretrained(staging)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        verify(staging)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def verify(model_dir: Path) -> None:
    """`model_dir` must load into `WhisperForConditionalGeneration`: no missing, unexpected or mis-shaped weights."""
    try:
        _, info = WhisperForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    except Exception as err:  # transformers raises on mis-shaped weights
        raise ConversionError(f"the converted model does not load into transformers' Whisper: {err}") from err
    problems = {key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[key]}
    if problems:
        raise ConversionError(f"the converted model does not fit transformers' Whisper: {problems}")


def _publish(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        stale = out_dir.with_name(f".{out_dir.name}.stale-{os.getpid()}")
        out_dir.rename(stale)
        staging.rename(out_dir)
        shutil.rmtree(stale)
    else:
        staging.rename(out_dir)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path} is not a readable JSON file ({err})") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_bin", type=Path, help="CTranslate2 model.bin (parts joined)")
    parser.add_argument("out_dir", type=Path, help="transformers model directory to write (replaced)")
    parser.add_argument("--tokenizer", type=Path, help="the model's tokenizer.json")
    parser.add_argument("--ct2-config", type=Path, help="the model's CTranslate2 config.json (suppressed tokens, ...)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        out_dir = convert_ct2_whisper(args.model_bin, args.out_dir, args.tokenizer, args.ct2_config)
    except NotaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in sorted(out_dir.iterdir()):
        print(f"{path}  {path.stat().st_size:,} bytes")
    print(f"converted in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
