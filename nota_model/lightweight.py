"""Lighter LLMs for inference, each a model option (`lora.merge`, `llm.quantization`) applied once at load:

- LoRA merged into the base weights (peft's `merge_and_unload`): each adapted layer is one matmul again instead of
  three (base, `lora_A`, `lora_B`) and an add, at every decode step; the outputs differ by float rounding only;
- the LLM's linear layers in int8 (torch's dynamic quantisation: int8 weights, a scale per output channel; the
  activations quantised at each call with one scale for the whole batch, so that an item's scores move slightly
  with its batch-mates; float32 out), on the CPU. torch marks `torch.ao.quantization` deprecated in favour of torchao, which
  the pinned stack does not hold; it still runs in the pinned torch, and on a GPU the pinned stack offers no int8
  kernels (no torchao, no bitsandbytes), so a GPU run with int8 is refused (`check_quantization`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from nota_model.checkpoint import LORA_MARKER
from nota_model.config import LLMConfig
from nota_model.errors import ConfigError
from nota_model.precision import Capability


def merge_lora(llm: nn.Module) -> nn.Module:
    """The base LLM with its LoRA adapters folded into its weights (no adapter modules left)."""
    return llm.merge_and_unload()


def quantize_int8(llm: nn.Module) -> nn.Module:
    """`llm` with every plain linear layer outside the LoRA adapters quantised to int8 weights, a scale per output
    channel (in place). The adapters stay float: peft reads their weights' dtype at each call, and they are a
    sliver of the compute."""
    targets = {name for name, module in llm.named_modules() if type(module) is nn.Linear and LORA_MARKER not in name}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
        import torch.ao.quantization as quantization  # warns on import: imported only when int8 is asked for

        return quantization.quantize_dynamic(llm, dict.fromkeys(targets, quantization.per_channel_dynamic_qconfig),
                                             dtype=torch.qint8, inplace=True)


def check_quantization(config: LLMConfig, capability: Capability) -> None:
    """ConfigError for int8 on a GPU (`capability` not None): the pinned stack has no int8 GPU kernels."""
    if config.quantization == "int8" and capability is not None:
        raise ConfigError("llm.quantization int8 is torch's dynamic quantisation, which runs on the CPU only: the "
                          "pinned stack has no int8 GPU kernels (no torchao, no bitsandbytes). On this GPU drop it "
                          "(--set llm.quantization=none) and use dtype auto (bfloat16 or float16)")
