"""Training the NOTA model's trained parts, as the seed did (SALMONN's recipe), as a plain library (no Ray).

- Examples are (clip, prompt, answer). A batch is `[bos] + prompt before <SpeechHere> + audio tokens +
  prompt after + answer + end symbol`, left-padded like inference, with position ids from the attention
  mask (`nota_model.model.positions`), so padding shifts nothing. Labels are -100 everywhere but on
  the answer tokens and the end symbol: padding, bos, prompt and audio positions carry no loss.
- Only the checkpoint's trained parameters learn (`is_trained_key`: Q-Former, query tokens,
  projection, `ln_speech`/`ln_audio`, LoRA); the encoders and the LLM stay frozen, encoders in eval mode.
- AdamW with SALMONN's parameter groups (no weight decay on biases, norms and 1-d parameters), and a
  per-step schedule: linear warm-up from `warmup_start_lr` to `lr`, then cosine or linear to `min_lr`.
- Data order is a pure function of (seed, epoch): a resumed run sees the same items in the same order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from nota_model.audio import AudioClip
from nota_model.checkpoint import LORA_MARKER, is_trained_key, seed_settings
from nota_model.errors import ConfigError
from nota_model.model import NotaModel, positions

IGNORE_INDEX = -100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(_Strict):
    """AdamW. The seed: lr 1e-4 decaying to 1e-5, weight decay 0.05."""

    kind: Literal["adamw"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_start_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(None, gt=0)  # clip the trained parameters' gradient norm; None: no clipping

    @model_validator(mode="after")
    def _check(self) -> OptimizerConfig:
        if self.min_lr > self.lr:
            raise ValueError("optimizer.min_lr must not exceed optimizer.lr")
        return self


class ScheduleConfig(_Strict):
    """Per optimizer step: linear warm-up over `warmup_steps`, then `decay` to the optimizer's min_lr at the
    last step. The seed: 500 warm-up steps, cosine."""

    warmup_steps: int = Field(500, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass(frozen=True)
class Example:
    """One training example: a clip (or its cached Whisper states), the prompt it is asked (holding
    `<SpeechHere>`) and the answer."""

    clip: AudioClip | None
    prompt: str
    answer: str
    speech_states: torch.Tensor | None = None  # (frames, width): `NotaModel.speech_states` of the clip, cached


@dataclass(frozen=True)
class TrainingBatch:
    """Left-padded LLM inputs and labels. Every row's answer ends at the right edge, so the answer tokens
    are within the last `answer_length` positions."""

    inputs_embeds: torch.Tensor  # (B, L, hidden)
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L): IGNORE_INDEX but on answer tokens and the end symbol
    answer_length: int  # the longest answer, end symbol included

    @property
    def answer_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def answer_token_ids(model: NotaModel, answer: str, max_tokens: int | None = None) -> torch.Tensor:
    """The answer's tokens (no special tokens added) and the end symbol, cut to `max_tokens` in all."""
    ids = model.tokenizer(answer, add_special_tokens=False).input_ids
    if max_tokens is not None:
        ids = ids[: max(max_tokens - 1, 0)]
    return torch.tensor([*ids, model.end_token_id], dtype=torch.long, device=model.device)


def build_batch(
    model: NotaModel,
    audio_tokens: Sequence[torch.Tensor],
    prompts: Sequence[str],
    answers: Sequence[str],
    max_answer_tokens: int | None = None,
) -> TrainingBatch:
    """The LLM inputs of a training batch: the inference prompt (as `NotaModel.prompt_embeddings` builds
    it) followed by the answer and the end symbol; labels only on those."""
    embed = model.llama_model.get_input_embeddings()
    sequences, labels = [], []
    for tokens, prompt, answer in zip(audio_tokens, prompts, answers, strict=True):
        context = model.prompt_sequence(tokens, prompt)
        target = answer_token_ids(model, answer, max_answer_tokens)
        sequences.append(torch.cat([context, embed(target)]))
        labels.append(torch.cat([torch.full((len(context),), IGNORE_INDEX, dtype=torch.long, device=model.device), target]))
    embeds, mask = model.left_pad(sequences)
    longest = embeds.shape[1]
    label_rows = torch.stack([F.pad(row, (longest - len(row), 0), value=IGNORE_INDEX) for row in labels])
    answer_length = max(int((row != IGNORE_INDEX).sum()) for row in labels)
    return TrainingBatch(embeds, mask, positions(mask), label_rows, answer_length)


def batch_for(model: NotaModel, examples: Sequence[Example], max_answer_tokens: int | None = None) -> TrainingBatch:
    """Encode the clips (frozen encoders without a graph) and build the batch."""
    return build_batch(model, example_audio_tokens(model, examples), [e.prompt for e in examples],
                       [e.answer for e in examples], max_answer_tokens)


