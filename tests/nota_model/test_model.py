import warnings

import pytest
import torch

from nota_model.audio_context import whisper_encoder_states
from nota_model.build import load_model
from nota_model.config import DecodingConfig
from nota_model.errors import ConfigError
from tests.conftest import make_clip

ASR, AAC = "asr", "aac"


def prompts_for(model, tasks):
    return [model.config.prompt.task_prompt(task) for task in tasks]


def test_30_seconds_give_88_audio_tokens_of_llm_width(tiny):
    model = tiny.model
    tokens = model.audio_tokens([make_clip(30.0), make_clip(2.5, seed=1)])
    hidden = model.llama_model.get_input_embeddings().embedding_dim
    assert [t.shape for t in tokens] == [(88, hidden), (88, hidden)]


def test_prompt_layout_is_bos_prompt_audio_prompt_with_left_padding(tiny):
    model = tiny.model
    audio = [torch.randn(88, 64), torch.randn(88, 64)]
    custom = "<Speech><SpeechHere></Speech> Is there a dog barking in this recording? Answer yes or no."
    embeds, mask = model.prompt_embeddings(audio, [model.config.prompt.task_prompt(ASR), custom])
    embed = model.llama_model.get_input_embeddings()
    before = model.tokenizer("USER: <Speech>", add_special_tokens=False).input_ids
    short = int(mask[0].sum())
    assert mask[1].all() and not mask[0, : len(mask[0]) - short].any()
    start = len(mask[0]) - short
    assert torch.equal(embeds[0, start], embed.weight[model.tokenizer.convert_tokens_to_ids("<|im_start|>")])
    assert torch.equal(embeds[0, start + 1 : start + 1 + len(before)], embed.weight[before])
    audio_at = start + 1 + len(before)
    assert torch.equal(embeds[0, audio_at : audio_at + 88], audio[0])
    assert torch.equal(embeds[1, 1 + len(before) : 1 + len(before) + 88], audio[1])


def mixed_batch(model) -> tuple[list, list[str]]:
    """Clips of different lengths with both tasks' prompts and a custom one: the batch that must act as its items alone."""
    prompts = prompts_for(model, [ASR, AAC, ASR])
    prompts[2] = "<Speech><SpeechHere></Speech> What is said?"
    return [make_clip(1.2), make_clip(30.0, seed=1), make_clip(7.0, seed=2)], prompts


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_batch_gives_the_same_output_as_each_item_alone(tiny, num_beams):
    model = tiny.model
    clips, prompts = mixed_batch(model)
    decoding = DecodingConfig(num_beams=num_beams, max_new_tokens=8)
    batch = model.generate(clips, prompts, decoding)
    alone = [model.generate([clip], [prompt], decoding) for clip, prompt in zip(clips, prompts)]
    assert batch.token_ids == [one.token_ids[0] for one in alone]
    assert batch.texts == [one.texts[0] for one in alone]


def test_a_batch_gives_the_next_token_logits_of_each_item_alone(tiny):
    model = tiny.model
    clips, prompts = mixed_batch(model)
    batch_logits = model.next_token_logits(clips, prompts)
    for index, (clip, prompt) in enumerate(zip(clips, prompts)):
        torch.testing.assert_close(batch_logits[index], model.next_token_logits([clip], [prompt])[0], rtol=1e-4, atol=1e-4)


def test_generation_reports_tokens_and_timing(tiny):
    output = tiny.model.generate([make_clip(3.0), make_clip(4.0, seed=3)], prompts_for(tiny.model, [ASR, AAC]),
                                 DecodingConfig(num_beams=1, max_new_tokens=6))
    assert len(output.texts) == 2 and all(isinstance(t, str) for t in output.texts)
    assert all(0 <= n <= 6 for n in output.output_tokens)
    assert output.output_tokens == [len(ids) for ids in output.token_ids]
    assert 1 <= output.decode_steps <= 6 and output.ttft_s > 0
    assert output.tpot_s is None if output.decode_steps == 1 else output.tpot_s > 0


def test_generation_stops_at_a_stop_token_and_cuts_it(tiny):
    model = tiny.model
    clip, prompt = make_clip(2.0), prompts_for(model, [ASR])
    greedy = DecodingConfig(num_beams=1, max_new_tokens=8, min_new_tokens=0)
    free = model.generate([clip], prompt, greedy).token_ids[0]
    fresh = [k for k in range(len(free)) if free[k] not in free[:k]]
    step = fresh[-1]  # the random tiny model often repeats itself; any first occurrence will do
    stop_token = model.tokenizer.convert_ids_to_tokens(free[step])
    original = model.end_token_id
    model.end_token_id = free[step]
    try:
        stopped = model.generate([clip], prompt, greedy)
        at_least_one = model.generate([clip], prompt, greedy.model_copy(update={"min_new_tokens": 1}))
    finally:
        model.end_token_id = original
    assert stopped.token_ids[0] == free[:step] and stopped.decode_steps == step + 1
    assert at_least_one.output_tokens[0] >= 1
    extra = model.generate([clip], prompt, greedy.model_copy(update={"extra_stop_tokens": (stop_token,)}))
    assert extra.token_ids == stopped.token_ids


