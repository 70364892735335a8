"""Steps 2 and 3 of the GPU check: the efficiency bench (jobs.bench's functions), and the job on the device with
the GPU's utilisation sampled through NVML."""

from __future__ import annotations

import shutil
import threading
import time
import traceback
from dataclasses import replace
from typing import Any

from benchmarks.gpu_check.context import QWEN_TOKENIZER, ROOT, Context, empty_cache
from benchmarks.gpu_check.precision import cast_model, flash_attention

NVML_INTERVAL_S = 0.05


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
    auto, sizes = model.dtype, settings.batch_sizes[:2]
    with flash_attention(ctx.device, False):  # a V100's kernels: flash attention off
        results["v100_emulation"] = bench_cast(model, probe, sizes, torch.float16)
        # dtype auto's choice on a V100 for a Qwen2-family LLM (nota_model.precision.llm_dtype): its cost
        results["v100_qwen2_default"] = bench_cast(model, probe, sizes, torch.float32, torch.float16)
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


def bench_cast(model: Any, settings: Any, sizes: tuple[int, ...], dtype: Any,
               encoder_dtype: Any = None) -> list[dict[str, Any]]:
    """jobs.bench once at each of `sizes`, the model cast from float32 to `dtype` (its encoders to
    `encoder_dtype`) as `load_model` would."""
    from jobs.bench import bench_batch_size

    model.float()
    cast_model(model, dtype, encoder_dtype)
    return [bench_batch_size(model, size, settings) | {"repeats": 1} for size in sizes]


# Step 3: the job on the device


def job(ctx: Context) -> None:
    """jobs.infer over the sample corpora on a local Ray: x real time from the job's summary, and the GPU's
    utilisation (NVML) sampled while the model phase ran (from the first batch's start to the last batch's end)."""
    import ray

    from jobs import infer
    from nota_model.packs import build

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
                    "wall_s": summary["wall_s"], "x_real_time": summary["wall_x_real_time"], "model_phase_s": round(end - start, 3),
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
