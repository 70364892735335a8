"""The predict stage under model failures, errors injected into `generate` (no Ray): a device failure ends the
actor, out of memory splits the batch, an ordinary error is the failing item's row."""

import re
import subprocess
import sys
import weakref

import pytest
import torch

from jobs.inference.devices import (
    DEVICE_FAILURE, DEVICE_FAILURE_EXIT_CODE, MODEL_ERROR, OUT_OF_MEMORY, DeviceFailure, classify_model_error,
)
from jobs.inference.predict import Predictor
from jobs.inference.settings import JobSettings
from nota_model.long_form import piece_features
from tests.conftest import make_clip


def predictor(loaded, batch_size: int) -> Predictor:
    made = Predictor.__new__(Predictor)  # the actor's state without Ray
    made.loaded, made.model, made.worker = loaded, loaded.model, "test"
    made.settings = JobSettings(corpus="c", job_id="j", model_identity=loaded.identity, decoding="d", batch_size=batch_size)
    return made


def rows(model, count: int) -> list[dict]:
    made = []
    for index in range(count):
        clip = make_clip(1.0 + 0.25 * index, seed=index)
        pieces = [(0, len(clip.waveform))]
        made.append({"id": f"item{index}", "error": None, "error_message": None, "prompt": model.prompt_for("asr"),
                     "speech_share": None, "_clip": clip, "_pieces": pieces, "_features": piece_features(clip, pieces, model.config)})
    return made


def failing_generate(model, monkeypatch, fail) -> list[int]:
    """`model.generate` raising `fail(clips)` when it returns an error; returns the batch sizes it was called with."""
    calls, real = [], model.generate

    def generate(clips, prompts, decoding=None, features=None):
        calls.append(len(clips))
        if (err := fail(clips)) is not None:
            raise err
        return real(clips, prompts, decoding, features)

    monkeypatch.setattr(model, "generate", generate)
    return calls


@pytest.mark.parametrize("message", ["CUDA error: an illegal memory access was encountered",
                                     "CUDA error: no kernel image is available for execution on the device",
                                     "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, ...)`",
                                     "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
                                     "CUDA error: device-side assert triggered"])
def test_a_device_failure_fails_the_actor_not_the_items(tiny, monkeypatch, message):
    calls = failing_generate(tiny.model, monkeypatch, lambda clips: RuntimeError(message))
    batch = rows(tiny.model, 3)
    with pytest.raises(DeviceFailure, match=re.escape("RuntimeError: " + message)):
        predictor(tiny, 8)._generate(batch)
    assert calls == [3], "no item-by-item retry on a broken device"
    assert all(row["error"] is None and "text" not in row for row in batch)


def test_out_of_memory_splits_the_batch_in_halves(tiny, monkeypatch):
    oom = lambda clips: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if len(clips) > 2 else None
    calls = failing_generate(tiny.model, monkeypatch, oom)
    batch = rows(tiny.model, 5)
    predictor(tiny, 8)._generate(batch)
    assert calls == [5, 2, 3, 1, 2]  # 5 -> 2 + 3, then 3 -> 1 + 2: halves, not one at a time
    assert all(row["error"] is None and row["text"] is not None for row in batch)


def test_a_single_item_out_of_memory_is_its_row(tiny, monkeypatch):
    failing_generate(tiny.model, monkeypatch, lambda clips: torch.OutOfMemoryError("CUDA out of memory"))
    batch = rows(tiny.model, 2)
    predictor(tiny, 8)._generate(batch)
    assert [row["error"] for row in batch] == ["out_of_memory"] * 2
    assert batch[0]["error_message"] == "OutOfMemoryError: CUDA out of memory"


def test_an_ordinary_model_error_is_the_failing_items_row(tiny, monkeypatch):
    bad = rows(tiny.model, 1)[0]["_clip"].seconds
    failing_generate(tiny.model, monkeypatch, lambda clips: ValueError("bad clip") if any(c.seconds == bad for c in clips) else None)
    batch = rows(tiny.model, 3)
    predictor(tiny, 8)._generate(batch)
    assert [row["error"] for row in batch] == ["model_error", None, None]
    assert batch[0]["error_message"] == "ValueError: bad clip" and batch[1]["text"] is not None


