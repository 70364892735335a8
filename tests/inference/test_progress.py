"""The progress estimator on a simulated clock (no timing in the assertions), its line, and its report."""

import io
import random

import pyarrow as pa
import pytest

from jobs.corpus.walk import TarShard
from jobs.inference.progress import Progress, ProgressEstimator, ProgressReport, duration, shard_sizes
from jobs.inference.plan import ReadPlan
from jobs.inference.write import WRITE_RESULT_SCHEMA, KeptRows


def simulated_run(seed: int, shards: int = 10, in_flight: int = 3, block: int = 32, spread: float = 0.1) -> tuple[ProgressEstimator, list]:
    """A run of tar shards of 1-3 MB (about one item per 5 kB, +-`spread` between shards), read `in_flight`
    at a time, their blocks answered at about 20 items/s (+-30 % a block) after a 40 s model start, and
    delivered to the driver in lumps of 1 to 8 blocks (a write stage waiting for a CPU): the estimator fed
    as the driver would be, and a snapshot at each delivery with the time left until the last answer."""
    rng = random.Random(seed)
    sizes = {n: rng.randint(1_000_000, 3_000_000) for n in range(shards)}
    items = {n: round(size / 5000 * rng.uniform(1 - spread, 1 + spread)) for n, size in sizes.items()}
    left = dict(items)
    queue, active, now, answered = list(range(shards)), [], 40.0, []
    while queue or active:
        while queue and len(active) < in_flight:
            active.append(queue.pop(0))
        shard = active[rng.randrange(len(active))]
        rows = min(block, left[shard])
        started, now = now, now + rows / 20 * rng.uniform(0.7, 1.3)
        left[shard] -= rows
        answered.append((started + (now - started) / 2, now, shard, rows, items[shard] if left[shard] == 0 else None))
        if left[shard] == 0:
            active.remove(shard)
    estimator, snapshots, end, start = ProgressEstimator(sizes), [], answered[-1][1], 0
    while start < len(answered):
        lump = answered[start:start + rng.randint(1, 8)]
        start += len(lump)
        delivered = lump[-1][1] + 1.0
        for first, last, shard, rows, committed in lump:
            estimator.staged(delivered, shard, rows, errors=rows // 16, audio_seconds=rows * 6.0, answered=(first, last))
            if committed is not None:
                estimator.commit(shard, committed)
        snapshots.append((estimator.snapshot(delivered), end - delivered))
    return estimator, snapshots


@pytest.mark.parametrize("seed", range(10))
def test_the_eta_is_within_a_quarter_of_the_time_left_once_a_quarter_of_the_shards_are_done(seed):
    estimator, snapshots = simulated_run(seed)
    assert sum(estimator.committed.values()) >= 2000 and len(estimator.sizes) >= 8
    # from a quarter of the shards to half of them: later, the time left is short and a few seconds'
    # difference is a large fraction of it
    checked = [(progress, left) for progress, left in snapshots if progress.shards / 4 <= progress.shards_done < progress.shards / 2]
    assert len(checked) >= 3
    for progress, left in checked:
        assert progress.eta_s == pytest.approx(left, rel=0.25)
    assert snapshots[-1][0].eta_s == 0 and snapshots[-1][0].items_done == snapshots[-1][0].items_total


def test_the_total_is_estimated_from_bytes_and_the_rates_from_the_last_minute():
    estimator = ProgressEstimator({0: 1000, 1: 3000})
    assert estimator.snapshot(0.0).items_total is None and estimator.snapshot(0.0).eta_s is None
    estimator.staged(130.0, 0, 10, errors=1, audio_seconds=50.0, answered=(95.0, 99.0))  # delivered late, with the next
    assert estimator.snapshot(130.0).answer_items_per_s is None  # answers spanning 4 s: too short to tell a rate
    estimator.staged(130.0, 0, 10, errors=0, audio_seconds=50.0, answered=(101.0, 110.0))
    estimator.commit(0, 20)  # 20 items in 1000 bytes: 80 items in all
    progress = estimator.snapshot(130.0)
    assert (progress.items_total, progress.items_total_known, progress.errors) == (80, False, 1)
    # 20 items answered from 95 s to 110 s, whenever they reached the driver
    assert progress.answer_items_per_s == pytest.approx(20 / 15) and progress.answer_x_real_time == pytest.approx(100 / 15)
    assert progress.eta_s == pytest.approx(60 / (20 / 15) - 20)  # less the 20 s since the last answer
    estimator.staged(210.0, 1, 30, errors=0, audio_seconds=0.0, answered=(150.0, 200.0))
    assert estimator.snapshot(210.0).answer_items_per_s == pytest.approx(30 / 50)  # the last minute's answers: 140 s to 200 s


def test_an_item_lists_total_is_known():
    estimator = ProgressEstimator(shard_sizes([TarShard(0, "a.tar", 10)]) | {1: 50}, known_items=60)
    estimator.staged(1.0, 1, 5, 0, 5.0)
    assert estimator.snapshot(2.0).items_total == 60 and estimator.snapshot(2.0).items_total_known


def test_the_line_a_person_reads():
    progress = Progress(3, 8, 780, 2080, False, 2, 12.5, 140.2, 104.0)
    assert progress.line() == "shards 3/8 · items 780/~2080 · errors 2 · 12.5 items/s answered (last min) · 140x real time · ETA 1m44s"
    assert Progress(3, 8, 780, 2080, True, 2, 0.4231, 4.0, 3725).line().endswith("items 780/2080 · errors 2 · 0.42 items/s answered (last min) · 4.00x real time · ETA 1h02m")
    assert Progress(0, 8, 0, None, False, 0, None, None, None).line() == (
        "shards 0/8 · items 0/? · errors 0 · – items/s answered (last min) · –x real time · ETA –")
    assert [duration(s) for s in (5, 65, 3725, None)] == ["5s", "1m05s", "1h02m", "–"]


class Log:
    def __init__(self):
        self.lines = []

    def info(self, event, **fields):
        self.lines.append((event, fields))


def test_off_a_terminal_the_report_is_a_structured_log_line():
    log, clock = Log(), iter([10.0, 20.0]).__next__
    report = ProgressReport(ProgressEstimator({0: 100}), log, stream=io.StringIO(), clock=clock)
    results = pa.Table.from_pylist([{"shard": 0, "staged_rows": 4, "staged_errors": 1, "staged_audio_seconds": 8.0,
                                     "committed_rows": 4, "committed_audio_seconds": 8.0}], schema=WRITE_RESULT_SCHEMA)
    report.add(results)
    assert log.lines == []  # a line only every REPORT_EVERY_S and at the end
    report.close()
    ((event, fields),) = log.lines
    assert event == "progress" and fields | {"answer_items_per_s": None, "answer_x_real_time": None} == {
        "shards_done": 1, "shards": 1, "items_done": 4, "items_total": 4, "items_total_known": False, "errors": 1,
        "answer_items_per_s": None, "answer_x_real_time": None, "eta_s": 0.0}


def test_rows_kept_from_an_interrupted_run_are_done_from_the_start_but_in_no_rate():
    plan = ReadPlan(pending=[TarShard(0, "a.tar", 1000), TarShard(1, "b.tar", 1000)], shards=2, items=None, pending_items=None,
                    kept={1: KeptRows(frozenset(range(30)), errors=2, audio_seconds=60.0)})
    estimator = ProgressEstimator.of(plan)
    assert (estimator.snapshot(0.0).items_done, estimator.snapshot(0.0).errors, estimator.snapshot(0.0).answer_items_per_s) == (30, 2, None)
    estimator.staged(20.0, 0, 10, errors=0, audio_seconds=20.0, answered=(0.0, 10.0))
    estimator.commit(0, 10)  # 10 items in 1000 bytes, but shard 1 has staged 30 already
    progress = estimator.snapshot(20.0)
    assert (progress.items_done, progress.items_total) == (40, 40)
    assert progress.answer_items_per_s == pytest.approx(1.0) and progress.answer_x_real_time == pytest.approx(2.0)  # this run's answers only
