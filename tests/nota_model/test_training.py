"""nota_model.training: the batch builder's labels and positions, the loss, what trains, the optimizer
and its schedule, the data order, the seed's checkpoint layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nota_model.build import load_model
from nota_model.checkpoint import is_trained_key
from nota_model.errors import ConfigError
from nota_model.model import positions
from nota_model.training import (
    IGNORE_INDEX,
    Example,
    OptimizerConfig,
    ScheduleConfig,
    answer_loss,
    answer_token_ids,
    batch_for,
    build_batch,
    choose_prompt,
    epoch_order,
    learning_rate,
    make_optimizer,
    make_scheduler,
    prepare_for_training,
    sampling_weights,
    save_seed_checkpoint,
    shard_steps,
    step_seed,
    steps_per_epoch,
)
from tests.conftest import make_clip

ANSWERS = ["he was not an ill disposed young man", "a dog barks"]


@pytest.fixture(scope="module")
def trainee(tiny_config):
    """A tiny model of its own, prepared for training (the session's `tiny` stays untouched)."""
    model = load_model(tiny_config, device="cpu").model
    prepare_for_training(model)
    return model


@pytest.fixture(scope="module")
def clips():
    return [make_clip(2.0, seed=0), make_clip(1.0, seed=1)]


def _prompts(model):
    custom = "<Speech><SpeechHere></Speech> What animal is this?"
    return [model.config.prompt.task_prompt("asr"), custom]


def test_labels_only_on_the_answer_and_end_symbol(trainee, clips):
    model = trainee
    prompts = _prompts(model)
    with torch.no_grad():
        tokens = model.encode_audio(clips)
        batch = build_batch(model, tokens, prompts, ANSWERS)
    for row, (audio, prompt, answer) in enumerate(zip(tokens, prompts, ANSWERS)):
        before, after = model.prompt_token_ids(prompt)
        target = answer_token_ids(model, answer)
        assert target[-1].item() == model.end_token_id
        assert model.tokenizer.decode(target[:-1]) == answer
        context = len(before) + len(audio) + len(after)
        length = context + len(target)
        padding = batch.labels.shape[1] - length
        labels = batch.labels[row]
        # padding, bos, prompt and audio positions carry no loss; the answer and end symbol do
        assert (labels[: padding + context] == IGNORE_INDEX).all()
        assert labels[padding + context :].tolist() == target.tolist()
        assert batch.attention_mask[row].tolist() == [0] * padding + [1] * length
        assert batch.position_ids[row, padding:].tolist() == list(range(length))
    assert batch.answer_tokens == sum(len(answer_token_ids(model, a)) for a in ANSWERS)
    assert batch.answer_length == max(len(answer_token_ids(model, a)) for a in ANSWERS)


def test_training_input_starts_with_the_inference_prompt(trainee, clips):
    """The answer follows exactly what generation sees: same embeddings, same positions."""
    model = trainee
    prompts = _prompts(model)
    with torch.no_grad():
        tokens = model.encode_audio(clips)
        batch = build_batch(model, tokens, prompts, ANSWERS)
        for row in range(len(clips)):
            embeds, mask = model.prompt_embeddings([tokens[row]], [prompts[row]])
            start = int((batch.attention_mask[row] == 0).sum())
            torch.testing.assert_close(batch.inputs_embeds[row, start : start + embeds.shape[1]], embeds[0])
            assert batch.position_ids[row, start : start + embeds.shape[1]].tolist() == positions(mask)[0].tolist()


def test_answer_loss_is_the_full_logits_loss_and_padding_changes_nothing(trainee, clips):
    model = trainee
    model.eval()
    try:
        prompts = _prompts(model)
        with torch.no_grad():
            tokens = model.encode_audio(clips)
            batch = build_batch(model, tokens, prompts, ANSWERS)
            full = model.llama_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids).logits
            expected = F.cross_entropy(full[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
            torch.testing.assert_close(answer_loss(model, batch), expected, rtol=1e-5, atol=1e-5)
            # left padding shifts nothing: the batch's summed loss is the sum of the items' own
            alone = sum(answer_loss(model, build_batch(model, [t], [p], [a]), reduction="sum")
                        for t, p, a in zip(tokens, prompts, ANSWERS))
            torch.testing.assert_close(answer_loss(model, batch, reduction="sum"), alone, rtol=1e-4, atol=1e-4)
    finally:
        prepare_for_training(model)


def test_only_the_checkpoint_parameters_train_and_all_of_them_get_gradients(trainee, clips):
    model = trainee
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {name for name, _ in model.named_parameters() if is_trained_key(name)}
    assert trained <= set(model.trained_state_dict())
    assert {name.split(".")[0] for name in trained} == {
        "speech_Qformer", "speech_query_tokens", "speech_llama_proj", "ln_speech", "ln_audio", "llama_model"}
    assert all(".lora_" in name for name in trained if name.startswith("llama_model"))
    assert not model.speech_encoder.training and not model.ced.training and model.speech_Qformer.training
    model.zero_grad(set_to_none=True)
    loss = answer_loss(model, batch_for(model, [Example(c, p, a) for c, p, a in zip(clips, _prompts(model), ANSWERS)]))
    loss.backward()
    missing = sorted(name for name, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert not missing  # DDP without find_unused_parameters needs every trained parameter used
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_bfloat16_autocast_on_cpu_keeps_the_loss_and_float32_gradients(trainee, clips):
    """`run.amp: bfloat16` on a CPU (NOTA-small's stage 3): the loss stays near float32's, and the trained values
    get float32 gradients (autocast computes in bfloat16 but leaves the parameters as they are)."""
    model = trainee
    batch = batch_for(model, [Example(c, p, a) for c, p, a in zip(clips, _prompts(model), ANSWERS)])
    with torch.no_grad():
        reference = answer_loss(model, batch).item()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = answer_loss(model, batch)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert loss.item() == pytest.approx(reference, rel=0.05) and loss.item() != reference  # near, yet computed in bfloat16
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    model.zero_grad(set_to_none=True)


def test_a_few_steps_lower_the_loss_of_a_fixed_batch(trainee, clips):
    model = trainee
    examples = [Example(c, p, a) for c, p, a in zip(clips, _prompts(model), ANSWERS)]
    config = OptimizerConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.0)
    optimizer = make_optimizer(model, config)
    losses = []
    for _ in range(6):
        loss = answer_loss(model, batch_for(model, examples))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print("fixed-batch losses:", losses)
    assert losses[-1] < losses[0] - 0.1, losses


def test_optimizer_groups_follow_salmonn(trainee):
    optimizer = make_optimizer(trainee, OptimizerConfig(weight_decay=0.05))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in trainee.named_parameters()}
    assert any(names[id(p)].startswith("ln_speech") for p in no_decay["params"])
    assert all("bias" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in trainee.parameters())


def test_schedule_warms_up_then_decays_to_min_lr():
    optimizer = OptimizerConfig(lr=1e-4, min_lr=1e-5, warmup_start_lr=1e-6)
    cosine = ScheduleConfig(warmup_steps=10, decay="cosine")
    assert learning_rate(0, 100, optimizer, cosine) == pytest.approx(1e-6)
    assert learning_rate(5, 100, optimizer, cosine) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert learning_rate(10, 100, optimizer, cosine) == pytest.approx(1e-4)
    assert learning_rate(99, 100, optimizer, cosine) == pytest.approx(1e-5)
    middle = 10 + (99 - 10) / 2
    assert learning_rate(int(middle), 100, optimizer, cosine) == pytest.approx(
        1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi * int(middle - 10) / 89)))
    linear = ScheduleConfig(warmup_steps=0, decay="linear")
    assert learning_rate(0, 11, optimizer, linear) == pytest.approx(1e-4)
    assert learning_rate(5, 11, optimizer, linear) == pytest.approx(5.5e-5)
    assert learning_rate(10, 11, optimizer, linear) == pytest.approx(1e-5)
    assert learning_rate(50, 11, optimizer, ScheduleConfig(warmup_steps=0, decay="constant")) == pytest.approx(1e-4)
    with pytest.raises(ValueError):
        OptimizerConfig(lr=1e-5, min_lr=1e-4)


