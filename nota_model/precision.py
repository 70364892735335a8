"""Which float type a model runs in, by the device's compute capability.

torch's `is_bf16_supported()` is true on a V100 (compute capability 7.0), where bfloat16 is emulated and slow,
and CTranslate2 refuses bfloat16 there: native bfloat16 starts at capability 8.0 (A100, H100, L4, ...). So
`auto` is bfloat16 from 8.0 on, float16 below, float32 on the CPU; bfloat16 asked of an older GPU is an error.

Below 8.0 `auto` keeps an LLM of a family trained in bfloat16 (Qwen2) out of float16, where its activations
overflow: the LLM runs in float32 and the encoders in float16 (`llm_dtype`). The other safe choice, float16
with the items that turn non-finite retried in float32, would need a float32 copy of the LLM beside the float16
one (or a cast of the whole LLM per retry), and would make one output's rows come from two precisions, which
the output refuses. A float32 LLM costs about twice the weight bytes per generated token, where decoding is
bound by memory bandwidth, while the encoders, where the compute is, keep float16's tensor cores; the GPU
check's precision step measures both on the GPU it runs on.
"""

from __future__ import annotations

import torch

from nota_model.errors import ConfigError

Capability = tuple[int, int] | None  # a CUDA GPU's compute capability (major, minor); None: the CPU
NATIVE_BFLOAT16 = (8, 0)
# LLM families trained in bfloat16 whose activations are known to overflow float16 (inf/NaN logits).
FLOAT16_OVERFLOWING_LLMS = ("qwen2", "qwen2_moe", "qwen3")


def device_capability(device: torch.device | str) -> Capability:
    """The compute capability of `device`, None for the CPU."""
    device = torch.device(device)
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def native_bfloat16(capability: Capability) -> bool:
    return capability is None or capability >= NATIVE_BFLOAT16


def check_bfloat16(setting: str, capability: Capability) -> None:
    """ConfigError for bfloat16 (`setting` names the option) on a GPU without native bfloat16."""
    if not native_bfloat16(capability):
        raise ConfigError(
            f"{setting} needs a GPU of compute capability {NATIVE_BFLOAT16[0]}.{NATIVE_BFLOAT16[1]} or above for "
            f"bfloat16; this one is {capability[0]}.{capability[1]} (a V100 is 7.0), where bfloat16 is emulated or "
            "refused: use float16 (or auto)"
        )


def resolve_dtype(name: str, capability: Capability) -> torch.dtype:
    """A config's `dtype` on a device: `auto` is bfloat16 on GPUs that have it natively, float16 on older
    ones, float32 on the CPU."""
    if name == "auto":
        if capability is None:
            return torch.float32
        return torch.bfloat16 if native_bfloat16(capability) else torch.float16
    if name == "bfloat16":
        check_bfloat16("dtype bfloat16", capability)
    return getattr(torch, name)


def llm_dtype(name: str, capability: Capability, model_type: str | None) -> torch.dtype:
    """An LLM's dtype: `resolve_dtype`, but `auto` on a GPU without native bfloat16 is float32 for an LLM of a
    family that overflows float16 (`FLOAT16_OVERFLOWING_LLMS`), whose encoders still run in float16."""
    if name == "auto" and not native_bfloat16(capability) and model_type in FLOAT16_OVERFLOWING_LLMS:
        return torch.float32
    return resolve_dtype(name, capability)


def ct2_compute_type(name: str, capability: Capability) -> str:
    """A CTranslate2 `compute_type` on a device: `auto` is int8 on the CPU and float16 on GPUs."""
    if name == "auto":
        return "int8" if capability is None else "float16"
    if "bfloat16" in name and capability is not None:
        check_bfloat16(f"compute_type {name}", capability)
    return name


def training_autocast_dtype(amp: str, capability: Capability) -> torch.dtype | None:
    """Training's `run.amp` on a device: `auto` is the GPU's `resolve_dtype("auto")` and none on the CPU."""
    if amp == "auto":
        return None if capability is None else resolve_dtype("auto", capability)
    if amp == "none":
        return None
    if amp == "float16" and capability is None:
        raise ConfigError("run.amp float16 needs a GPU; on CPU use bfloat16 or none")
    if amp == "bfloat16":
        check_bfloat16("run.amp bfloat16", capability)
    return getattr(torch, amp)


def needs_grad_scaler(autocast_dtype: torch.dtype | None, model_dtype: torch.dtype) -> bool:
    """Gradients through float16 underflow without loss scaling: under float16 autocast, and whenever the
    model (its LLM) itself is float16, whatever the autocast type."""
    return torch.float16 in (autocast_dtype, model_dtype)


def float16_overflow_warning(model_type: str, dtype: torch.dtype) -> str | None:
    """The warning a float16 LLM of a family trained in bfloat16 deserves, if any (`dtype: float16` asked for:
    `auto` keeps it in float32): its activations can overflow float16 (inf/NaN logits, "!!!!" answers;
    `decoding` then marks those items `non_finite_logits`)."""
    if dtype != torch.float16 or model_type not in FLOAT16_OVERFLOWING_LLMS:
        return None
    return (
        f"the {model_type} LLM runs in float16: {model_type} models were trained in bfloat16 and can overflow "
        "float16, giving inf/NaN logits; such items get the error non_finite_logits. Use dtype auto (a float32 LLM "
        "on GPUs without bfloat16) or float32 if they do, or a GPU of compute capability 8.0 or above"
    )