@pytest.mark.parametrize(("error", "meaning"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), OUT_OF_MEMORY),
    (RuntimeError("CUDA error: out of memory"), OUT_OF_MEMORY),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), OUT_OF_MEMORY),
    (RuntimeError("CUDA failed with error out of memory"), OUT_OF_MEMORY),  # CTranslate2
    (RuntimeError("CUDA failed with error unspecified launch failure"), DEVICE_FAILURE),  # CTranslate2
    (RuntimeError("CUDA error: unspecified launch failure"), DEVICE_FAILURE),
    (RuntimeError("cuBLAS failed with status CUBLAS_STATUS_EXECUTION_FAILED"), DEVICE_FAILURE),
    (RuntimeError("shape mismatch"), MODEL_ERROR),
    (ValueError("CUDA error"), MODEL_ERROR),  # only RuntimeErrors come from the device
])
def test_model_errors_are_classified_by_type_and_message(error, meaning):
    assert classify_model_error(error) == meaning


@pytest.mark.parametrize("message", ["CUDA error: out of memory", "CUDA failed with error out of memory",
                                     "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"])
def test_every_out_of_memory_splits_the_batch(tiny, monkeypatch, message):
    calls = failing_generate(tiny.model, monkeypatch, lambda clips: RuntimeError(message) if len(clips) > 1 else None)
    batch = rows(tiny.model, 2)
    predictor(tiny, 8)._generate(batch)
    assert calls == [2, 1, 1] and all(row["text"] is not None for row in batch)


def test_the_failed_batchs_tensors_are_freed_before_its_halves_run(tiny, monkeypatch):
    failed_tensors: list[weakref.ref] = []
    alive_when_halves_ran: list[bool] = []
    real = tiny.model.generate

    def generate(clips, prompts, decoding=None, features=None):
        if len(clips) > 2:
            activations = torch.zeros(1024)  # a tensor of the failing call's frame, as the model's would be
            failed_tensors.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory")
        alive_when_halves_ran.append(any(ref() is not None for ref in failed_tensors))
        return real(clips, prompts, decoding, features)

    monkeypatch.setattr(tiny.model, "generate", generate)
    predictor(tiny, 8)._generate(rows(tiny.model, 4))
    assert len(failed_tensors) == 1 and alive_when_halves_ran == [False, False]


def test_a_device_failure_ends_the_actor_process_for_ray_to_restart():
    code = ("from jobs.inference.devices import DeviceFailure, end_actor\n"
            "try:\n    raise RuntimeError('CUDA error: illegal address')\n"
            "except RuntimeError as err:\n    failure = DeviceFailure(str(err))\n    failure.__cause__ = err\n"
            "end_actor(failure)\nprint('still alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == DEVICE_FAILURE_EXIT_CODE and "still alive" not in done.stdout
    assert "ends on a device failure" in done.stderr and "CUDA error: illegal address" in done.stderr


def overflowing_audio(model, monkeypatch, item: int) -> None:
    """Item `item`'s audio tokens made infinite, as a float16 overflow would make its activations."""
    real = model.audio_tokens

    def audio_tokens(clips, features=None):
        tokens = real(clips, features)
        return [t * float("inf") if index == item else t for index, t in enumerate(tokens)]

    monkeypatch.setattr(model, "audio_tokens", audio_tokens)


@pytest.mark.parametrize("beams", [1, 2])
def test_non_finite_scores_are_marked_per_item(tiny, monkeypatch, beams):
    overflowing_audio(tiny.model, monkeypatch, item=1)
    clips = [make_clip(1.0, seed=0), make_clip(1.5, seed=1), make_clip(2.0, seed=2)]
    decoding = tiny.model.config.decoding.model_copy(update={"num_beams": beams, "max_new_tokens": 3})
    assert tiny.model.generate(clips, [tiny.model.prompt_for("asr")] * 3, decoding).non_finite == (False, True, False)


def test_a_non_finite_item_is_an_error_row_naming_the_precision(tiny, monkeypatch):
    overflowing_audio(tiny.model, monkeypatch, item=0)  # the model batch's first piece: the longest, item1
    batch = rows(tiny.model, 2)
    predictor(tiny, 8)._generate(batch)
    assert [row["error"] for row in batch] == [None, "non_finite_logits"]
    assert "inf or NaN running in float32" in batch[1]["error_message"] and batch[1].get("text") is None
    assert batch[0]["text"] is not None
