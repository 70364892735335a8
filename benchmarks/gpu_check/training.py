"""Training steps of the GPU check: jobs.train on a local Ray, and two workers on one device with
torch.distributed (no Ray)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from benchmarks.gpu_check.context import ROOT, Context


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
    dist.barrier()  # both ranks are done with their collectives
    # Rank 0 (the rendezvous store's host) hung in gloo's teardown, after both ranks' results were written and
    # the other rank had exited, in two suite runs on a 2-core machine: what the step measures is done, so the
    # rank ends here, without the teardown.
    os._exit(0)
