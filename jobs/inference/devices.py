"""The device a model actor runs on: the GPUs Ray assigned it, never what torch happens to see.

Ray 2.60 no longer clears CUDA_VISIBLE_DEVICES for a worker given no GPU, so `torch.cuda.is_available()` is
true in a CPU actor on a GPU node: such an actor would take GPU 0 with nothing reserved for it. And an actor
given a GPU whose torch sees no CUDA must not go on in fp32 on the CPU as if nothing were wrong."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import ray
import torch

from nota_model.precision import Capability, device_capability

# Tests declare fake Ray GPUs on machines without CUDA (`ray.init(num_gpus=2)`); with this set to 1 in the
# actors' environment, an actor given such a GPU runs on the CPU instead of failing.
FAKE_GPUS_ENV = "NOTA_FAKE_GPUS"


class GPUUnavailableError(RuntimeError):
    """Ray assigned the actor a GPU that torch cannot use."""


def actor_device() -> torch.device:
    """The calling Ray actor's device, from the GPUs Ray assigned it."""
    return assigned_device(ray.get_gpu_ids(), fake_gpus=os.environ.get(FAKE_GPUS_ENV) == "1")


def assigned_device(gpu_ids: Sequence[int | str], fake_gpus: bool = False) -> torch.device:
    """CPU for an actor given no GPU (and CUDA hidden from it, so that no library reaches for a GPU it did
    not reserve); the first assigned GPU otherwise, or a loud error when torch cannot use it."""
    if not gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return torch.device("cpu")
    if torch.cuda.is_available():
        # Ray narrows CUDA_VISIBLE_DEVICES to the assigned GPUs, whose first is then cuda:0.
        return torch.device("cuda", 0 if os.environ.get("CUDA_VISIBLE_DEVICES") else int(gpu_ids[0]))
    if fake_gpus:
        return torch.device("cpu")
    raise GPUUnavailableError(
        f"Ray assigned this actor GPU {','.join(map(str, gpu_ids))} but torch {torch.__version__} sees no CUDA device "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): install a CUDA build of torch and the "
        "NVIDIA driver on the node, or run with --accelerator cpu"
    )


# Messages of errors that leave the device (its CUDA context) unusable: no later batch on this process can
# succeed, so they end the actor (Ray restarts it and redoes its batch) instead of becoming error rows.
DEVICE_FAILURE_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert",
                          "no kernel image", "illegal memory access", "NCCL error", "CUDA driver error")
DEVICE_FAILURE_EXIT_CODE = 75


class DeviceFailure(RuntimeError):
    """The device failed under the model: the actor must end, not write the batch's items as errors."""


def is_device_failure(err: BaseException) -> bool:
    """Whether `err` is a device failure (out of memory is not: a smaller batch may fit)."""
    if isinstance(err, torch.OutOfMemoryError) or not isinstance(err, RuntimeError):
        return False
    message = str(err)
    return any(marker.lower() in message.lower() for marker in DEVICE_FAILURE_MARKERS)


def end_actor(err: DeviceFailure) -> None:
    """End this actor's process, saying why on its stderr (the Ray worker log): Ray Data then restarts the
    actor, up to `--actor-restarts` times, and redoes its batch on the new one. An exception would instead
    keep the broken CUDA context alive (actor tasks are not retried on application errors) or fail the job."""
    print(f"nota-batch: model actor {os.getpid()} ends on a device failure, for Ray to restart it: {err.__cause__!r}",
          file=sys.stderr, flush=True)
    os._exit(DEVICE_FAILURE_EXIT_CODE)


def uses_gpus(accelerator: str) -> bool:
    """Whether the model actors ask for GPUs (`--accelerator`; auto: the cluster has GPUs now)."""
    return accelerator == "gpu" or (accelerator == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def run_capability(on_gpu: bool) -> Capability:
    """The compute capability the model actors will run on, for the precision `auto` means there (asked of a
    GPU by a Ray task, which waits for a GPU node to join); None for CPU actors or fake GPUs. Each actor checks
    that it runs in this precision (`Predictor`), so that no output mixes float16 and bfloat16 rows."""
    return ray.get(_gpu_capability.remote()) if on_gpu else None


@ray.remote(num_gpus=1, num_cpus=0)  # Ray ends a GPU task's worker after it (max_calls=1): no CUDA context stays
def _gpu_capability() -> Capability:
    return device_capability(actor_device())
