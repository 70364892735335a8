"""What a training step minimises: the answer tokens' cross-entropy through the LLM (the seed's loss) and, where
asked, a CTC loss that aligns the audio tokens with the answer's LLM input embeddings (`nota_model.training.CTCHead`).

The CTC term trains the connector from the first step without the LLM (a stage with `answer_weight: 0` runs no
LLM at all, so its steps are cheap); the answer term then teaches the LLM side to read the tokens.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jobs.training.config import ObjectiveSection
from nota_model.checkpoint import read_state_dict, save_state_dict
from nota_model.model import NotaModel
from nota_model.training import CTCHead, Example, answer_loss, build_batch, ctc_loss, example_audio_tokens

CTC_HEAD_FILE = "ctc_head.safetensors"


@dataclass(frozen=True)
class StepLoss:
    total: torch.Tensor  # what is back-propagated: the weighted sum
    answer: float | None  # mean cross-entropy per answer token (None without the answer term)
    answer_tokens: int
    ctc: float | None  # mean CTC loss per answer token (None without the CTC term)


class Objective(torch.nn.Module):
    """What DDP wraps: the model and the CTC head, with a forward that encodes a batch and returns its losses."""

    def __init__(self, model: NotaModel, objective: ObjectiveSection, max_answer_tokens: int, amp_dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.weights = objective
        self.ctc_head = CTCHead(model.llama_model.get_input_embeddings().embedding_dim) if objective.ctc_weight else None
        self.max_answer_tokens = max_answer_tokens
        self.amp_dtype = amp_dtype

    def forward(self, examples: list[Example]) -> StepLoss:
        with autocast(self.model.device, self.amp_dtype):
            tokens = example_audio_tokens(self.model, examples)
            answers = [example.answer for example in examples]
            total, answer, count, ctc = torch.zeros((), device=self.model.device), None, 0, None
            if self.weights.answer_weight:
                batch = build_batch(self.model, tokens, [e.prompt for e in examples], answers, self.max_answer_tokens)
                loss = answer_loss(self.model, batch)
                total, answer, count = total + self.weights.answer_weight * loss, loss.item(), batch.answer_tokens
            if self.ctc_head is not None:
                loss = ctc_loss(self.model, self.ctc_head, tokens, answers)
                total, ctc = total + self.weights.ctc_weight * loss, loss.item()
        return StepLoss(total, answer, count, ctc)


def save_ctc_head(objective: Objective, directory: Path) -> None:
    if objective.ctc_head is not None:
        save_state_dict(objective.ctc_head.state_dict(), directory / CTC_HEAD_FILE)


def load_ctc_head(objective: Objective, directory: Path) -> bool:
    """Restore the CTC head from a checkpoint directory that has one (a resumed run, or the stage before)."""
    path = directory / CTC_HEAD_FILE
    if objective.ctc_head is None or not path.exists():
        return False
    objective.ctc_head.load_state_dict(read_state_dict(path))
    return True


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
