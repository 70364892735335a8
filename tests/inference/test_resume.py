"""Resuming a run: the rows an interrupted run staged are kept and not answered again; Ctrl-C stops `jobs.infer`
with one line saying what the output keeps, exit code 130 and its Ray shut down; a read task's blocks grow from
one model batch."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.corpus.items import ItemListShard
from jobs.corpus.make import build_shards
from jobs.corpus.manifest_schema import load_manifest
from jobs.corpus.walk import TarShard
from jobs.infer import parse_args, run
from jobs.inference.plan import ReadPlan
from jobs.inference.read import ReadContext, read_pieces
from jobs.inference.write import KeptRows, ShardStaging
from jobs.predictions import OUTPUT_SCHEMA, OutputStore
from nota_model.config import load_config
from tests.inference.test_infer import tone, wav_bytes

ROOT = Path(__file__).resolve().parents[2]


def write_corpus(root: Path, items: int, items_per_shard: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(items):
        (root / f"clip{index}.wav").write_bytes(wav_bytes(tone(1.0 + index % 3, freq=200.0 + 20 * index), 16000))
        lines.append(json.dumps({"id": f"clip{index}", "audio": str(root / f"clip{index}.wav")}))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    (root / "corpus.yaml").write_text(f"name: resume\ntask: asr\nitems: items.jsonl\nitems_per_shard: {items_per_shard}\n")
    return root / "corpus.yaml"


def output_rows(folder: Path, pattern: str) -> list[dict]:
    return [row for path in sorted(folder.glob(pattern)) for row in pq.read_table(path).to_pylist()]


def test_ctrl_c_keeps_the_staged_rows_and_a_rerun_answers_only_the_rest(local_ray, tmp_path):
    # One shard of 12 items, one item a model batch, 40 tokens an answer: the rows of the first blocks are
    # staged while most items are still to answer.
    manifest = write_corpus(tmp_path / "corpus", 12, items_per_shard=100)
    output = tmp_path / "out"
    argv = ["--manifest", str(manifest), "--model", "tiny", "--output", str(output), "--batch-size", "1", "--pool-size", "1",
            "--no-score", "--set", "decoding.num_beams=1", "--set", "decoding.max_new_tokens=40",
            "--set", "signals.skip_silence=false"]  # its tones are no speech, which the VAD would keep from the model
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "NOTA_DEBUG")}
    with sigint_handled():
        first = subprocess.Popen([sys.executable, "-m", "jobs.infer", *argv], env=env, cwd=ROOT, start_new_session=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    began = time.monotonic()
    while not list(output.glob("resume/_staging/*/rows-*.parquet")) and first.poll() is None and time.monotonic() < began + 240:
        time.sleep(0.02)
    # What the test saw before its Ctrl-C, for the message of a failure: a staged file, or the job already ended.
    seen = {"seconds": round(time.monotonic() - began, 2), "ended_first": first.poll() is not None,
            "staged_files": [path.name for path in output.glob("resume/_staging/*/rows-*.parquet")]}
    started = descendants(first.pid)  # the local Ray it started (its workers belong to its raylet)
    raylets = [pid for pid in started if process_name(pid) == "raylet"]
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=120)

    staged = {row["id"]: row for row in output_rows(output, "resume/_staging/*/rows-*.parquet")}
    assert first.returncode == 130, f"{seen}\n{stderr[-3000:]}"
    assert stderr.rstrip().splitlines()[-1] == (
        f"infer.py: interrupted: {len(staged)} items kept; run the same command again to resume")
    assert "Traceback" not in stderr and 0 < len(staged) < 12 and not list(output.glob("resume/part-*"))
    assert raylets and all_ended(started)  # the Ray it started was shut down

    summary = run(parse_args(argv))
    rows = output_rows(output, "resume/part-*.parquet")
    assert sorted(row["id"] for row in rows) == sorted(f"clip{index}" for index in range(12))  # one row each
    assert (summary["items_kept"], summary["items_this_run"], summary["items"]) == (len(staged), 12 - len(staged), 12)
    kept = {row["id"]: (row["job_id"], row["created_at"]) for row in rows if row["id"] in staged}
    assert kept == {item: (row["job_id"], row["created_at"]) for item, row in staged.items()}  # the first run's answers
    assert all(row["job_id"] == summary["job_id"] for row in rows if row["id"] not in staged)
    assert not (output / "resume" / "_staging").exists()


@contextmanager
def sigint_handled() -> Iterator[None]:
    """SIGINT handled while a child starts, so that it gets Ctrl-C as a terminal's foreground command does: a
    suite started in the background (`nohup make test &`) ignores SIGINT, and a child inherits an ignored signal
    (Python then installs no KeyboardInterrupt for it), while a handled one is reset to the default at exec."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def process_state(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent, None once it is gone."""
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        return state, int(parent)
    except (OSError, ValueError):
        return None


def process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def descendants(root: int) -> set[int]:
    parents = {pid: state[1] for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
               if (state := process_state(pid))}
    found, grown = {root}, True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found, grown = found | children, bool(children)
    return found - {root}