def test_a_prompt_without_the_placeholder_is_rejected(tiny):
    with pytest.raises(ConfigError, match="SpeechHere"):
        tiny.model.generate([make_clip(1.0)], ["Recognize the speech."])


def test_lora_changes_outputs_only_when_enabled(tiny):
    model = tiny.model
    clips, prompts = [make_clip(2.0)], prompts_for(model, [ASR])
    with model.llama_model.disable_adapter():
        base = model.next_token_logits(clips, prompts)
    torch.testing.assert_close(model.next_token_logits(clips, prompts), base)  # lora_B starts at zero
    lora_b = [p for n, p in model.llama_model.named_parameters() if "lora_B" in n]
    assert lora_b
    saved = [p.data.clone() for p in lora_b]
    try:
        for p in lora_b:
            p.data.normal_(std=0.5)
        changed = model.next_token_logits(clips, prompts)
        with model.llama_model.disable_adapter():
            disabled = model.next_token_logits(clips, prompts)
    finally:
        for p, s in zip(lora_b, saved):
            p.data.copy_(s)
    assert (changed - base).abs().max() > 1e-3
    torch.testing.assert_close(disabled, base)


def test_speech_only_model_without_an_audio_encoder(tiny_config):
    config = tiny_config.with_overrides({"audio_encoder": {"kind": "none"}, "lora": {"enabled": False}})
    model = load_model(config, device="cpu").model
    assert model.ced is None and model.ln_audio is None
    assert model.audio_tokens([make_clip(1.0)])[0].shape[0] == 88
    assert not any("lora" in key for key in model.state_dict())


def test_half_precision_casts_the_encoders_matrices_and_keeps_norms_and_connector_in_float32(tiny_config):
    model = load_model(tiny_config.with_overrides({"dtype": "bfloat16"}), device="cpu").model
    assert model.dtype == model.speech_encoder.conv1.weight.dtype == torch.bfloat16  # autocast's cast, once at load
    assert model.speech_encoder.layer_norm.weight.dtype == model.speech_Qformer.bert.embeddings.LayerNorm.weight.dtype == torch.float32
    assert model.ced.front_end.fbank_mean.dtype == torch.float32
    tokens = model.audio_tokens([make_clip(1.5)])
    assert tokens[0].dtype == torch.bfloat16
    assert model.generate([make_clip(1.5)], prompts_for(model, [ASR]), DecodingConfig(num_beams=2, max_new_tokens=3)).decode_steps >= 1


def test_half_precision_windows_reach_the_qformer_in_half_precision(tiny_config):
    model = load_model(tiny_config.with_overrides({"dtype": "bfloat16"}), device="cpu").model
    seen = []
    model.speech_Qformer.register_forward_pre_hook(lambda module, args: seen.append(args[1].dtype))
    model.audio_tokens([make_clip(1.5), make_clip(0.7)])
    assert seen == [torch.bfloat16]


def test_loading_the_model_warns_of_nothing(tiny_config):  # an actor's warnings reach the job's log
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(tiny_config, device="cpu")


def test_the_static_cache_gives_the_dynamic_caches_tokens(tiny):
    model = tiny.model
    clips, prompts = [make_clip(1.2), make_clip(6.0, seed=1)], prompts_for(model, [ASR, AAC])
    dynamic = DecodingConfig(num_beams=1, max_new_tokens=8)
    static = dynamic.model_copy(update={"cache": "static"})
    assert model.generate(clips, prompts, static).token_ids == model.generate(clips, prompts, dynamic).token_ids
    with pytest.raises(ValueError, match="cache: static"):
        DecodingConfig(compile=True)


def test_a_trimmed_audio_context_gives_fewer_audio_tokens_batched_as_alone(tiny_config):
    config = tiny_config.with_overrides({"speech_encoder": {"audio_context": {"mode": "clip", "margin_seconds": 1.0}}})
    model = load_model(config, device="cpu").model
    clips = [make_clip(1.2), make_clip(7.0, seed=1), make_clip(2.5, seed=2)]
    tokens = model.audio_tokens(clips)
    # 1.2 s + 1 s -> 3 s of input: 150 states, 8 windows of 17; 7 s + 1 s -> 8 s: 400 states, 23 windows;
    # 2.5 s + 1 s -> 4 s: 200 states, 11 windows.
    assert [len(t) for t in tokens] == [8, 23, 11]
    for batched, clip in zip(tokens, clips):
        torch.testing.assert_close(batched, model.audio_tokens([clip])[0], rtol=1e-5, atol=1e-5)
    decoding = DecodingConfig(num_beams=1, max_new_tokens=5)
    prompts = prompts_for(model, [ASR] * 3)
    assert model.generate(clips, prompts, decoding).token_ids == [model.generate([c], [p], decoding).token_ids[0] for c, p in zip(clips, prompts)]


def test_the_full_audio_context_runs_the_encoder_as_transformers_does(tiny):
    encoder = tiny.model.speech_encoder
    log_mel = torch.randn(2, 80, 3000)
    with torch.no_grad():
        reference = encoder(log_mel).last_hidden_state
        trimmed = whisper_encoder_states(encoder, log_mel[..., :1000])
    assert torch.equal(whisper_encoder_states(encoder, log_mel), reference)
    assert trimmed.shape == (2, 500, encoder.config.d_model)
