"""benchmarks.gpu_check in its quick CPU mode, as on the lent GPU machine: Ray and CTranslate2 absent (stub
packages that fail to import), the wheels folder installed when there is one; the model steps run, the Ray
steps are reported absent, and the report holds each step's fields. The check runs as a subprocess here."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check.context import ROOT, Context
from benchmarks.gpu_check.efficiency import UtilisationSampler
from benchmarks.gpu_check.precision import PRECISIONS, QUICK_ITEMS, TOLERANCES
from benchmarks.gpu_check.runner import (
    BUDGET_MARGIN_S, MIN_STEP_S, STEPS, STOP_GRACE_S, TOTAL_BUDGET_S, StepRun, fitted_budgets,
)
from benchmarks.gpu_wheels import install
from nota_model.storage import cache_dir

ABSENT = ("ray", "ctranslate2")  # as on the lent GPU machine
pytestmark = [
    pytest.mark.real_weights,  # the job step runs whisper-tiny.en
    pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU mode; on a GPU run the check itself"),
    pytest.mark.skipif(not (cache_dir() / "samples" / "librivox" / "items.jsonl").exists(),
                       reason="needs the sample corpora (python -m jobs.samples)"),
]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out, stubs = tmp_path_factory.mktemp("gpu_check"), tmp_path_factory.mktemp("absent")
    for module in ABSENT:
        (stubs / module).mkdir()
        (stubs / module / "__init__.py").write_text(f"raise ImportError('{module} is absent (test stub)')\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(stubs), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--allow-cpu", "--quick"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    return done, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_the_model_steps_run_and_the_ray_steps_are_absent(quick):
    done, report, _ = quick
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["mode"] == "cpu-quick" and report["device"] == "cpu" and report["all_ok"] is True and report["concurrent"]
    assert [step["name"] for step in report["steps"]] == [step.name for step in STEPS]
    status = {step["name"]: step["status"] for step in report["steps"]}
    assert status == {"machine": "ok", "correctness": "ok", "efficiency": "ok", "two_workers": "ok", "job": "absent", "training": "absent"}
    for step in report["steps"]:
        if step["status"] == "ok":
            assert step["reason"] is None and 0 < step["seconds"] <= step["budget_s"], step
    reasons = {step["name"]: step["reason"] for step in report["steps"] if step["status"] == "absent"}
    assert reasons == {"job": "skipped: ray, ctranslate2 not installed here", "training": "skipped: ray not installed here"}
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report, "the report is printed last, as one JSON line"
    wheels = report["wheels"]
    assert (wheels["folder"] is None) == (not (ROOT / ".whl").is_dir())
    if wheels["folder"]:
        assert any(name.startswith("pydantic_core-") and "cp311" in name for name in wheels["installed"])


def test_each_step_reports_its_measurements(quick):
    steps = {step["name"]: step["results"] for step in quick[1]["steps"]}
    machine = steps["machine"]
    assert machine["device"] == "cpu" and machine["torch"] and machine["absent"] == list(ABSENT)

    correctness = steps["correctness"]
    assert set(correctness["models"]) == {"tiny"} and "nota-0.5b" in correctness["note"]
    variants = correctness["models"]["tiny"]["variants"]
    assert set(variants) == set(PRECISIONS)
    for name, variant in variants.items():
        assert variant["passed"] is True and all(variant["checks"].values()), (name, variant)
        required = TOLERANCES[name].swap_margin
        assert variant["required_swap_margin"] == required
        assert variant["audio_tokens_swap_margin"] > required and variant["logits_swap_margin"] > required
    assert set(correctness["tolerances"]) == set(PRECISIONS) and correctness["tolerances"]["bfloat16"]["reason"]
    assert variants["float32"]["texts_equal"] == f"{len(QUICK_ITEMS)}/{len(QUICK_ITEMS)}"
    assert variants["float32"]["first_token_logits_rel_error"] == 0
    assert 0 < variants["float16-no-flash"]["first_token_logits_rel_error"] < 0.05

    bench = steps["efficiency"]
    assert [b["batch_size"] for b in bench["batches"]] == [1, 2, 4] and bench["largest_batch"] == 4
    for batch in bench["batches"]:
        assert batch["ttft_s"]["median"] > 0 and batch["tpot_s"]["median"] > 0 and batch["peak_memory_gb"] > 0
        assert batch["items_per_s"]["median"] > 0 and batch["output_tokens_per_s"]["median"] > 0
        assert batch["gpu_memory"] is None  # jobs.metrics.memory's figures on a GPU only
    for emulation in ("v100_emulation", "v100_qwen2_default"):
        assert [b["batch_size"] for b in bench[emulation]] == [1, 2] and bench[emulation][0]["tpot_s"]["median"] > 0
    assert bench["seed_method"]["synchronised"] is False and bench["batch1_comparison"]["tpot_s"]["seed_published"] == 0.038
    assert steps["job"] == {} and steps["training"] == {}

    two = steps["two_workers"]
    assert two["passed"] is True and two["exit_codes"] == [0, 0] and [rank["rank"] for rank in two["ranks"]] == [0, 1]
    for rank in two["ranks"]:
        assert rank["in_sync"] and rank["losses_finite"] and len(rank["losses"]) == 2 and rank["grad_scaler"] is False
    assert two["ranks"][0]["losses"] != two["ranks"][1]["losses"], "each rank trains on its own clips"


def test_markdown_has_the_step_table_and_a_section_per_step_that_ran(quick):
    markdown = quick[2]
    assert "| step | status | seconds | budget s | note |" in markdown
    for step in STEPS:
        ran = step.name not in ("job", "training")
        assert f"| {step.title} | {'ok' if ran else 'absent'} |" in markdown and (f"## {step.title}" in markdown) == ran
    assert "| batch | TTFT s | TPOT s | items/s | output tokens/s | peak memory GB | peak reserved GB | NVML process GB | repeats |" in markdown
    assert "| tiny | float16-no-flash | 0.05 |" in markdown


def test_wheels_that_fit_the_interpreter_are_unpacked_first_on_the_path(tmp_path, monkeypatch):
    for tag, module in (("py3-none-any", "fits"), ("cp27-cp27mu-manylinux1_x86_64", "old")):
        with zipfile.ZipFile(tmp_path / f"{module}-1.0-{tag}.whl", "w") as wheel:
            wheel.writestr(f"{module}.py", "VALUE = 1\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    done = install(tmp_path)
    assert os.environ["PYTHONPATH"] == os.pathsep.join([done["site"], "elsewhere"]) and tmp_path not in Path(done["site"]).parents
    assert done["installed"] == ["fits-1.0-py3-none-any.whl"] and sys.path[0] == done["site"]
    assert (Path(done["site"]) / "fits.py").exists() and not (Path(done["site"]) / "old.py").exists()
    assert install(tmp_path / "none")["folder"] is None


def test_a_step_over_its_budget_is_cut_with_its_partial_results(tmp_path, monkeypatch):
    (tmp_path / "steps").mkdir()
    (tmp_path / "logs").mkdir()
    # A stand-in for the step's process: it saves partial results, then hangs.
    hanging = tmp_path / "hanging-step"
    hanging.write_text(f"#!/bin/sh\necho '{{\"partial\": 1}}' > {tmp_path}/steps/machine.json\nexec sleep 120\n")
    hanging.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(hanging))
    started = time.monotonic()
    entry = StepRun(STEPS[0], Context(tmp_path, "cpu", quick=True), timeout_s=2).finish()
    assert entry["status"] == "cut" and entry["reason"] == "over its budget of 2 s" and entry["results"] == {"partial": 1}
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("image", ["lent", "full"])
def test_the_steps_budgets_fit_the_total_with_a_margin(image):
    steps = [step for step in STEPS if not (image == "lent" and step.needs)]  # the lent image has no Ray
    budgets = fitted_budgets(steps)
    assert set(budgets) == {step.name for step in steps}
    assert sum(budgets.values()) <= TOTAL_BUDGET_S - BUDGET_MARGIN_S and BUDGET_MARGIN_S >= 2 * STOP_GRACE_S
    assert min(budgets.values()) >= MIN_STEP_S


def test_every_precision_has_tolerances_with_their_reason():
    for variant in PRECISIONS:
        tolerance = TOLERANCES[variant]
        assert tolerance.reason and 0 < tolerance.relative_error < 1
        assert tolerance.swap_margin > 1, "a swap inside the batch makes the ratio at most 1"


def test_without_a_gpu_it_says_so_and_exits_non_zero(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "NO GPU" in done.stderr and "--allow-cpu --quick" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_utilisation_counts_only_the_samples_inside_the_model_phase():
    sampler = UtilisationSampler(enabled=False)
    sampler.samples = [(1.0, 90, 2_000_000_000), (2.0, 40, 3_000_000_000), (3.0, 60, 1_000_000_000), (9.0, 100, 5_000_000_000)]
    assert sampler.summary(2.0, 3.0) == {"samples": 2, "mean_pct": 50.0, "max_pct": 60, "max_memory_used_gb": 3.0}
    assert sampler.summary(4.0, 5.0) == {"samples": 0, "reason": "no GPU"}