def example_audio_tokens(model: NotaModel, examples: Sequence[Example]) -> list[torch.Tensor]:
    """The examples' audio tokens, with autograd through the trained parts: from their cached speech states
    when they carry them, else from their clips."""
    if all(example.speech_states is not None for example in examples):
        return model.tokens_from_speech_states([example.speech_states for example in examples])
    return model.encode_audio([example.clip for example in examples])


class CTCHead(torch.nn.Module):
    """A training-only head that asks each audio token to be the LLM input embedding of the answer token spoken
    in its window (CTC over the LLM's vocabulary plus a blank): cosine similarity to the LLM's (frozen) input
    embeddings and to a learned blank vector, times a learned scale. It gives the connector a dense, direct
    signal from the first step, where the answer loss alone leaves it a long plateau before the LLM uses the
    audio. It is not part of the model (nor of its trained weights); the trainer keeps it beside them, so that
    the next stage goes on with it."""

    def __init__(self, hidden_size: int, initial_scale: float = 10.0):
        super().__init__()
        self.blank = torch.nn.Parameter(torch.randn(hidden_size) * 0.02)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(initial_scale)))

    def log_probs(self, tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(T, V + 1) log-probabilities of the V given embeddings' tokens and the blank (last) for (T, hidden)
        audio tokens."""
        directions = F.normalize(torch.cat([embeddings.detach(), self.blank.unsqueeze(0)]).float(), dim=-1)
        return (F.normalize(tokens.float(), dim=-1) @ directions.T * self.log_scale.exp()).log_softmax(-1)


def ctc_loss(model: NotaModel, head: CTCHead, audio_tokens: Sequence[torch.Tensor], answers: Sequence[str],
             negatives: int = 2048) -> torch.Tensor:
    """Mean over the batch of CTC loss per answer token, over a sampled vocabulary: the batch's answer tokens
    and `negatives` other tokens drawn at random (a sampled softmax: the full vocabulary's logits cost far more
    than the connector on a CPU). Answers longer than the audio tokens allow give zero (`zero_infinity`): the answer loss
    still trains them."""
    embeddings = model.llama_model.get_input_embeddings().weight
    targets = [torch.tensor(model.tokenizer(answer, add_special_tokens=False).input_ids, dtype=torch.long) for answer in answers]
    vocabulary = torch.cat(targets).unique()
    if negatives:
        drawn = torch.randint(len(embeddings), (negatives,))
        vocabulary = torch.cat([vocabulary, drawn[~torch.isin(drawn, vocabulary)].unique()])
    position = torch.full((len(embeddings),), -1, dtype=torch.long)
    position[vocabulary] = torch.arange(len(vocabulary))
    lengths = [len(tokens) for tokens in audio_tokens]
    log_probs = head.log_probs(torch.cat(list(audio_tokens)), embeddings[vocabulary.to(embeddings.device)])
    padded = torch.nn.utils.rnn.pad_sequence(list(log_probs.split(lengths)))
    return F.ctc_loss(padded, position[torch.cat(targets)].to(padded.device), torch.tensor(lengths),
                      torch.tensor([len(t) for t in targets]), blank=len(vocabulary), reduction="mean", zero_infinity=True)


def ctc_greedy(model: NotaModel, head: CTCHead, audio_tokens: Sequence[torch.Tensor]) -> list[str]:
    """The CTC head's best path per clip, repeats merged and blanks dropped, decoded: what the connector alone
    hears (a validation figure that does not depend on the LLM)."""
    embeddings = model.llama_model.get_input_embeddings().weight
    texts = []
    for tokens in audio_tokens:
        best = head.log_probs(tokens, embeddings).argmax(-1).tolist()
        ids = [token for position, token in enumerate(best) if token != embeddings.shape[0] and (position == 0 or best[position - 1] != token)]
        texts.append(model.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def answer_loss(model: NotaModel, batch: TrainingBatch, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Cross-entropy of the answer tokens (the end symbol included), mean over them by default. Logits are
    computed only over the last `answer_length + 1` positions: with left padding every answer is there,
    and the full (L, vocabulary) logits would cost far more memory than the model."""
    keep = batch.answer_length + 1
    output = model.llama_model(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = output.logits[:, :-1, :].float()
    targets = batch.labels[:, -batch.answer_length :]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction)


TrainedPart = Literal["connector", "lora"]


def prepare_for_training(model: NotaModel, frozen: Sequence[TrainedPart] = ()) -> list[str]:
    """Freeze everything but the checkpoint's trained parameters, less the `frozen` parts (`connector`: Q-Former,
    query tokens, projection, layer norms; `lora`), keep the learning ones in float32 (the optimizer and the
    gradient scaler work on them; the frozen LLM may stay in half precision), and set train mode. Returns the
    learning parameters' names."""
    trained = []
    for name, parameter in model.named_parameters():
        part = "lora" if LORA_MARKER in name else "connector"
        parameter.requires_grad_(is_trained_key(name) and part not in frozen)
        if parameter.requires_grad:
            trained.append(name)
            if parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
    if not trained:
        raise ConfigError("no parameter learns: the model has no trained parameters (Q-Former, projection, layer "
                          f"norms, LoRA), or all of them are frozen ({', '.join(frozen)})")
    train_mode(model)
    return trained


def train_mode(model: NotaModel) -> None:
    """Train mode (LoRA dropout) for the trained parts and the LLM; the frozen encoders stay in eval mode,
    so that CED's batch-norm statistics never move."""
    model.train()
    model.speech_encoder.eval()
    if model.ced is not None:
        model.ced.eval()


def trainable_parameter_count(model: NotaModel) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(model: torch.nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, in SALMONN's two groups: weight decay on matrices, none
    on 1-d parameters, biases and layer norms."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or "bias" in name or "ln" in name or "LayerNorm" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def learning_rate(step: int, total_steps: int, optimizer: OptimizerConfig, schedule: ScheduleConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`."""
    warmup = schedule.warmup_steps
    if step < warmup:
        return optimizer.warmup_start_lr + (optimizer.lr - optimizer.warmup_start_lr) * step / warmup
    if schedule.decay == "constant":
        return optimizer.lr
    progress = min(1.0, (step - warmup) / max(total_steps - 1 - warmup, 1))
    if schedule.decay == "linear":
        return optimizer.lr - (optimizer.lr - optimizer.min_lr) * progress
    return optimizer.min_lr + (optimizer.lr - optimizer.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, config: OptimizerConfig, schedule: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Step it once per optimizer step. Its state dict (the step) restores with the optimizer's."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, total_steps, config, schedule) / config.lr
    )


# Data order


def sampling_weights(tasks: Sequence[str], task_weights: Mapping[str, float]) -> np.ndarray | None:
    """Per-example sampling weights that give each task `task_weights[task]` of the samples (examples
    uniform within a task); None when no task weights are set (every example once per epoch)."""
    if not task_weights:
        return None
    missing = sorted(set(tasks) - set(task_weights))
    if missing:
        raise ConfigError(f"datasets.task_weights has no weight for task(s) {missing}: give one (0 leaves a task out)")
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task] = counts.get(task, 0) + 1
    weights = np.array([task_weights[task] / counts[task] for task in tasks], dtype=np.float64)
    if weights.sum() <= 0:
        raise ConfigError("datasets.task_weights gives every task weight 0")
    return weights / weights.sum()


def epoch_order(count: int, epoch: int, seed: int, weights: np.ndarray | None = None, size: int | None = None) -> np.ndarray:
    """Example indices of one epoch, a pure function of (seed, epoch): a permutation of all examples, or
    `size` (default `count`) draws with replacement by `weights`."""
    rng = np.random.default_rng([seed, epoch])
    if weights is None and size in (None, count):
        return rng.permutation(count)
    return rng.choice(count, size=size or count, replace=True, p=weights)


def shard_steps(order: np.ndarray, world_size: int, rank: int, batch_size: int, accumulation: int) -> list[list[np.ndarray]]:
    """This rank's micro-batches for each optimizer step of an epoch. The order is wrapped around to fill
    the last step, so every rank runs the same number of micro-batches; optimizer step s consumes
    `order[s*G : (s+1)*G]` with G = world_size * batch_size * accumulation."""
    per_step = world_size * batch_size * accumulation
    steps = max(1, -(-len(order) // per_step))
    wrapped = np.resize(order, steps * per_step)
    micro = world_size * batch_size
    return [
        [wrapped[start + rank * batch_size : start + (rank + 1) * batch_size] for start in range(s * per_step, (s + 1) * per_step, micro)]
        for s in range(steps)
    ]


def steps_per_epoch(examples: int, world_size: int, batch_size: int, accumulation: int) -> int:
    return max(1, -(-examples // (world_size * batch_size * accumulation)))


def choose_prompt(prompts: Sequence[str], seed: int, epoch: int, position: int) -> str:
    """The seed's multi-prompt training: a random one of the task's prompts, here a pure function of
    (seed, epoch, position in the epoch) so that a resumed run asks the same."""
    if len(prompts) == 1:
        return prompts[0]
    return prompts[random.Random(f"{seed}:{epoch}:{position}").randrange(len(prompts))]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimizer step on one rank (dropout): a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


# Checkpoints


def save_seed_checkpoint(model: NotaModel, path: Path, extra: Mapping[str, Any] | None = None) -> None:
    """The seed's `.pth` layout: `{"model": trained parameters, "config": {"model": settings}, ...extra}`
    (e.g. optimizer, epoch), loadable with `torch.load(weights_only=True)` and by `load_model`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in model.trained_state_dict().items()}
    torch.save({"model": state, "config": {"model": seed_settings(model.config)}, **(extra or {})}, path)
