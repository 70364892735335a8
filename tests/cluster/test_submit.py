"""The cluster path: a Ray head from cluster/local.sh, `ray job submit` of jobs.infer and jobs.score, the head stopped.

The head is a separate Ray (its own ports, temp dir and processes), never the session's in-process `local_ray`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.inference.test_infer import TINY_SETTINGS, tone, wav_bytes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local.sh"
UP_TIMEOUT_S = 150
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(shutil.which("setsid") is None or not Path("/proc").is_dir(), reason="needs Linux (setsid, /proc)")


def run_script(env: dict[str, str], *args: str, timeout: float = JOB_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"cluster/local.sh {' '.join(args)} exited {done.returncode}\n--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-6000:]}")
    return done


def read_state(ray_dir: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (ray_dir / "head.env").read_text().splitlines() if "=" in line)


def head_processes(state: dict[str, str]) -> list[int]:
    """Processes of the head: its `ray start` process group, or any process whose command line names its temp dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pgid = stat.rsplit(")", 1)[1].split()[2]
        if pgid == state["HEAD_PGID"] or f"{state['TEMP_DIR']}/" in cmdline:
            found.append(int(entry.name))
    return found


def job_status(env: dict[str, str], state: dict[str, str], job_id: str) -> str:
    """`ray job status` (through the script), checked against the job API's own word."""
    printed = run_script(env, "status", job_id, timeout=60)
    with urllib.request.urlopen(f"{state['DASHBOARD_URL']}/api/jobs/{job_id}", timeout=30) as response:
        status = json.load(response)["status"]
    if status == "SUCCEEDED":
        assert f"Job '{job_id}' succeeded" in printed.stdout + printed.stderr
    return status


@pytest.fixture
def head_env():
    """Environment for cluster/local.sh with a state dir of our own (short: Ray's socket paths live under it);
    the head is stopped afterwards whatever happened."""
    ray_dir = Path(tempfile.mkdtemp(prefix="nr-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_JOB"))}
    env["NOTA_RAY_DIR"] = str(ray_dir)
    yield env
    if (ray_dir / "head.env").exists():
        run_script(env, "down", timeout=120, check=False)
    shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """Three clips and one missing file; absolute paths, so that the job reads them from its uploaded working dir."""
    root = tmp_path / "corpus"
    root.mkdir()
    lines = []
    for index, seconds in enumerate([1.0, 2.0, 1.5]):
        (root / f"clip{index}.wav").write_bytes(wav_bytes(tone(seconds, freq=250.0 + 100 * index), 16000))
        lines.append({"id": f"clip{index}", "audio": str(root / f"clip{index}.wav"), "reference": "a tone"})
    lines.append({"id": "missing", "audio": str(root / "missing.wav"), "reference": "a tone"})
    (root / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = root / "corpus.yaml"
    manifest.write_text(f"name: submitted\ntask: asr\nitems: {root / 'items.jsonl'}\nitems_per_shard: 2\n")
    return manifest


def test_jobs_submitted_to_a_local_head_write_predictions_and_scores(head_env, small_corpus, tmp_path):
    started = time.monotonic()
    up = run_script(head_env, "up", timeout=UP_TIMEOUT_S)
    state = read_state(Path(head_env["NOTA_RAY_DIR"]))
    assert state["DASHBOARD_URL"].startswith("http://127.0.0.1:") and "Ray head up" in up.stdout
    assert state["DASHBOARD_URL"] != "http://127.0.0.1:8265"  # free ports, never Ray's defaults
    up_s = time.monotonic() - started

    output = tmp_path / "predictions"
    infer_id = f"nota-infer-{uuid.uuid4().hex[:8]}"
    sets = [arg for setting in TINY_SETTINGS for arg in ("--set", setting)]
    submitted = run_script(head_env, "submit", "--submission-id", infer_id, "--",
                           "python", "-m", "jobs.infer", "--manifest", str(small_corpus), "--model", "tiny",
                           "--output", str(output), "--batch-size", "2", *sets)
    assert f"Job '{infer_id}' succeeded" in submitted.stdout + submitted.stderr
    assert job_status(head_env, state, infer_id) == "SUCCEEDED"
    logs = run_script(head_env, "logs", infer_id, timeout=60).stdout
    printed = [json.loads(line) for line in logs.splitlines() if line.startswith("{") and '"items_this_run"' in line]
    summary = printed[-1]  # the driver's last line of JSON: the run's summary
    assert summary["items"] == 4 and summary["errors"] == 1 and summary["shards_written"] == 2
    rows = [row for part in sorted(output.glob("submitted/part-*.parquet")) for row in pq.read_table(part).to_pylist()]
    assert sorted(row["id"] for row in rows) == ["clip0", "clip1", "clip2", "missing"]  # one row per item
    assert {row["id"]: row["error"] for row in rows}["missing"] == "missing_audio"
    assert summary["job_id"] == infer_id  # rows carry the submission id
    assert all(row["job_id"] == infer_id and row["model"] == "tiny+no-checkpoint+float32" for row in rows)
    metrics = json.loads((output / "submitted/_scores/metrics.json").read_text())
    assert [(group["task"], group["items"], group["errors"]) for group in metrics["groups"]] == [("asr", 4, 1)]

    # What was uploaded: this repo as .gitignore leaves it (no .venv, .git, out): the code and the weights that ship
    # with it (NOTA-small's, 12.3 MB, which a cluster's actors load from there), nothing else large.
    packages = list(Path(state["TEMP_DIR"]).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*/"))
    assert packages and all((package / "jobs" / "infer.py").is_file() for package in packages)
    for package in packages:
        assert not any((package / name).exists() for name in (".venv", ".git", "out"))
        shipped = sum(f.stat().st_size for f in (package / "nota_model" / "weights").glob("*.safetensors"))
        assert sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) - shipped < 5_000_000

    scores = tmp_path / "scores"
    score_id = f"nota-score-{uuid.uuid4().hex[:8]}"
    submitted = run_script(head_env, "submit", "--submission-id", score_id, "--",
                           "python", "-m", "jobs.score", "--predictions", str(output), "--output", str(scores))
    assert f"Job '{score_id}' succeeded" in submitted.stdout + submitted.stderr  # `status` is checked once, above
    assert {"metrics.json", "metrics.parquet", "report.md"} <= {path.name for path in scores.iterdir()}
    scored = json.loads((scores / "metrics.json").read_text())["groups"]
    assert [(group["corpus"], group["items"], group["errors"]) for group in scored] == [("submitted", 4, 1)]
    assert scored[0]["quality"]["wer"] > 0
    jobs_s = time.monotonic() - started - up_s

    assert head_processes(state), "the head's processes should be running before `down`"
    stopping = time.monotonic()
    down = run_script(head_env, "down", timeout=120)
    down_s = time.monotonic() - stopping
    assert "no process of it is left" in down.stdout
    assert head_processes(state) == []
    assert not (Path(head_env["NOTA_RAY_DIR"]) / "head.env").exists()
    print(f"head up {up_s:.1f} s, both jobs {jobs_s:.1f} s, down {down_s:.1f} s, total {time.monotonic() - started:.1f} s",
          down.stderr.strip())
