"""benchmarks.gpu_check in its quick CPU mode: every step runs and the report holds each step's fields.
The check starts its own local Rays (one per step, in child processes), so it runs as a subprocess here."""

import json
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.gpu_check import STEPS, Context, StepRun, UtilisationSampler
from nota_model.storage import cache_dir

pytestmark = [
    pytest.mark.real_weights,  # the job step runs whisper-tiny.en
    pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU mode; on a GPU run the check itself"),
    pytest.mark.skipif(not (cache_dir() / "samples" / "librivox" / "items.jsonl").exists(),
                       reason="needs the sample corpora (python -m jobs.samples)"),
]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--allow-cpu", "--quick"],
                          capture_output=True, text=True, timeout=600)
    return done, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_step_runs_in_order_and_succeeds(quick):
    done, report, _ = quick
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["mode"] == "cpu-quick" and report["device"] == "cpu" and report["all_ok"] is True and report["concurrent"]
    assert [step["name"] for step in report["steps"]] == [step.name for step in STEPS]
    for step in report["steps"]:
        assert step["status"] == "ok" and step["reason"] is None and 0 < step["seconds"] <= step["budget_s"], step


def test_each_step_reports_its_measurements(quick):
    steps = {step["name"]: step["results"] for step in quick[1]["steps"]}
    machine = steps["machine"]
    assert machine["device"] == "cpu" and machine["torch"] and machine["ctranslate2"] and machine["ctranslate2_cuda_devices"] == 0

    tiny = steps["correctness"]["models"]["tiny"]
    assert set(steps["correctness"]["models"]) == {"tiny"} and "nota-0.5b" in steps["correctness"]["note"]
    assert 0 < tiny["audio_tokens_rel_error"] < 0.05 and 0 < tiny["first_token_logits_rel_error"] < 0.05
    assert tiny["batch_equals_one_at_a_time"] is True and tiny["items_equal"] == "3/3" and tiny["passed"] is True

    bench = steps["efficiency"]
    assert [b["batch_size"] for b in bench["batches"]] == [1, 2, 4] and bench["largest_batch"] == 4
    for batch in bench["batches"]:
        assert batch["ttft_s"]["median"] > 0 and batch["tpot_s"]["median"] > 0 and batch["peak_memory_gb"] > 0
        assert batch["items_per_s"]["median"] > 0 and batch["output_tokens_per_s"]["median"] > 0
    assert bench["seed_method"]["synchronised"] is False and bench["batch1_comparison"]["tpot_s"]["seed_published"] == 0.038

    runs = steps["job"]["runs"]
    assert [(r["corpus"], r["model"], r["engine"]) for r in runs] == [("librivox-sample", "whisper-tiny.en", "ctranslate2")]
    for run in runs:
        assert run["items"] > 0 and run["errors"] == 0 and run["x_real_time"] > 0 and 0 < run["model_phase_s"] <= run["wall_s"]
        assert run["gpu_utilisation"] == {"samples": 0, "reason": "no GPU"}

    training = steps["training"]
    assert training["steps"] == 4 and training["measured_steps"] == 2 and training["samples_per_s"] > 0
    assert training["peak_rss_gib"] > 0 and training["peak_gpu_memory_gib"] is None


def test_markdown_has_the_step_table_and_a_section_per_step(quick):
    markdown = quick[2]
    assert "| step | status | seconds | budget s | note |" in markdown
    for step in STEPS:
        assert f"| {step.title} | ok |" in markdown and f"## {step.title}" in markdown
    assert "| batch | TTFT s | TPOT s | items/s | output tokens/s | peak memory GB | repeats |" in markdown


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
