"""The job on a local Ray with fake GPUs, and under faults: a killed actor, a killed driver."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray._private.log import PlainRayHandler
from ray.data._internal.logging import get_log_directory

from jobs import logs
from jobs.corpus.items import ItemListShard
from jobs.corpus.manifest_schema import load_manifest
from jobs.corpus.walk import TarShard
from jobs.infer import parse_args, run
from jobs.inference.dataset import ResourceSizing, build_dataset, decode_block_rows, default_pool_size, resource_sizing
from jobs.inference.plan import ReadPlan
from jobs.inference.predict import Predictor, actor_threads
from jobs.inference.settings import JobSettings
from jobs.inference.write import ShardStaging
from jobs.predictions import OutputStore
from nota_model.config import load_config
from nota_model.errors import ConfigError
from tests.inference.test_infer import TINY_SETTINGS, tone, wav_bytes


JOBS = Path(__file__).resolve().parents[2] / "jobs"


def write_corpus(root: Path, items: int) -> Path:
    lines = []
    for index in range(items):
        (root / f"clip{index}.wav").write_bytes(wav_bytes(tone(1.0 + index % 3, freq=200.0 + 20 * index), 16000))
        lines.append(json.dumps({"id": f"clip{index}", "audio": str(root / f"clip{index}.wav")}))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    (root / "corpus.yaml").write_text("name: faults\ntask: asr\nitems: items.jsonl\nitems_per_shard: 4\n")
    return root / "corpus.yaml"


def job_argv(manifest: Path, output: Path, *extra: str) -> list[str]:
    sets = [arg for setting in TINY_SETTINGS for arg in ("--set", setting)]
    return ["--manifest", str(manifest), "--model", "tiny", "--output", str(output), "--batch-size", "2", *sets, *extra]


def rows_by_id(output: Path) -> dict[str, dict]:
    rows = [row for part in sorted(output.glob("faults/part-*.parquet")) for row in pq.read_table(part).to_pylist()]
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "an item was written twice"
    return {row["id"]: row for row in rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("faults"), 32)


@pytest.fixture(scope="module")
def undisturbed(local_ray, corpus, tmp_path_factory) -> dict[str, dict]:
    output = tmp_path_factory.mktemp("undisturbed")
    run(parse_args(job_argv(corpus, output, "--pool-size", "2", "--cpus-per-actor", "1")))
    return rows_by_id(output)


def test_two_fake_gpus_get_one_actor_each(undisturbed):
    workers = {row["worker"] for row in undisturbed.values()}
    gpus = {worker.split(":gpu=")[1].split(":")[0] for worker in workers}
    assert gpus == {"0", "1"}, workers
    assert all(worker.endswith(":cpu") for worker in workers)  # torch sees no CUDA: the model stays on CPU


def test_a_killed_actor_is_replaced_and_its_batch_redone(local_ray, corpus, undisturbed, tmp_path):
    output = tmp_path / "out"
    killed: list[int] = []

    earlier = set(predictor_pids())  # the undisturbed run's actors may still be exiting

    def kill_one_predictor() -> None:
        # Kill as soon as the first rows are staged: a batch has gone through, most are still to come (a fixed
        # wait could outlast the whole job on an idle machine).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(output.glob("faults/_SUCCESS.json")):
            staged = list(output.glob("faults/_staging/*/rows-*")) + list(output.glob("faults/part-*"))
            for pid in set(predictor_pids()) - earlier if staged else ():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_predictor, daemon=True)
    killer.start()
    run(parse_args(job_argv(corpus, output, "--pool-size", "2")))  # Ray Data wants its driver's main thread
    killer.join(timeout=5)
    assert killed, "the job ended before an actor could be killed"
    rows = rows_by_id(output)
    assert {i: r["text"] for i, r in rows.items()} == {i: r["text"] for i, r in undisturbed.items()}
    assert all(r["error"] is None for r in rows.values())


def test_a_killed_driver_is_resumed_by_rerunning_the_same_command(local_ray, undisturbed, tmp_path):
    # A longer corpus (its first 32 items are the undisturbed run's), so the kill lands mid-run. Both drivers join the
    # session's Ray as a driver joins a cluster (RAY_ADDRESS), which outlives the killed one and starts no Ray for
    # either; their jobs do not have the session's fake GPUs in their environment, so their actors run on the CPU.
    (tmp_path / "corpus").mkdir()
    items = 40  # 10 shards of 4
    corpus = write_corpus(tmp_path / "corpus", items)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.infer", *job_argv(corpus, output, "--pool-size", "1", "--accelerator", "cpu")]
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(output.glob("faults/part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the driver; Ray ends its job's actors and tasks
    first.wait()
    written_before = settled_part_count(output)
    assert 1 <= written_before < items // 4
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = next(json.loads(line) for line in rerun.stdout.splitlines() if line.startswith('{"corpus"'))  # then the metrics table
    pending = items - 4 * written_before - summary["items_kept"]  # 4 items a shard; the rows the killed run staged are kept
    assert f"==== nota-batch job {summary['job_id']}: faults, {pending} of {items} items to run" in rerun.stderr
    assert rerun.stdout.startswith(f"\n==== nota-batch job {summary['job_id']} done: {pending} items in ")
    assert summary["shards_skipped"] == written_before and summary["items"] == items and summary["errors"] == 0
    rows = rows_by_id(output)
    assert sorted(rows) == sorted(f"clip{index}" for index in range(items))
    assert {i: rows[i]["text"] for i in undisturbed} == {i: r["text"] for i, r in undisturbed.items()}


def settled_part_count(output: Path, quiet_s: float = 3.0, timeout: float = 60) -> int:
    """Part files once none has appeared for `quiet_s`: the write tasks a killed driver had started may still
    commit the shards they complete."""
    count, since, deadline = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = len(list(output.glob("faults/part-*.parquet")))
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.2)
    return count


def predictor_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and b"Predictor" in _cmdline(p)]


def _cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:
        return b""


def test_accelerator_cpu_keeps_model_actors_off_the_gpus_and_fills_every_batch_but_the_last(local_ray, tmp_path):
    manifest = write_corpus(tmp_path, 20)
    run(parse_args(job_argv(manifest, tmp_path / "out", "--batch-size", "3", "--accelerator", "cpu", "--no-score")))
    rows = rows_by_id(tmp_path / "out").values()
    assert {row["worker"].split(":gpu=")[1] for row in rows} == {"none:cpu"}
    batches = Counter((row["worker"], row["created_at"]) for row in rows)  # one timestamp a batch
    assert sorted(batches.values(), reverse=True) == [3] * 6 + [2]
    assert all(row["batch_size"] == batches[(row["worker"], row["created_at"])] for row in rows)


def test_decode_blocks_hold_whole_batches():
    assert decode_block_rows(items=1000, batch_size=8, pool=2) == 32  # up to 4 batches a block
    assert decode_block_rows(items=20, batch_size=3, pool=1) == 6  # a small corpus: several blocks per actor
    assert decode_block_rows(items=5, batch_size=8, pool=2) == 8


def test_cpu_actors_take_the_node_but_a_decode_share_and_run_that_many_threads(local_ray):
    # local_ray: one node of 4 CPUs (and 2 fake GPUs)
    assert resource_sizing(on_gpu=False, pool=1, actor_cpus=None, decode_cpus=None) == ResourceSizing(3.75, 0.25)
    assert resource_sizing(on_gpu=False, pool=2, actor_cpus=None, decode_cpus=None) == ResourceSizing(1.875, 0.25)
    assert resource_sizing(on_gpu=True, pool=2, actor_cpus=None, decode_cpus=None) == ResourceSizing(1.0, 1.0, 1.0)
    assert resource_sizing(on_gpu=False, pool=1, actor_cpus=2.0, decode_cpus=1.0) == ResourceSizing(2.0, 1.0)
    threads = ray.remote(num_cpus=1.75)(actor_threads)
    assert ray.get(threads.remote()) == 2


def test_actors_sharing_a_gpu_each_get_their_share_and_the_pool_counts_them():
    assert resource_sizing(on_gpu=True, pool=8, actor_cpus=None, decode_cpus=None, gpus_per_actor=0.25) == ResourceSizing(1.0, 1.0, 0.25)
    assert [default_pool_size(gpus=2, on_gpu=True, actors_per_gpu=k) for k in (1, 2, 4)] == [2, 4, 8]
    assert default_pool_size(gpus=2, on_gpu=False, actors_per_gpu=1) == 2  # --accelerator cpu: one per GPU, as before
    assert default_pool_size(gpus=0, on_gpu=True, actors_per_gpu=4) == 1  # GPU nodes yet to join
    with pytest.raises(ConfigError, match="--gpus-per-actor 0.5 is for GPU runs.*no GPU in the cluster"):
        resource_sizing(on_gpu=False, pool=1, actor_cpus=1.0, decode_cpus=None, gpus_per_actor=0.5)


def test_half_a_gpu_per_actor_starts_two_actors_on_each_fake_gpu(local_ray, tmp_path):
    # local_ray: 4 CPUs and 2 fake GPUs; four actors of half a GPU and half a CPU leave decoding and writing theirs
    manifest = write_corpus(tmp_path, 8)
    run(parse_args(job_argv(manifest, tmp_path / "out", "--gpus-per-actor", "0.5", "--cpus-per-actor", "0.5", "--no-score")))
    rows = rows_by_id(tmp_path / "out")
    assert len(rows) == 8 and all(row["error"] is None for row in rows.values())
    assert {row["worker"].split(":gpu=")[1].split(":")[0] for row in rows.values()} <= {"0", "1"}


def test_building_the_dataset_makes_no_deprecated_call(local_ray, tmp_path):
    manifest = load_manifest(str(write_corpus(tmp_path, 4)))
    args = parse_args(job_argv(tmp_path / "corpus.yaml", tmp_path / "out"))
    settings = JobSettings(manifest.name, "job-warnings", "tiny", "{}")
    staging = ShardStaging(OutputStore(str(tmp_path / "out"), manifest.name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_dataset(ReadPlan.of(manifest, set()), manifest, load_config("tiny"), args, settings, staging)
    # Ray's own DataContext deprecations name Ray's files; a deprecated call of ours names jobs/ (its stacklevel),
    # and none may reach the user: the model stage's remote arguments (max_restarts) are silenced where passed.
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if Path(w.filename).is_relative_to(JOBS)]
    assert ours == []


def test_ray_data_keeps_its_progress_on_the_terminal_and_its_warnings_in_its_log_file(local_ray):
    logs.ray_data_warnings_to_file()
    marker = uuid.uuid4().hex
    logging.getLogger("ray.data.nota_test").warning("warning %s", marker)
    assert f"warning {marker}" in (Path(get_log_directory()) / "ray-data.log").read_text()
    # pytest does not capture what Ray's terminal handler writes here: ask its filters what it lets through
    terminal = [handler for handler in logging.getLogger("ray.data").handlers if isinstance(handler, PlainRayHandler)]
    info, warning = (logging.LogRecord("ray.data.nota_test", level, __file__, 1, marker, None, None)
                     for level in (logging.INFO, logging.WARNING))
    assert terminal and all(handler.filter(info) and not handler.filter(warning) for handler in terminal)


def test_item_list_read_tasks_hold_whole_blocks_and_every_pending_row_once():
    shards = [ItemListShard(number, number * 4, 4 if number < 5 else 3, None) for number in range(6)]  # 23 rows
    plan = ReadPlan(pending=[shard for shard in shards if shard.number != 2], shards=6, items=23, pending_items=19)
    tasks = plan.read_tasks(block_rows=6)
    sizes = [sum(piece.stop - piece.start for piece in task) for task in tasks]
    assert sizes == [6, 6, 6, 1]  # every task but the last a whole number of blocks
    rows = [(piece.shard.number, index) for task in tasks for piece in task for index in range(piece.start, piece.stop)]
    assert rows == [(shard.number, index) for shard in plan.pending for index in range(shard.rows)]
    assert [len(task) for task in ReadPlan(pending=[TarShard(0, "a.tar", 1), TarShard(3, "b.tar", 1)], shards=4,
                                           items=None, pending_items=None).read_tasks(6)] == [1, 1]  # a task per tar shard


def test_item_list_read_tasks_are_many_enough_for_the_actors_to_share_evenly():
    """Ray Data hands a read task's rows to one actor: a small corpus is cut into enough tasks for every actor to
    take several, a large one into tasks of up to about ITEMS_PER_LIST_TASK rows whatever the pool."""
    def task_rows(items: int, block_rows: int, pool: int) -> list[int]:
        shards = [ItemListShard(number, number * 8, 8, None) for number in range(items // 8)]
        plan = ReadPlan(pending=shards, shards=len(shards), items=items, pending_items=items)
        return [sum(piece.stop - piece.start for piece in task) for task in plan.read_tasks(block_rows, pool)]

    assert task_rows(640, 16, pool=1) == [32] * 20  # LIST_TASKS_WANTED at least
    assert task_rows(640, 16, pool=8) == [16] * 40  # a block a task: five for each of eight actors
    assert task_rows(2560, 16, pool=8) == [32] * 80
    assert set(task_rows(100_000, 128, pool=8)[:-1]) == {896}  # the largest whole number of blocks up to 1 000 rows


class DeviceFailingPredictor(Predictor):
    """The model actor with `generate` raising a sticky CUDA error: once (the first call while `marker` does not
    exist, which it then creates), or on every call (`always`)."""

    def __init__(self, config, checkpoint, settings, marker: str, always: bool = False):
        super().__init__(config, checkpoint, settings)
        generate = self.model.generate

        def failing(*args, **kwargs):
            if always or not os.path.exists(marker):
                Path(marker).touch()
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return generate(*args, **kwargs)

        self.model.generate = failing


def test_a_device_failure_restarts_the_actor_and_redoes_its_batch(local_ray, tmp_path):
    manifest, marker = write_corpus(tmp_path, 6), tmp_path / "failed-once"
    summary = run(parse_args(job_argv(manifest, tmp_path / "out", "--pool-size", "1", "--no-score")),
                  predictor=DeviceFailingPredictor, predictor_kwargs={"marker": str(marker)})
    rows = rows_by_id(tmp_path / "out")
    assert marker.exists(), "the injected CUDA error never ran"
    assert sorted(rows) == [f"clip{index}" for index in range(6)] and summary["errors"] == 0
    assert all(row["error"] is None and row["text"] is not None for row in rows.values()), "a device failure is no item's error"


def test_a_device_that_keeps_failing_fails_the_job(local_ray, tmp_path):
    manifest = write_corpus(tmp_path, 2)
    with pytest.raises(Exception, match="(?i)actor|died|restart"):
        run(parse_args(job_argv(manifest, tmp_path / "out", "--pool-size", "1", "--no-score", "--actor-restarts", "1")),
            predictor=DeviceFailingPredictor, predictor_kwargs={"marker": str(tmp_path / "m"), "always": True})
    assert not list((tmp_path / "out").glob("faults/part-*.parquet")), "no shard was written as if its items had failed"
