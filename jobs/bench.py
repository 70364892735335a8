"""Per-request efficiency of a model on this machine: time to first token (TTFT), time per output token
(TPOT), end-to-end time, throughput and peak memory, per batch size.

Measured right: every time is synchronised on GPU, each item is its own synthetic clip (a chirp plus
noise), and greedy decoding makes exactly --new-tokens tokens, so TPOT averages new_tokens - 1 steps.
Beside it, the seed project's method reproduced (NOTA models only): batch 1, one clip, no device
synchronisation, TPOT from ONE decode step; and the seed's published numbers, for comparison.

Peak memory per batch size, after its warm-up: on CUDA `torch.cuda.max_memory_allocated`; on CPU the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs; where that cannot be written, the peak
since the process started).

Usage: python -m jobs.bench [--model tiny] [--checkpoint C] [--set KEY=VALUE] [--device cuda]
           [--seconds 10] [--batch-sizes 1,4,8] [--new-tokens 32] [--repeats 5] [--warmup 1] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.command_line import module_entry
from nota_model.config import DecodingConfig, load_config
from nota_model.overrides import parse_overrides

# torch, transformers and the model are imported in the functions that use them, so that --help, a usage error
# and a bad --model or --set answer before they load.
if TYPE_CHECKING:
    import torch

    from nota_model.audio import AudioClip
    from nota_model.build import LoadedModel
    from nota_model.decoding import GenerationOutput
    from nota_model.model import NotaModel
    from nota_model.whisper_asr import WhisperASR

# What the seed project published: batch 1, 10 s of noise, unsynchronised, TPOT of one decode step.
SEED_PUBLISHED = {"ttft_s": 0.1722, "tpot_s": 0.038, "peak_memory_gb": 3.83}  # memory: GPU VRAM

CUDA_ALLOCATED = "cuda max_memory_allocated"
CPU_PEAK_RSS = "cpu peak RSS (VmHWM, reset per batch size)"
CPU_PEAK_SINCE_START = "cpu peak RSS: process peak since start (ru_maxrss)"


@dataclass(frozen=True)
class BenchSettings:
    seconds: float = 10.0
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1

    def decoding(self) -> DecodingConfig:
        return DecodingConfig(num_beams=1, min_new_tokens=self.new_tokens, max_new_tokens=self.new_tokens)


def bench(loaded: LoadedModel, settings: BenchSettings) -> dict[str, Any]:
    """The whole report: header, one entry per batch size, the seed's method and published numbers."""
    import torch

    model = loaded.model
    device = model.device
    batches = [bench_batch_size(model, size, settings) for size in settings.batch_sizes]
    seed = seed_method(model, settings)
    batch1 = next((b for b in batches if b["batch_size"] == 1), None)
    return {
        "model": loaded.identity,
        "random_parts": list(loaded.random_parts),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(model.dtype),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "clip_seconds": settings.seconds,
        "new_tokens": settings.new_tokens,
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "batches": batches,
        "seed_method": seed,
        "seed_published": SEED_PUBLISHED,
        "batch1_comparison": comparison(batch1, seed),
    }


def bench_batch_size(model: NotaModel | WhisperASR, batch_size: int, settings: BenchSettings) -> dict[str, Any]:
    """`warmup` untimed then `repeats` timed generate calls on `batch_size` distinct clips."""
    from jobs.metrics.memory import gpu_memory
    from nota_model.testing import synthetic_clip

    clips = [synthetic_clip(settings.seconds, seed=i) for i in range(batch_size)]
    prompts = [model.prompt_for("asr")] * batch_size
    for _ in range(settings.warmup):
        model.generate(clips, prompts, settings.decoding())
    memory_kind = reset_peak_memory(model.device)
    runs = [timed_run(model, clips, prompts, settings.decoding()) for _ in range(settings.repeats)]
    peak = peak_memory_bytes(model.device, memory_kind)
    return {
        "batch_size": batch_size,
        "ttft_s": spread([out.ttft_s for out, _ in runs]),
        "tpot_s": spread([out.tpot_s for out, _ in runs]),
        "tpot_steps": runs[-1][0].decode_steps - 1,
        "e2e_s": spread([e2e for _, e2e in runs]),
        "items_per_s": spread([batch_size / e2e for _, e2e in runs]),
        "output_tokens_per_s": spread([sum(out.output_tokens) / e2e for out, e2e in runs]),
        "output_tokens_per_item": spread([n for out, _ in runs for n in out.output_tokens]),
        "peak_memory_bytes": peak,
        "peak_memory_gb": round(peak / 1e9, 3),
        "memory_kind": memory_kind,
        "gpu_memory": gpu_memory(model.device) if model.device.type == "cuda" else None,
    }


