"""The NOTA architecture assembled from the real Whisper-base encoder and the real Qwen2.5-class LLM."""

import pytest
import torch
from transformers import WhisperForConditionalGeneration

from nota_model import load_config, load_model
from nota_model.config import DecodingConfig
from nota_model.packs import build
from tests.conftest import make_clip

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def real_parts():
    build("whisper-base")
    build("qwen2.5-coder-0.5b-instruct")
    return load_model(load_config("nota-base-qwen0.5b"), device="cpu")


def test_real_parts_load_into_the_nota_model_and_generate(real_parts):
    model = real_parts.model
    assert model.speech_encoder.config.d_model == 512 and model.llama_model.config.hidden_size == 896
    assert model.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]
    assert model.llama_model.get_input_embeddings().weight.shape[0] == len(model.tokenizer)
    output = model.generate([make_clip(3.0)], [model.prompt_for("asr")], DecodingConfig(num_beams=1, max_new_tokens=3))
    assert output.decode_steps >= 1 and isinstance(output.texts[0], str)


def test_real_whisper_encoder_weights_are_the_packs(real_parts):
    whisper = WhisperForConditionalGeneration.from_pretrained(build("whisper-base"))
    torch.testing.assert_close(real_parts.model.speech_encoder.layers[3].fc2.weight, whisper.model.encoder.layers[3].fc2.weight)


def test_without_a_checkpoint_the_random_parts_are_named_loudly(real_parts):
    assert real_parts.random_parts == ("audio encoder", "Q-Former, projection and LoRA")
    assert "MEANINGLESS" in real_parts.warning()
