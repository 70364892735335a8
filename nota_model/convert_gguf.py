"""Convert a GGUF causal LM into a transformers directory: safetensors weights, config, generation config, tokenizer.

The GGUF is checked with the `gguf` package first (magic, version, tensor extents, architecture), then read
by transformers' own GGUF support, saved, reloaded and compared with the model read from the GGUF.

Usage: python -m nota_model.convert_gguf GGUF OUT_DIR [--dtype float32|float16|bfloat16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from nota_model.errors import ConversionError, WeightsNotFoundError

GGUF_MAGIC = b"GGUF"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What transformers raises when it cannot map a GGUF (architecture, quantization type, tensor layout).
_LOAD_ERRORS = (ValueError, KeyError, NotImplementedError, OSError, RuntimeError)


class _CheckedReader(gguf.GGUFReader):
    """A GGUFReader that checks the tensor data lies inside the file before mapping it (gguf 0.19 itself fails
    in a numpy reshape on a truncated file)."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(path)

    # The reader slices its np.memmap once per string of the vocabulary; a plain ndarray view of the same mapping
    # parses a large vocabulary several times faster.
    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.memmap) -> None:
        self._data = value.view(np.ndarray)

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        needed = max((_tensor_end(start_offs, field) for field in fields), default=start_offs)
        if needed > len(self.data):
            raise ConversionError(
                f"{self.path} is truncated: its tensors need {needed:,} bytes but the file has "
                f"{len(self.data):,} ({len(self.data) / needed:.0%}); download or join it again"
            )
        super()._build_tensors(start_offs, fields)


def _tensor_end(data_start: int, field: gguf.ReaderField) -> int:
    _name_len, _name, _n_dims, dims, raw_type, offset = field.parts
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
    return data_start + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) * type_size // block_size


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} does not exist or is not a file")
    with open(path, "rb") as file:
        head = file.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ConversionError(f"not a GGUF file: {path} starts with {head!r}, a GGUF file with {GGUF_MAGIC!r}")
    try:
        return _CheckedReader(path)
    except ConversionError:
        raise
    except Exception as err:  # gguf raises ValueError, IndexError, ... on a bad version or a cut header
        raise ConversionError(f"{path} has an unreadable GGUF header ({err}): it is truncated, corrupt or too new") from err


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _summary(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ConversionError(f"{path} has no general.architecture key: not a model GGUF (a vocab or adapter file?)")
    return {
        "architecture": arch,
        "name": _field(reader, "general.name"),
        "tensors": len(reader.tensors),
        "file_bytes": path.stat().st_size,
        "quantization": dict(Counter(tensor.tensor_type.name for tensor in reader.tensors)),
        "context_length": _field(reader, f"{arch}.context_length"),
        "layers": _field(reader, f"{arch}.block_count"),
        "hidden_size": _field(reader, f"{arch}.embedding_length"),
    }


def describe_gguf(path: Path) -> dict[str, Any]:
    """Architecture, tensor count, file size, quantization types (with tensor counts), context length, layers
    and hidden size of a GGUF file, which is checked on the way (ConversionError if it is unusable)."""
    path = Path(path)
    return _summary(_open(path), path)


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Convert a GGUF causal LM into a transformers directory at `out_dir` (replaced atomically); returns out_dir."""
    gguf_path = Path(gguf_path)
    return _convert(gguf_path, Path(out_dir), dtype, describe_gguf(gguf_path))


def _convert(path: Path, out_dir: Path, dtype: str, summary: dict[str, Any]) -> Path:
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    model, tokenizer = _load_gguf(path, DTYPES[dtype], summary["architecture"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _make_readable(staging)
        _verify(model, tokenizer, staging)
        _replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _load_gguf(path: Path, dtype: torch.dtype, architecture: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=dtype,
            # Dense weights, and no "gguf" quantizer left on the model: save_pretrained refuses a model with one.
            quantization_config=GgufConfig(dequantize=True),
            output_loading_info=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except _LOAD_ERRORS as err:
        raise ConversionError(
            f"transformers {transformers.__version__} cannot convert {path.name} "
            f"(architecture {architecture!r}): {type(err).__name__}: {err}"
        ) from err
    if info["missing_keys"]:
        raise ConversionError(
            f"{path.name} (architecture {architecture!r}) has no tensors for {len(info['missing_keys'])} parameters "
            f"of {type(model).__name__}, e.g. {sorted(info['missing_keys'])[:5]}"
        )
    return model, tokenizer


def _verify(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Reload `out_dir` and require the same parameters (names, shapes, values) and vocabulary as the GGUF model."""
    reloaded, info = AutoModelForCausalLM.from_pretrained(out_dir, dtype=model.dtype, output_loading_info=True)
    problems = [f"{kind}: {sorted(found)[:5]}" for kind, found in info.items() if found]
    expected, actual = model.state_dict(), reloaded.state_dict()
    if expected.keys() != actual.keys():
        problems.append(f"names differ: {sorted(expected.keys() ^ actual.keys())[:5]}")
    else:
        problems += [f"{name} differs" for name, value in expected.items() if not _same(value, actual[name])][:5]
    reloaded_vocab = len(AutoTokenizer.from_pretrained(out_dir))
    if reloaded_vocab != len(tokenizer):
        problems.append(f"tokenizer has {reloaded_vocab} tokens after reloading, {len(tokenizer)} before")
    if problems:
        raise ConversionError(f"{out_dir} does not reload as the model read from the GGUF: {'; '.join(problems)}")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _make_readable(directory: Path) -> None:
    """mkdtemp and safetensors 0.8 create owner-only entries; a converted model is shared like the rest of the cache."""
    directory.chmod(0o755)
    for file in directory.iterdir():
        file.chmod(0o644)


def _replace(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old)


def _dir_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nota_model.convert_gguf", description=__doc__.split("\n")[0])
    parser.add_argument("gguf", type=Path, help="GGUF file of a causal LM")
    parser.add_argument("out_dir", type=Path, help="transformers directory to write (replaced if it exists)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = describe_gguf(args.gguf)
        for key, value in summary.items():
            print(f"{key:>15}: {value}")
        out_dir = _convert(args.gguf, args.out_dir, args.dtype, summary)
    except (ConversionError, WeightsNotFoundError) as err:
        parser.exit(1, f"error: {err}\n")
    print(f"wrote {out_dir} ({_dir_bytes(out_dir) / 1e6:.0f} MB, {args.dtype}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