def test_scheduler_follows_learning_rate_and_restores_its_step():
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    config, schedule = OptimizerConfig(lr=1e-3, min_lr=1e-4), ScheduleConfig(warmup_steps=3)
    optimizer = torch.optim.AdamW([parameter], lr=config.lr)
    scheduler = make_scheduler(optimizer, 20, config, schedule)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([learning_rate(s, 20, config, schedule) for s in range(8)])
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=config.lr)
    resumed = make_scheduler(other, 20, config, schedule)
    resumed.load_state_dict(scheduler.state_dict())
    other.load_state_dict(optimizer.state_dict())
    assert other.param_groups[0]["lr"] == pytest.approx(learning_rate(8, 20, config, schedule))


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    first = epoch_order(10, epoch=3, seed=7)
    assert sorted(first) == list(range(10))
    np.testing.assert_array_equal(first, epoch_order(10, epoch=3, seed=7))
    assert not np.array_equal(first, epoch_order(10, epoch=4, seed=7))
    assert not np.array_equal(first, epoch_order(10, epoch=3, seed=8))


def test_task_weights_set_each_tasks_share():
    tasks = ["asr"] * 90 + ["aac"] * 10
    weights = sampling_weights(tasks, {"asr": 1.0, "aac": 1.0})
    order = epoch_order(len(tasks), epoch=0, seed=0, weights=weights, size=4000)
    share = np.mean([tasks[i] == "aac" for i in order])
    assert 0.45 < share < 0.55
    assert sampling_weights(tasks, {}) is None
    only_asr = sampling_weights(tasks, {"asr": 1.0, "aac": 0.0})
    assert all(tasks[i] == "asr" for i in epoch_order(100, 0, 0, only_asr, 200))
    with pytest.raises(ConfigError, match="aac"):
        sampling_weights(tasks, {"asr": 1.0})


