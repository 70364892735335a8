"""Step 1 of the GPU check: correctness in float32, bfloat16, float16 with flash attention off (a V100's
kernels) and a V100's default for Qwen2 (a float32 LLM with float16 encoders), with random weights; the
precision helpers the efficiency step reuses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.gpu_check.context import QWEN_TOKENIZER, Context, empty_cache


# Step 1: correctness in half precision


def correctness(ctx: Context) -> None:
    """Per model (random weights), in each of PRECISIONS (bfloat16 on GPUs of capability >= 8.0 only): a
    batch of clips of different lengths with different task prompts (left padding) against each item alone,
    the batch permuted against the batch, the items against each other (a swap must show above the batch's
    error), each half precision against float32, and every score finite."""
    from nota_model.testing import synthetic_clip
    from nota_model.build import load_model
    from nota_model.config import DecodingConfig, load_config
    from nota_model.precision import device_capability, native_bfloat16

    models = {"tiny": {}} if ctx.quick else {"tiny": {}, "nota-0.5b": QWEN_TOKENIZER}
    items = QUICK_ITEMS if ctx.quick else ITEMS
    decoding = DecodingConfig(num_beams=1, max_new_tokens=4 if ctx.quick else 16)
    results: dict[str, Any] = {"tolerances": {name: asdict(t) for name, t in TOLERANCES.items()},
                               "items": [f"{s} s {task}" for s, task in items], "models": {}}
    if ctx.quick:
        results["note"] = "quick mode: tiny only (nota-0.5b is for the GPU run)"
    native = native_bfloat16(device_capability(ctx.device))
    for name, overrides in models.items():
        loaded = load_model(load_config(name, {**overrides, "dtype": "float32"}), device=ctx.device)
        model = loaded.model
        amplify_audio(model, AUDIO_GAIN)
        clips = [synthetic_clip(seconds, seed=index) for index, (seconds, _) in enumerate(items)]
        prompts = [model.prompt_for(task) for _, task in items]
        master = {key: value.detach().clone() for key, value in model.state_dict().items()}
        entry: dict[str, Any] = {"model": loaded.identity, "variants": {}}
        results["models"][name] = entry
        reference = None
        for variant, (llm_dtype, encoder_dtype, flash) in PRECISIONS.items():
            if "bfloat16" in (llm_dtype, encoder_dtype) and not native:
                entry["variants"][variant] = {"skipped": "no native bfloat16 on this GPU"}
                continue
            set_precision(model, master, llm_dtype, encoder_dtype)
            with flash_attention(ctx.device, flash):
                run = precision_run(model, clips, prompts, decoding)
            reference = reference or run
            entry["variants"][variant] = judge(run, reference, TOLERANCES[variant])
            ctx.save(results)
        entry["passed"] = all(v.get("passed", True) for v in entry["variants"].values())
        ctx.save(results)
        del loaded, model, master
        empty_cache(ctx.device)
    failed = [name for name, entry in results["models"].items() if not entry["passed"]]
    if failed:
        raise RuntimeError(f"correctness failed for {', '.join(failed)} (see each variant's checks)")


# (seconds, task): different lengths and prompts in one batch, so that both the audio and the prompt are padded.
QUICK_ITEMS = ((1.5, "asr"), (3.0, "aac"), (1.0, "asr"))
ITEMS = ((4.0, "asr"), (12.0, "aac"), (7.0, "asr"), (30.0, "aac"), (2.5, "asr"))
# variant: (the LLM's dtype, the encoders' dtype, flash attention)
PRECISIONS = {"float32": ("float32", "float32", True), "bfloat16": ("bfloat16", "bfloat16", True),
              "float16-no-flash": ("float16", "float16", False),
              "llm-float32-encoders-float16-no-flash": ("float32", "float16", False)}


@dataclass(frozen=True)
class Tolerance:
    """What a precision's run must meet. `relative_error`: batch against each item alone and the permuted
    batch (same precision), and against float32. `swap_margin`: each batch item must be this many times closer
    to itself alone than to any other item alone (a swap inside the batch makes it at most 1). `reason`: why
    these values."""

    relative_error: float
    swap_margin: float
    reason: str


TOLERANCES = {
    "float32": Tolerance(1e-4, 3, "float32 rounding differs between batch shapes only in summation order"),
    "bfloat16": Tolerance(1e-1, 2, "bfloat16 keeps 8 mantissa bits (float16 11): its rounding, about 8 times "
                          "float16's, widens each item's distance to itself alone while the distance between items "
                          "stays, so 3 sat at the edge; 2 still needs each item twice as close to itself as to any "
                          "other, far from a swap's at most 1"),
    "float16-no-flash": Tolerance(5e-2, 3, "float16's 11 mantissa bits and the math attention kernels a V100 runs"),
    "llm-float32-encoders-float16-no-flash": Tolerance(
        5e-2, 3, "the encoders' float16 rounding alone, the LLM in float32: float16's tolerances"),
}# Random weights barely let the audio through (the Q-Former's queries dominate its output: first-token logits
# of different clips differ by ~1e-4); the encoder states' layer norms scaled by this make them differ by ~1e-2.
AUDIO_GAIN = 100.0


def amplify_audio(model: Any, gain: float) -> None:
    """Scale the layer norms on the encoders' states, so that the random-weight outputs depend on the audio."""
    import torch

    with torch.no_grad():
        for norm in (model.ln_speech, model.ln_audio):
            if norm is not None:
                norm.weight.mul_(gain)
                norm.bias.mul_(gain)


def set_precision(model: Any, master: dict[str, Any], llm_dtype: str, encoder_dtype: str) -> None:
    """The float32 weights back, then the precision as `load_model` sets it for those dtypes."""
    import torch

    model.float()
    model.load_state_dict(master)
    cast_model(model, getattr(torch, llm_dtype), getattr(torch, encoder_dtype))


