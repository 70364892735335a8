"""Batched generation with a timing report: transformers' `generate` (greedy or beam, KV cache) on
prompt embeddings, stopping on the end symbol alone, timed per decode step."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    CompileConfig,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from nota_model.config import DecodingConfig
from nota_model.word_times import Word


def next_forward_cache(output: object) -> dict[str, object]:
    """The KV cache of an LLM forward's `output`, as the keyword argument the next forward takes it by:
    `cache` from transformers 5 on, `past_key_values` before (the lent GPU machine's image may have either)."""
    cache = getattr(output, "cache", None)
    return {"cache": cache} if cache is not None else {"past_key_values": output.past_key_values}


@dataclass(frozen=True)
class GenerationOutput:
    """One batch's results. `output_tokens` counts each item's tokens before its stop token.
    `ttft_s`: start of the batch (audio encoders included) to its first token; `tpot_s`: mean time of the
    later decode steps (None when there was only one step). Times are synchronised on GPU. `non_finite`: per
    item, whether a decode step's scores held NaN or +inf (a float16 overflow; empty: not checked).
    `logprob_sums`: per item, the sum of the log-probabilities of its tokens and of its stop token (not of a
    token past the `max_new_tokens` limit: there is none), as decoding chose them (empty: the engine gave none).
    Whisper only (empty for a model without them): per item, `languages`, the language its text is in, and
    `language_probabilities`, how likely the model finds that language in the clip (None where it cannot tell:
    an English-only model); `words`, its words with their times in seconds of the clip (None: not asked for)."""

    texts: list[str]
    token_ids: list[list[int]]
    output_tokens: list[int]
    ttft_s: float
    tpot_s: float | None
    decode_steps: int
    non_finite: tuple[bool, ...] = ()
    logprob_sums: tuple[float | None, ...] = ()
    languages: tuple[str, ...] = ()
    language_probabilities: tuple[float | None, ...] = ()
    words: tuple[list[Word] | None, ...] = ()


class NonFiniteScores(LogitsProcessor):
    """Changes no score; marks the items whose scores held NaN or +inf at any step (-inf is a masked token),
    on the device, so that checking costs no synchronisation until the end."""

    def __init__(self, num_beams: int):
        self.num_beams = num_beams
        self.flags: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = (torch.isnan(scores) | torch.isposinf(scores)).any(-1)
        self.flags = bad if self.flags is None else self.flags | bad
        return scores

    def items(self) -> tuple[bool, ...]:
        if self.flags is None:
            return ()
        return tuple(self.flags.view(-1, self.num_beams).any(-1).tolist())


class ChosenLogprobs(LogitsProcessor):
    """Changes no score; under greedy search records, at each step and for every row, the log-probability of the
    token greedy search picks: the highest of the final scores (this processor runs after the model's own, which
    `generate` puts first), normalized. Beam search reorders its rows between steps: nothing is recorded there."""

    def __init__(self, num_beams: int):
        self.greedy = num_beams == 1
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            self.steps.append(scores.max(-1).values - torch.logsumexp(scores, -1))
        return scores

    def sums(self, steps: Sequence[int]) -> tuple[float, ...]:
        """Each row's sum over its first `steps[row]` steps; empty when nothing was recorded."""
        if not self.steps:
            return ()
        table = torch.stack(self.steps, 1).double().cpu()
        return tuple(float(row[:count].sum()) for row, count in zip(table, steps))


class StepClock(StoppingCriteria):
    """Never stops generation; records when each decode step's token is chosen."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(self.now())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generation_config(
    decoding: DecodingConfig, stop_token_ids: list[int], pad_token_id: int, base: GenerationConfig | None = None
) -> GenerationConfig:
    """`decoding` over `base` (a model's own generation config, whose other fields it keeps)."""
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.max_length = config.min_length = None  # new-token limits below replace total-length ones
    config.update(
        do_sample=False,
        num_beams=decoding.num_beams,
        max_new_tokens=decoding.max_new_tokens,
        min_new_tokens=decoding.min_new_tokens,
        length_penalty=decoding.length_penalty,
        repetition_penalty=decoding.repetition_penalty,
        eos_token_id=stop_token_ids,
        pad_token_id=pad_token_id,
    )
    return config


def with_llm_cache(config: GenerationConfig, decoding: DecodingConfig) -> GenerationConfig:
    """`config` with the KV cache and compilation `decoding` asks for. transformers compiles a static-cache
    forward by itself on GPUs only: here compilation is on (on every device) or off as `decoding.compile` says."""
    if decoding.cache == "static":
        compile_config = None
        if decoding.compile:
            compile_config = CompileConfig()
            compile_config._compile_all_devices = True  # transformers' own switch for compiling off GPUs
        config.update(cache_implementation="static", compile_config=compile_config, disable_compile=not decoding.compile)
    return config


def timed_generate(
    prepare: Callable[[], dict[str, torch.Tensor]],
    model: torch.nn.Module,
    config: GenerationConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    prompt_length: int = 0,
) -> GenerationOutput:
    """Run `prepare()` (encoders, prompt assembly) and `model.generate(**inputs)`, timing both.
    `prompt_length`: leading tokens of the returned sequences that are the decoder prompt, not output."""
    clock, finite, logprobs = StepClock(device), NonFiniteScores(config.num_beams), ChosenLogprobs(config.num_beams)
    start = clock.now()
    with torch.inference_mode():
        sequences = model.generate(**prepare(), generation_config=config, stopping_criteria=StoppingCriteriaList([clock]),
                                   logits_processor=LogitsProcessorList([finite, logprobs]))
    answers = [row[prompt_length:].tolist() for row in sequences]
    token_ids = [_until_stop(ids, set(config.eos_token_id)) for ids in answers]
    steps = len(clock.times)
    return GenerationOutput(
        texts=[tokenizer.decode(ids, skip_special_tokens=False) for ids in token_ids],
        token_ids=token_ids,
        output_tokens=[len(ids) for ids in token_ids],
        ttft_s=clock.times[0] - start,
        tpot_s=(clock.times[-1] - clock.times[0]) / (steps - 1) if steps > 1 else None,
        decode_steps=steps,
        non_finite=finite.items(),
        logprob_sums=logprobs.sums([len(ids) + (len(ids) < len(answer)) for ids, answer in zip(token_ids, answers)]),
    )


def _until_stop(ids: list[int], stop_token_ids: set[int]) -> list[int]:
    return next((ids[:i] for i, token in enumerate(ids) if token in stop_token_ids), ids)


def generate_in_groups(groups: Sequence[Sequence[int]], run: Callable[[list[int]], GenerationOutput]) -> GenerationOutput:
    """`run(indices)` for each group of item indices (items that must share a forward), the results put back
    in item order. Times: the first group's ttft_s, the later steps' mean tpot_s over all groups."""
    if len(groups) == 1:
        return run(list(groups[0]))
    outputs = [(list(indices), run(list(indices))) for indices in groups]
    picks = {index: (output, position) for indices, output in outputs for position, index in enumerate(indices)}
    order = [picks[index] for index in sorted(picks)]
    later_steps = [(out.decode_steps - 1, out.tpot_s) for _, out in outputs if out.tpot_s is not None]
    steps = sum(count for count, _ in later_steps)

    def in_order(field: str, missing: object = None) -> tuple:
        """A per-item field in item order (`missing` for a group without it); empty where no group has it."""
        if not any(getattr(output, field) for _, output in outputs):
            return ()
        return tuple(getattr(output, field)[position] if getattr(output, field) else missing for output, position in order)

    return GenerationOutput(
        texts=[output.texts[position] for output, position in order],
        token_ids=[output.token_ids[position] for output, position in order],
        output_tokens=[output.output_tokens[position] for output, position in order],
        ttft_s=outputs[0][1].ttft_s,
        tpot_s=sum(count * tpot for count, tpot in later_steps) / steps if steps else None,
        decode_steps=sum(out.decode_steps for _, out in outputs),
        non_finite=in_order("non_finite", False),
        logprob_sums=in_order("logprob_sums"),
        languages=in_order("languages"),
        language_probabilities=in_order("language_probabilities"),
        words=in_order("words"),
    )