def test_shards_cover_the_epoch_in_lockstep():
    order = epoch_order(11, epoch=0, seed=1)
    world, batch, accumulation = 2, 2, 2
    plans = [shard_steps(order, world, rank, batch, accumulation) for rank in range(world)]
    steps = steps_per_epoch(11, world, batch, accumulation)
    assert steps == 2 and all(len(plan) == steps for plan in plans)
    assert all(len(micro) == accumulation and all(len(m) == batch for m in micro) for plan in plans for micro in plan)
    seen = [int(i) for step in range(steps) for micro in range(accumulation) for rank in range(world) for i in plans[rank][step][micro]]
    assert set(seen) == set(range(11)) and seen[:11] == order.tolist()  # wrapped around to fill the last step


def test_prompt_choice_and_step_seed_are_reproducible():
    prompts = [f"<SpeechHere> prompt {i}" for i in range(3)]
    chosen = [choose_prompt(prompts, seed=5, epoch=0, position=p) for p in range(60)]
    assert chosen == [choose_prompt(prompts, seed=5, epoch=0, position=p) for p in range(60)]
    assert set(chosen) == set(prompts)
    assert choose_prompt(prompts[:1], 5, 0, 0) == prompts[0]
    assert step_seed(1, 2, 0) == step_seed(1, 2, 0) != step_seed(1, 2, 1)


def test_seed_checkpoint_layout_loads_for_inference(tmp_path, trainee, tiny_config, clips):
    path = tmp_path / "checkpoint.pth"
    save_seed_checkpoint(trainee, path, {"epoch": 3})
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 3 and saved["config"]["model"]["lora_rank"] == tiny_config.lora.r
    assert set(saved["model"]) == set(trainee.trained_state_dict())
    loaded = load_model(tiny_config, checkpoint=str(path), device="cpu")
    trainee.eval()
    try:
        prompts = [tiny_config.prompt.task_prompt("asr")] * 2
        torch.testing.assert_close(loaded.model.next_token_logits(clips, prompts), trainee.next_token_logits(clips, prompts))
    finally:
        prepare_for_training(trainee)