def cast_model(model: Any, dtype: Any, encoder_dtype: Any = None) -> None:
    """The LLM in `dtype` and the encoders' matrices in `encoder_dtype` (default: `dtype`), as `load_model`
    casts them."""
    from nota_model.build import precast_encoders

    encoder_dtype = encoder_dtype or dtype
    model.llama_model.to(dtype)
    precast_encoders(model, encoder_dtype)
    model.encoder_dtype = encoder_dtype if encoder_dtype != dtype else None


@contextmanager
def flash_attention(device: str, enabled: bool) -> Iterator[None]:
    """Flash attention on or off for scaled_dot_product_attention (off: a V100's kernels) on CUDA."""
    import torch

    if device != "cuda":
        yield
        return
    previous = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.enable_flash_sdp(previous)


def precision_run(model: Any, clips: list, prompts: list[str], decoding: Any) -> dict[str, Any]:
    """Audio tokens and first-token logits of the batch, each item alone and the batch reversed; greedy texts
    batched and alone; whether any decode step's scores were non-finite."""
    import torch

    order = list(reversed(range(len(clips))))
    with torch.inference_mode():
        batch_tokens = [t.float() for t in model.audio_tokens(clips)]
        alone_tokens = [model.audio_tokens([clip])[0].float() for clip in clips]
        batch_logits = model.next_token_logits(clips, prompts)
        alone_logits = torch.cat([model.next_token_logits([clip], [prompt]) for clip, prompt in zip(clips, prompts)])
        reversed_logits = model.next_token_logits([clips[i] for i in order], [prompts[i] for i in order])[order]
        batch = model.generate(clips, prompts, decoding)
        alone = [model.generate([clip], [prompt], decoding) for clip, prompt in zip(clips, prompts)]
    return {"batch_tokens": batch_tokens, "alone_tokens": alone_tokens, "batch_logits": batch_logits,
            "alone_logits": alone_logits, "reversed_logits": reversed_logits, "batch_texts": batch.texts,
            "alone_texts": [out.texts[0] for out in alone],
            "non_finite": any(batch.non_finite) or any(flag for out in alone for flag in out.non_finite)}


def judge(run: dict[str, Any], reference: dict[str, Any], tolerance: Tolerance) -> dict[str, Any]:
    """One precision's checks against its tolerance (and float32's run, `reference`)."""
    import torch

    tokens_error = max(relative_error(b, a) for b, a in zip(run["batch_tokens"], run["alone_tokens"]))
    logits_error = max(relative_error(b, a) for b, a in zip(run["batch_logits"], run["alone_logits"]))
    permuted_error = max(relative_error(r, b) for r, b in zip(run["reversed_logits"], run["batch_logits"]))
    tokens_apart, tokens_swap = swap_margin(run["batch_tokens"], run["alone_tokens"])
    logits_apart, logits_swap = swap_margin(list(run["batch_logits"]), list(run["alone_logits"]))
    finite = not run["non_finite"] and all(bool(torch.isfinite(t).all()) for t in [*run["batch_tokens"], run["batch_logits"]])
    vs_float32 = {
        "audio_tokens_rel_error": relative_error(torch.cat(run["alone_tokens"]), torch.cat(reference["alone_tokens"])),
        "first_token_logits_rel_error": relative_error(run["alone_logits"], reference["alone_logits"]),
        "first_token_argmax_agreement": float((run["alone_logits"].argmax(-1) == reference["alone_logits"].argmax(-1)).float().mean()),
    }
    texts_equal = sum(a == b for a, b in zip(run["batch_texts"], run["alone_texts"]))
    checks = {
        "finite": finite,
        "batch_equals_alone": max(tokens_error, logits_error, permuted_error) < tolerance.relative_error,
        "a_swap_would_show": min(tokens_swap, logits_swap) > tolerance.swap_margin,
        "close_to_float32": run is reference
        or max(vs_float32["audio_tokens_rel_error"], vs_float32["first_token_logits_rel_error"]) < tolerance.relative_error,
        "greedy_texts_batch_equal_alone": run is not reference or texts_equal == len(run["batch_texts"]),  # required in float32
    }
    return {"tolerance": tolerance.relative_error, "required_swap_margin": tolerance.swap_margin,
            "audio_tokens_batch_vs_alone": tokens_error, "logits_batch_vs_alone": logits_error,
            "logits_permuted_vs_batch": permuted_error, "audio_tokens_items_apart": tokens_apart,
            "logits_items_apart": logits_apart, "audio_tokens_swap_margin": tokens_swap, "logits_swap_margin": logits_swap, **vs_float32, "texts_equal": f"{texts_equal}/{len(run['batch_texts'])}",
            "checks": checks, "passed": all(checks.values())}


def swap_margin(batch: list, alone: list) -> tuple[float, float]:
    """(the least relative distance between two items alone; the least ratio, over the batch's items, of the
    distance to the nearest other item alone to the distance to the item itself alone): a swap inside the
    batch shows when the ratio is well above 1. Items of different lengths are compared on their common part."""
    count = len(alone)
    apart = min(relative_error(*shortest(alone[i], alone[j])) for i in range(count) for j in range(count) if i != j)
    ratios = [min(relative_error(*shortest(batch[i], alone[j])) for j in range(count) if j != i)
              / max(relative_error(batch[i], alone[i]), 1e-12) for i in range(count)]
    return apart, min(ratios)


def shortest(a: Any, b: Any) -> tuple[Any, Any]:
    length = min(len(a), len(b))
    return a[:length], b[:length]


def relative_error(value: Any, reference: Any) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))