def timed_run(
    model: NotaModel | WhisperASR, clips: list[AudioClip], prompts: list[str], decoding: DecodingConfig
) -> tuple[GenerationOutput, float]:
    """One generate call and its synchronised end-to-end seconds."""
    start = now(model.device)
    output = model.generate(clips, prompts, decoding)
    return output, now(model.device) - start


def seed_method(model: NotaModel | WhisperASR, settings: BenchSettings) -> dict[str, Any]:
    """The seed's timing, reproduced: batch 1, one clip, no synchronisation anywhere. TTFT: audio tokens,
    prompt embeddings and one LLM forward over the prompt (logits at every prompt position, as a plain forward
    gives them; generate keeps only the last); TPOT: ONE decode step from its KV cache."""
    import torch

    from nota_model.model import NotaModel
    from nota_model.testing import synthetic_clip

    if not isinstance(model, NotaModel):
        return {"ttft_s": None, "tpot_s": None, "reason": "the seed's method times NOTA parts (audio tokens, LLM)"}
    clip, prompt = synthetic_clip(settings.seconds, seed=0), model.prompt_for("asr")
    with torch.inference_mode():
        for _ in range(settings.warmup):
            seed_step_times(model, clip, prompt)
        times = [seed_step_times(model, clip, prompt) for _ in range(settings.repeats)]
    return {
        "batch_size": 1,
        "synchronised": False,
        "tpot_steps": 1,
        "ttft_s": round(statistics.median(ttft for ttft, _ in times), 6),
        "tpot_s": round(statistics.median(tpot for _, tpot in times), 6),
    }


def seed_step_times(model: NotaModel, clip: AudioClip, prompt: str) -> tuple[float, float]:
    """Unsynchronised seconds of (prompt up to its LLM forward, the next token's decode step)."""
    import torch.nn.functional as F

    from nota_model.decoding import next_forward_cache
    from nota_model.model import positions

    start = time.perf_counter()
    embeds, mask = model.prompt_embeddings(model.audio_tokens([clip]), [prompt])
    llm = model.llama_model
    output = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), use_cache=True)
    first = time.perf_counter()
    token = output.logits[:, -1].argmax(-1, keepdim=True)
    mask = F.pad(mask, (0, 1), value=1)
    llm(input_ids=token, attention_mask=mask, position_ids=positions(mask)[:, -1:], use_cache=True,
        **next_forward_cache(output))
    return first - start, time.perf_counter() - first


def comparison(batch1: dict[str, Any] | None, seed: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Batch 1 side by side: measured right (medians), the seed's method here, the seed's published."""
    correct = {}
    if batch1:
        correct = {key: batch1[key]["median"] for key in ("ttft_s", "tpot_s")} | {"peak_memory_gb": batch1["peak_memory_gb"]}
    method = {"ttft_s": seed["ttft_s"], "tpot_s": seed["tpot_s"]}
    return {
        key: {"correct": correct.get(key), "seed_method": method.get(key), "seed_published": published}
        for key, published in SEED_PUBLISHED.items()
    }


def now(device: torch.device) -> float:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter()


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 6), "min": round(min(values), 6), "max": round(max(values), 6)}


def reset_peak_memory(device: torch.device) -> str:
    """Start a fresh peak; returns the kind of memory `peak_memory_bytes` will read."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return CUDA_ALLOCATED
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the kernel's peak RSS (VmHWM)
        return CPU_PEAK_RSS
    except OSError:
        return CPU_PEAK_SINCE_START


def peak_memory_bytes(device: torch.device, kind: str) -> int:
    if kind == CUDA_ALLOCATED:
        import torch

        return torch.cuda.max_memory_allocated(device)
    if kind == CPU_PEAK_RSS:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def batch_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(int(size) for size in text.split(","))
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive: {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset name or YAML config path")
    parser.add_argument("--checkpoint", help="trained parameters: seed .pth or safetensors, path or URL")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--batch-sizes", type=batch_sizes, default=(1, 4, 8), help="comma list, e.g. 1,4,8")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each item decodes, at least 2")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size")
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.warmup < 0:
        parser.error("--new-tokens must be at least 2, --repeats at least 1, --warmup at least 0")
    config = load_config(args.model, parse_overrides(args.set))
    from transformers.utils import logging as transformers_logging

    from nota_model.build import load_model

    transformers_logging.set_verbosity_error()
    loaded = load_model(config, checkpoint=args.checkpoint, device=args.device)
    settings = BenchSettings(args.seconds, args.batch_sizes, args.new_tokens, args.repeats, args.warmup)
    report = json.dumps(bench(loaded, settings), indent=2)
    if args.output:
        args.output.write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(module_entry(main))
