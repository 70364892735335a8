"""Step 5 of the GPU check: the machine (GPU, driver, versions, which modules are absent)."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.gpu_check.context import Context


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
    except ImportError as err:  # the wheels folder brings nvidia-ml-py; without it, say so
        info["driver"], info["nvml"] = None, str(err)
    else:
        try:
            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as err:
            info["driver"], info["nvml"] = None, str(err)
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