def all_ended(pids: set[int], timeout: float = 30) -> bool:
    """Whether every process has exited (a zombie left to an init that does not reap has) within `timeout`."""
    deadline = time.monotonic() + timeout
    while any((state := process_state(pid)) and state[0] != "Z" for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_rerun_over_tar_shards_keeps_the_staged_rows_and_reads_the_rest(local_ray, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for index in range(6):
        (audio / f"clip{index}.wav").write_bytes(wav_bytes(tone(0.5 + index / 4), 16000))
    manifest = Path(build_shards(audio, None, "tars", "asr", str(tmp_path / "shards" / "tars"), 3))
    args = parse_args(["--manifest", str(manifest), "--model", "tiny", "--output", str(tmp_path / "out"), "--dry-run"])
    first = run(args)
    store = OutputStore(str(tmp_path / "out"), "tars")
    # shard 1 as a killed run leaves it: not committed, two of its rows staged (one copy redone), a worker's temp file
    part = pq.read_table(store.part_path(1))
    Path(store.part_path(1)).unlink()
    staging = ShardStaging(store)
    staging.stage(1, part.slice(0, 2))
    staging.stage(1, part.slice(1, 1))
    Path(staging.folder(1), "rows-0123-1.parquet.partial-abc").write_bytes(b"half a file")

    again = run(args)

    assert (again["items_kept"], again["items_this_run"], again["items"], again["shards_written"]) == (2, 1, 6, 1)
    rows = pq.read_table(store.part_path(1)).to_pylist()
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert [row["job_id"] for row in rows] == [first["job_id"]] * 2 + [again["job_id"]]
    assert not Path(staging.root).exists()


def staged_table(shard: int, indices: list[int], errors: tuple[int, ...] = ()) -> pa.Table:
    rows = [{name: None for name in OUTPUT_SCHEMA.names} | {"id": f"i{index}", "corpus": "c", "shard": shard, "index": index,
             "audio_seconds": 1.5, "error": "not_audio" if index in errors else None} for index in indices]
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def test_the_kept_rows_are_the_whole_staged_files_of_shards_not_committed(tmp_path):
    store = OutputStore(str(tmp_path), "c")
    staging = ShardStaging(store)
    staging.expect(0, 5)
    staging.stage(0, staged_table(0, [0, 1], errors=(1,)))
    staging.stage(0, staged_table(0, [1, 2], errors=(1,)))  # a redone block, cut differently
    Path(staging.folder(0), "rows-00ff-3.parquet.partial-1a2b").write_bytes(b"PAR1 a worker killed mid-write")
    broken = Path(staging.folder(0), "rows-0abc-2.parquet")
    broken.write_bytes(b"PAR1 not whole")  # a rows file's name but no Parquet file (a crash of the machine)
    staging.stage(1, staged_table(1, [0]))
    store.write_shard(1, staged_table(1, [0, 1]))  # committed meanwhile: its staging is a late copy

    assert staging.kept_rows(done={1}) == {0: KeptRows(frozenset({0, 1, 2}), errors=1, audio_seconds=4.5)}
    assert not broken.exists() and staging.staged_shards() == [0]


def test_the_plan_reads_only_the_rows_not_kept():
    shards = [ItemListShard(number, number * 4, 4, None) for number in range(3)]
    kept = {0: KeptRows(frozenset({1, 2}), 0, 0.0), 2: KeptRows(frozenset(range(4)), 0, 0.0)}
    plan = ReadPlan(pending=shards, shards=3, items=12, pending_items=12, kept=kept)
    tasks = plan.read_tasks(block_rows=2)
    read = [(piece.shard.number, index) for task in tasks for piece in task for index in range(piece.start, piece.stop)]
    assert read == [(0, 0), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]  # shard 2 is all kept: no task reads it
    assert [sum(piece.stop - piece.start for piece in task) for task in tasks] == [2, 2, 2]
    assert plan.items_to_read == 6 and plan.describe() == "6 of 12 items to run, 6 kept from an interrupted run"
    assert not ReadPlan(pending=shards[2:], shards=3, items=12, pending_items=4, kept={2: kept[2]}).reads
    tars = ReadPlan(pending=[TarShard(0, "a.tar", 1), TarShard(1, "b.tar", 1)], shards=2, items=None, pending_items=None,
                    kept={1: KeptRows(frozenset({0}), 0, 0.0)})
    assert [tars.kept_indices(task) for task in tars.read_tasks(4)] == [{}, {1: frozenset({0})}]  # skipped as read


def test_a_read_task_skips_the_kept_items_and_yields_blocks_of_block_rows(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for index in range(12):
        (audio / f"clip{index:02d}.wav").write_bytes(wav_bytes(tone(0.5), 16000))
    manifest = load_manifest(build_shards(audio, None, "blocks", "asr", str(tmp_path / "shards" / "blocks"), 12))
    counts: list[tuple[int, int]] = []
    context = ReadContext(manifest, load_config("tiny"), block_rows=4,
                          record_items=lambda shard, items: counts.append((shard, items)), dry_run=True)
    blocks = list(read_pieces([TarShard(0, manifest.shard_files()[0][0], manifest.shard_files()[0][1])], context,
                              kept={0: frozenset({3, 11})}))
    assert [block.num_rows for block in blocks] == [4, 4, 2]  # the last block holds what is left
    assert sorted(index for block in blocks for index in block["index"].to_pylist()) == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert counts == [(0, 12)]  # the shard's items, the kept ones too
