"""The device a model actor runs on: the GPUs Ray assigned it, never what torch happens to see.

Ray 2.60 no longer clears CUDA_VISIBLE_DEVICES for a worker given no GPU, so `torch.cuda.is_available()` is
true in a CPU actor on a GPU node: such an actor would take GPU 0 with nothing reserved for it. And an actor
given a GPU whose torch sees no CUDA must not go on in fp32 on the CPU as if nothing were wrong."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence

import ray
import torch

from nota_model.errors import NotaError
from nota_model.precision import Capability, device_capability

# Tests declare fake Ray GPUs on machines without CUDA (`ray.init(num_gpus=2)`); with this set to 1 in the
# actors' environment, an actor given such a GPU runs on the CPU instead of failing.
FAKE_GPUS_ENV = "NOTA_FAKE_GPUS"


class GPUUnavailableError(RuntimeError):
    """Ray assigned the actor a GPU that torch cannot use."""


class MissingKernelsError(NotaError):
    """This torch was built without kernels for the GPU's compute capability."""


class GPUWaitError(NotaError):
    """No GPU joined the cluster within `--gpu-wait`."""


def actor_device() -> torch.device:
    """The calling Ray actor's device, from the GPUs Ray assigned it: checked to have this torch's kernels,
    and capped to the actor's share of the GPU's memory."""
    device = assigned_device(ray.get_gpu_ids(), fake_gpus=job_has_fake_gpus())
    if device.type == "cuda":
        check_kernels(device)
        cap_memory_share(device, ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0))
    return device


def check_kernels(device: torch.device) -> None:
    """MissingKernelsError, naming the wheel to install, when this torch cannot run on `device`: it must carry
    the GPU's own kernels (sm_XY; those of an older minor of the same major run too) or PTX of an architecture
    at most the GPU's (compute_XY, compiled at load). Checked before the model loads: otherwise the first batch
    fails with "no kernel image", a device failure, and each restart reloads the model for nothing.
    CTranslate2 cannot be asked which architectures its build carries: its "no kernel image" errors are
    device failures (`KNOWN_ERROR_MESSAGES`)."""
    capability = torch.cuda.get_device_capability(device)
    built = torch.cuda.get_arch_list()
    if any(_runs_on(arch, capability) for arch in built):
        return
    sm = f"sm_{capability[0]}{capability[1]}"
    raise MissingKernelsError(
        f"this torch {torch.__version__} has no {sm} kernels (it has {', '.join(built) or 'none'}), so it cannot run "
        f"on this GPU (compute capability {capability[0]}.{capability[1]}): install a torch wheel built for {sm} on "
        f"the GPU nodes, e.g. {torch_wheel_hint(capability)}"
    )


# PyTorch's CUDA builds by the GPUs they carry: CUDA 12.6 wheels carry Maxwell to Hopper (5.0-9.0), the
# only ones with Volta (7.0) and older since 2.11; CUDA 12.8 wheels carry Turing (7.5) to Blackwell (12.0).
LEGACY_GPU_WHEELS, CURRENT_GPU_WHEELS = "cu126", "cu128"


def torch_wheel_hint(capability: tuple[int, int]) -> str:
    """The pip command installing this torch version's CUDA build that carries kernels for `capability`."""
    build = LEGACY_GPU_WHEELS if capability < (7, 5) else CURRENT_GPU_WHEELS
    return f"pip install torch=={torch.__version__.split('+')[0]} --index-url https://download.pytorch.org/whl/{build}"


def _runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether torch's built architecture `arch` (sm_86, sm_90a, compute_90) runs on a GPU of `capability`."""
    kind, _, digits = arch.partition("_")
    digits = digits.rstrip("af")  # sm_90a, sm_100f: architecture-specific variants of the same major
    if not digits.isdigit():
        return False
    built = (int(digits[:-1]), int(digits[-1]))
    if kind == "compute":
        return built <= capability
    return built[0] == capability[0] and built[1] <= capability[1]


def cap_memory_share(device: torch.device, share: float) -> None:
    """Cap torch's allocator in this process to `share` of the GPU's memory (`--gpus-per-actor`): k actors
    sharing a GPU each start a caching allocator, and without a cap one that has cached its peak starves the
    others into out-of-memory splits. An allocation past the cap raises OutOfMemoryError (the batch is split).
    CTranslate2's allocator has no such cap (its CT2_CUDA_CACHING_ALLOCATOR_CONFIG bounds only the cache):
    a shared GPU relies on its models fitting together."""
    if share < 1:
        torch.cuda.set_per_process_memory_fraction(share, device)


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


