"""The GPU check's runner: the steps in order of value, each in its own process (`python -m benchmarks.gpu_check
--step NAME`) under its own budget, and the report rewritten after each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.gpu_check.context import ROOT, Context
from benchmarks.gpu_check.efficiency import efficiency, job
from benchmarks.gpu_check.machine import absent, machine
from benchmarks.gpu_check.precision import correctness
from benchmarks.gpu_check.report import markdown
from benchmarks.gpu_check.training import training, two_workers

TOTAL_BUDGET_S = 300  # on a GPU: 5 minutes, so that a 15-minute device lease holds a rerun
MIN_STEP_S = 15  # a step is skipped when less than this is left of the total budget
STOP_GRACE_S = 10  # between SIGTERM and SIGKILL of a step's process group
# Kept out of the steps' budgets: what no budget counts (each step's Python start and imports before its
# clock, the report writes) and the STOP_GRACE_S a step cut at its budget may take to stop.
BUDGET_MARGIN_S = 30


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    budget_s: float
    run: Callable[[Context], None]
    needs: tuple[str, ...] = ()  # modules without which the step is skipped ("absent")


# In order of value, with budgets in proportion to their need (`fitted_budgets`). On the lent GPU machine (no
# Ray, no CTranslate2) the first four run.
STEPS = (
    Step("machine", "The machine", 30, machine),
    Step("correctness", "Correctness in float32, bfloat16 and float16 (flash attention off)", 130, correctness),
    Step("efficiency", "Efficiency (jobs.bench)", 90, efficiency),
    Step("two_workers", "Training: two workers on one device (torch.distributed, no Ray)", 40, two_workers),
    Step("job", "The job (jobs.infer on a local Ray)", 120, job, needs=("ray", "ctranslate2")),
    Step("training", "Training (jobs.train)", 50, training, needs=("ray",)),
)
QUICK_STEP_S = 450  # per step in quick mode: generous (a loaded 2-core CI machine), only a stuck step reaches it


def fitted_budgets(steps: tuple[Step, ...] | list[Step]) -> dict[str, float]:
    """Each step's budget, the steps' budgets scaled down in proportion where they add up to more than the
    total less its margin: every step that runs gets its share, none is starved by the ones before it."""
    available = TOTAL_BUDGET_S - BUDGET_MARGIN_S
    scale = min(1.0, available / sum(step.budget_s for step in steps))
    return {step.name: step.budget_s * scale for step in steps}


def run_step(name: str, ctx: Context) -> int:
    """Child process: one step; an exception is recorded beside the results so far."""
    ctx = replace(ctx, step=name)
    step = next(step for step in STEPS if step.name == name)
    try:
        step.run(ctx)
        return 0
    except Exception as err:  # noqa: BLE001 - the parent reports it
        traceback.print_exc()
        path = ctx.result_path()
        partial = json.loads(path.read_text()) if path.exists() else {}
        ctx.save(partial | {"error": f"{type(err).__name__}: {err}"})
        return 1


class StepRun:
    """A step in its own process group; past its budget the group is stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, step: Step, ctx: Context, timeout_s: float):
        self.step, self.timeout_s = step, timeout_s
        self.result_path, self.log_path = replace(ctx, step=step.name).result_path(), ctx.out / "logs" / f"{step.name}.log"
        self.result_path.unlink(missing_ok=True)
        command = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(ctx.out), "--step", step.name, "--device", ctx.device]
        self.started = time.monotonic()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command + (["--quick"] if ctx.quick else []), cwd=ROOT, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, env=step_environment(ctx))

    def finish(self) -> dict[str, Any]:
        """Wait for the step until its budget is spent; its report entry."""
        try:
            returncode = self.process.wait(timeout=max(0.0, self.started + self.timeout_s - time.monotonic()))
            status, reason = ("ok", None) if returncode == 0 else ("failed", f"exit status {returncode}")
        except subprocess.TimeoutExpired:
            stop_group(self.process)
            status, reason = "cut", f"over its budget of {self.timeout_s:.0f} s"
        results = json.loads(self.result_path.read_text()) if self.result_path.exists() else {}
        if status == "failed":
            reason = results.pop("error", None) or log_tail(self.log_path)
        return {"name": self.step.name, "title": self.step.title, "status": status, "reason": reason,
                "seconds": round(time.monotonic() - self.started, 1), "budget_s": round(self.timeout_s), "results": results}


def step_environment(ctx: Context) -> dict[str, str]:
    """The parent's environment (with the wheels `gpu_wheels.install` put first on PYTHONPATH). Quick mode's
    steps run side by side: one torch thread each, so that they do not oversubscribe the CPUs."""
    return os.environ | ({"OMP_NUM_THREADS": "1"} if ctx.quick else {})


def stop_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, lines: int = 5) -> str:
    return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def check(ctx: Context, wheels: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every step in order, each under min(its fitted budget, what is left of the total less its margin), or in
    quick mode all at once; the report rewritten after each."""
    (ctx.out / "steps").mkdir(parents=True, exist_ok=True)
    (ctx.out / "logs").mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"mode": "cpu-quick" if ctx.quick and ctx.device == "cpu" else ("quick" if ctx.quick else "full"),
                              "device": ctx.device, "started_at": datetime.now(UTC).isoformat(), "wheels": wheels, "steps": []}
    steps = []
    for step in STEPS:
        if missing := absent(step.needs):
            record(ctx.out, report, {"name": step.name, "title": step.title, "status": "absent", "seconds": 0, "budget_s": 0,
                                     "results": {}, "reason": f"skipped: {', '.join(missing)} not installed here"})
        else:
            steps.append(step)
    if ctx.quick:  # CI: numbers at quick sizes mean nothing, so the steps run side by side to keep the test short
        report["concurrent"] = True
        runs = [StepRun(step, ctx, QUICK_STEP_S) for step in steps]
        with ThreadPoolExecutor(len(runs)) as pool:  # a thread waits for each, so that each step's time is its own
            for entry in pool.map(StepRun.finish, runs):
                record(ctx.out, report, entry)
    else:
        deadline, budgets = time.monotonic() + TOTAL_BUDGET_S - BUDGET_MARGIN_S, fitted_budgets(steps)
        for step in steps:
            left = deadline - time.monotonic()
            if left < MIN_STEP_S:
                record(ctx.out, report, {"name": step.name, "title": step.title, "status": "skipped", "seconds": 0, "budget_s": 0,
                                         "results": {}, "reason": f"{left:.0f} s left of the total budget"})
            else:
                record(ctx.out, report, StepRun(step, ctx, min(budgets[step.name], left)).finish())
    report["finished_at"] = datetime.now(UTC).isoformat()
    order = [step.name for step in STEPS]
    report["steps"].sort(key=lambda entry: order.index(entry["name"]))
    report["all_ok"] = all(entry["status"] in ("ok", "absent") for entry in report["steps"])
    write_report(ctx.out, report)
    return report


def record(out: Path, report: dict[str, Any], entry: dict[str, Any]) -> None:
    report["steps"].append(entry)
    print(f"gpu_check: {entry['name']}: {entry['status']} in {entry['seconds']} s" + (f" ({entry['reason']})" if entry["reason"] else ""),
          flush=True)
    write_report(out, report)


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))

