"""The lightweight recipes' model options, each on `tiny`: it changes what it says (LoRA merged, int8 linear layers,
pooled audio tokens) and nothing else (outputs, the other parts, the identity's other fields)."""

from __future__ import annotations

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from nota_model.build import load_model, model_identity, precision_tag
from nota_model.checkpoint import save_state_dict
from nota_model.config import DecodingConfig, load_config
from nota_model.errors import ConfigError
from nota_model.lightweight import check_quantization
from tests.conftest import make_clip

GREEDY = DecodingConfig(num_beams=1, max_new_tokens=6)
H100 = (9, 0)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> str:
    """Trained parameters for `tiny` whose LoRA changes the answers (its `lora_B` start at zero)."""
    path = tmp_path_factory.mktemp("trained") / "tiny.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_state_dict({key: torch.randn(value.shape, generator=generator) * 0.5 if "lora_B" in key else value
                     for key, value in tiny.model.trained_state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def clips_and_prompts():
    clips = [make_clip(1.5), make_clip(6.0, seed=1)]
    return clips, [load_config("tiny").prompt.task_prompt("asr")] * len(clips)


@pytest.fixture(scope="module")
def base(trained):
    return load_model(load_config("tiny"), checkpoint=trained, device="cpu")


def load(trained: str, overrides: dict):
    return load_model(load_config("tiny", overrides), checkpoint=trained, device="cpu")


def test_merged_lora_gives_the_adapters_outputs_without_their_modules(trained, base, clips_and_prompts):
    clips, prompts = clips_and_prompts
    merged = load(trained, {"lora": {"merge": True}})
    assert not [name for name, _ in merged.model.llama_model.named_modules() if "lora" in name]
    assert [name for name, _ in base.model.llama_model.named_modules() if "lora_B" in name]
    logits = base.model.next_token_logits(clips, prompts)
    with base.model.llama_model.disable_adapter():
        assert (base.model.next_token_logits(clips, prompts) - logits).abs().max() > 1e-2  # the adapters matter here
    torch.testing.assert_close(merged.model.next_token_logits(clips, prompts), logits, rtol=1e-4, atol=1e-4)
    assert merged.model.generate(clips, prompts, GREEDY).token_ids == base.model.generate(clips, prompts, GREEDY).token_ids
    assert merged.identity == f"{base.identity}+lora-merged"


def test_int8_quantises_the_llms_linear_layers_and_nothing_else(trained, base, clips_and_prompts):
    clips, prompts = clips_and_prompts
    int8 = load(trained, {"llm": {"quantization": "int8"}})
    llm_linears = {name: type(module) for name, module in int8.model.llama_model.named_modules()
                   if isinstance(module, (torch.nn.Linear, DynamicInt8Linear))}
    adapters = {name: kind for name, kind in llm_linears.items() if ".lora_" in name}
    assert adapters and set(adapters.values()) == {torch.nn.Linear}  # LoRA stays float
    assert {kind for name, kind in llm_linears.items() if name not in adapters} == {DynamicInt8Linear}
    for part in ("speech_encoder", "ced", "speech_Qformer", "speech_llama_proj"):  # every other part as it was
        assert not any(isinstance(module, DynamicInt8Linear) for module in getattr(int8.model, part).modules()), part
    for one, other in zip(int8.model.audio_tokens(clips), base.model.audio_tokens(clips)):
        assert torch.equal(one, other)
    logits, reference = int8.model.next_token_logits(clips, prompts), base.model.next_token_logits(clips, prompts)
    assert 0 < (logits - reference).abs().max() < 0.1 * reference.abs().max()  # int8 rounding, no more
    # the activations are quantised with the whole batch's scale: an item's scores move with its batch-mates
    alone = torch.cat([int8.model.next_token_logits([clip], [prompt]) for clip, prompt in zip(clips, prompts)])
    assert 0 < (logits - alone).abs().max() < 0.1 * reference.abs().max()
    assert int8.identity == base.identity.replace("+float32", "+llm-int8:encoders-float32")


def test_int8_is_refused_on_a_gpu_and_beside_a_half_precision_dtype():
    config = load_config("tiny", {"llm": {"quantization": "int8"}})
    with pytest.raises(ConfigError, match="CPU only"):
        check_quantization(config.llm, H100)
    with pytest.raises(ConfigError, match="CPU only"):
        precision_tag(config, H100)  # the job's driver names the run's precision before any actor loads it
    with pytest.raises(ConfigError, match="dtype bfloat16 does not combine"):
        load_config("tiny", {"llm": {"quantization": "int8"}, "dtype": "bfloat16"})


def test_pooled_audio_tokens_are_the_means_of_pairs_of_tokens(base, trained, clips_and_prompts):
    clips, prompts = clips_and_prompts
    pooled = load(trained, {"qformer": {"pool_tokens": 2}})
    tokens, halves = base.model.audio_tokens(clips), pooled.model.audio_tokens(clips)
    assert [len(item) for item in tokens] == [88, 88] and [len(item) for item in halves] == [44, 44]
    for whole, half in zip(tokens, halves):  # the projection is linear: the mean of projections is the projection of the mean
        torch.testing.assert_close(half, whole.unflatten(0, (44, 2)).mean(1), rtol=1e-5, atol=1e-5)
    batch = pooled.model.generate(clips, prompts, GREEDY).token_ids
    assert batch == [pooled.model.generate([clip], [prompt], GREEDY).token_ids[0] for clip, prompt in zip(clips, prompts)]
    assert pooled.identity == f"{base.identity}+pool-tokens-2"


def test_the_identity_names_every_option_without_loading_the_model():
    config = load_config("tiny", {"lora": {"merge": True}, "llm": {"quantization": "int8"}, "qformer": {"pool_tokens": 3}})
    assert model_identity(config) == "tiny+no-checkpoint+llm-int8:encoders-float32+lora-merged+pool-tokens-3"