# What a model error means, by its message: the one table of the messages torch and CTranslate2 are known to
# give, first match wins (so the out-of-memory ones come before the broader CUDA ones). Out of memory is a
# batch too large for the free memory now (a smaller one may fit: the batch is split); a device failure
# leaves the device (its CUDA context) unusable: no later batch on this process can succeed, so it ends the
# actor (Ray restarts it and redoes its batch) instead of becoming error rows. Any other error is the item's.
OUT_OF_MEMORY, DEVICE_FAILURE, MODEL_ERROR = "out_of_memory", "device_failure", "model_error"
KNOWN_ERROR_MESSAGES: tuple[tuple[str, str], ...] = (
    ("out of memory", OUT_OF_MEMORY),  # torch "CUDA out of memory", "CUDA error: out of memory"; CTranslate2's
    ("CUBLAS_STATUS_ALLOC_FAILED", OUT_OF_MEMORY),  # "CUDA failed with error out of memory"
    ("CUDNN_STATUS_ALLOC_FAILED", OUT_OF_MEMORY),
    ("CUDA error", DEVICE_FAILURE),
    ("CUDA failed with error", DEVICE_FAILURE),  # CTranslate2's CUDA errors ("... unspecified launch failure")
    ("CUDA driver error", DEVICE_FAILURE),
    ("CUBLAS_STATUS", DEVICE_FAILURE),
    ("CUDNN_STATUS", DEVICE_FAILURE),
    ("cuDNN error", DEVICE_FAILURE),
    ("device-side assert", DEVICE_FAILURE),
    ("no kernel image", DEVICE_FAILURE),
    ("illegal memory access", DEVICE_FAILURE),
    ("unspecified launch failure", DEVICE_FAILURE),
    ("NCCL error", DEVICE_FAILURE),
)
DEVICE_FAILURE_EXIT_CODE = 75


class DeviceFailure(RuntimeError):
    """The device failed under the model: the actor must end, not write the batch's items as errors."""


def classify_model_error(err: BaseException) -> str:
    """What `err`, raised by a model call, means: OUT_OF_MEMORY, DEVICE_FAILURE or MODEL_ERROR (the items').
    torch's OutOfMemoryError by its type; other errors by `KNOWN_ERROR_MESSAGES`, RuntimeErrors only (both
    engines raise their device errors as RuntimeError; a ValueError naming CUDA is still the item's)."""
    if isinstance(err, torch.OutOfMemoryError):
        return OUT_OF_MEMORY
    if not isinstance(err, RuntimeError):
        return MODEL_ERROR
    message = str(err).lower()
    return next((meaning for marker, meaning in KNOWN_ERROR_MESSAGES if marker.lower() in message), MODEL_ERROR)


def release_memory() -> None:
    """Hand the memory of a batch that ran out of it back before a smaller one runs: collect the reference
    cycles that may still hold its tensors, then return torch's cached blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def run_capability(on_gpu: bool, gpu_wait_s: float) -> Capability:
    """The compute capability the model actors will run on, for the precision `auto` means there (asked of a
    GPU by a Ray task, which waits up to `gpu_wait_s` for a GPU node to join, then GPUWaitError); None for CPU
    actors or fake GPUs. The task runs `actor_device`'s checks, so a torch without the GPU's kernels fails the
    job here, before any model loads. Each actor checks that it runs in this precision (`Predictor`), so that
    no output mixes float16 and bfloat16 rows."""
    if not on_gpu or job_has_fake_gpus():
        return None  # a fake GPU's actor runs on the CPU: no task need start (a new process, for seconds) to say so
    asked = _gpu_capability.remote()
    try:
        return ray.get(asked, timeout=gpu_wait_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(asked, force=True)
        raise GPUWaitError(
            f"no GPU became free for a model actor within --gpu-wait {gpu_wait_s:g} s (the cluster has "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs): start GPU nodes or check the autoscaler's log "
            "(`ray status`), wait longer (--gpu-wait), or run on CPUs (--accelerator cpu)"
        ) from None


def job_has_fake_gpus() -> bool:
    """Whether this job's actors see FAKE_GPUS_ENV: set in the driver's environment, or in the job's runtime
    environment (`ray.init(runtime_env=...)`), which the actors get and the driver does not."""
    if os.environ.get(FAKE_GPUS_ENV) == "1":
        return True
    if not ray.is_initialized():
        return False
    return (ray.get_runtime_context().runtime_env.get("env_vars") or {}).get(FAKE_GPUS_ENV) == "1"


@ray.remote(num_gpus=1, num_cpus=0)  # Ray ends a GPU task's worker after it (max_calls=1): no CUDA context stays
def _gpu_capability() -> Capability:
    return device_capability(actor_device())
