"""What a person watching `jobs.infer` reads: shards done, items done of the (estimated) total, errors,
items/s and x real time over the last minute, and an ETA; a live bar on a terminal, a structured log
line otherwise (readable in `ray job logs`).

The driver learns a block's staged rows and a shard's commit from the write stage's results
(write.WRITE_RESULT_SCHEMA). A tar shard's item count is unknown until it is read, so the run's total
is estimated from the shards' bytes: items per byte of the committed shards times the bytes of all
the run's shards (an item list's total is known). The rates are measured on the rows' own answer
times (`created_at`), so that a backlog the write stage delivers at once does not look like a burst
of speed; the ETA is the items left over the rate of the last ETA_WINDOW_S of answers (the model's
start-up is not in it), less the time since the latest answer the driver knows of (the model has gone
on meanwhile). The rows' times come from the workers' clocks: a cluster's clocks are assumed in step. The rows an
interrupted run staged are done from the start, and in no rate. `ProgressEstimator` is
pure (time is passed in), so its arithmetic is tested on a simulated clock.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import pyarrow as pa
from tqdm import tqdm

from jobs.corpus.walk import InputShard, TarShard
from jobs.metrics.speed import RATE_LABELS
from jobs.inference.plan import ReadPlan

RATE_WINDOW_S = 60.0  # the items/s and x real time shown
ETA_WINDOW_S = 300.0  # the rate the ETA divides by: long enough to smooth the blocks' arrival
REPORT_EVERY_S = 30.0
MIN_RATE_SPAN_S = 5.0  # answers spanning less than this give no rate (a first block answered at once would read as thousands a second)


@dataclass(frozen=True)
class Progress:
    shards_done: int
    shards: int
    items_done: int
    items_total: int | None  # known (an item list), else estimated from bytes once a shard is committed
    items_total_known: bool
    errors: int
    answer_items_per_s: float | None  # over the last RATE_WINDOW_S
    answer_x_real_time: float | None
    eta_s: float | None

    def line(self) -> str:
        """One line a person reads: `shards 3/8 · items 780/~2080 · errors 2 · 12.5 items/s answered (last min) · 40x
        real time · ETA 1m44s` (the answer rate: jobs.metrics.speed)."""
        total = "?" if self.items_total is None else f"{'' if self.items_total_known else '~'}{self.items_total}"
        rate, real_time = _figure(self.answer_items_per_s), _figure(self.answer_x_real_time)
        return (f"shards {self.shards_done}/{self.shards} · items {self.items_done}/{total} · errors {self.errors} · "
                f"{rate} {RATE_LABELS['answer']} · {real_time}x real time · ETA {duration(self.eta_s)}")

    def fields(self) -> dict[str, Any]:
        """The structured log line's fields."""
        return {name: round(value, 3) if isinstance(value, float) else value for name, value in asdict(self).items()}


def _figure(value: float | None) -> str:
    """`1234`, `12.5`, `0.42`; `–` when unknown."""
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def duration(seconds: float | None) -> str:
    """`1h02m`, `4m05s`, `12s`; `–` when unknown."""
    if seconds is None:
        return "–"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressEstimator:
    """Counts what the write stage reports and estimates the rest. `shard_sizes`: each of the run's shards
    and its bytes (a tar shard) or rows (an item list); `known_items`: the run's items when known."""

    def __init__(self, shard_sizes: dict[int, int], known_items: int | None = None):
        self.sizes, self.known_items = shard_sizes, known_items
        self.committed: dict[int, int] = {}  # shard -> its rows
        self.started: dict[int, int] = {}  # shard not committed yet -> its rows staged so far
        self.items = self.errors = 0
        self.audio_seconds = 0.0
        self.blocks: list[tuple[float, float, int, float]] = []  # (first answer, last answer, rows, audio seconds)

    @classmethod
    def of(cls, plan: ReadPlan) -> ProgressEstimator:
        """The estimator of a run's pending shards, their kept rows done already."""
        estimator = cls(shard_sizes(plan.pending), plan.pending_items)
        for shard, rows in plan.kept.items():
            estimator.add_done(shard, len(rows.indices), rows.errors, rows.audio_seconds)
        return estimator

    def add_done(self, shard: int, rows: int, errors: int, audio_seconds: float) -> None:
        """Rows done (an interrupted run's are kept this way, in no rate: they were not answered in this run's time)."""
        if shard not in self.committed:
            self.started[shard] = self.started.get(shard, 0) + rows
        self.items, self.errors, self.audio_seconds = self.items + rows, self.errors + errors, self.audio_seconds + audio_seconds

    def staged(self, now: float, shard: int, rows: int, errors: int, audio_seconds: float,
               answered: tuple[float, float] | None = None) -> None:
        """A block's rows staged; `answered`: when the model answered its first and last rows (the rows'
        `created_at`, on the clock `now` is on), else they count as answered `now`. The rates are
        measured on the answers' times, not on the blocks' arrival: the write stage may hold a
        backlog (waiting for a CPU) and deliver it at once."""
        self.add_done(shard, rows, errors, audio_seconds)
        first, last = answered or (now, now)
        self.blocks.append((first, last, rows, audio_seconds))
        latest = max(block[1] for block in self.blocks)
        self.blocks = [block for block in self.blocks if block[1] >= latest - ETA_WINDOW_S]

    def commit(self, shard: int, rows: int) -> None:
        self.committed[shard] = rows
        self.started.pop(shard, None)

    def total_items(self) -> int | None:
        """The known total, else the committed shards' items, and for each other shard its bytes times the
        committed shards' items per byte (at least the items it has staged)."""
        if self.known_items is not None:
            return self.known_items
        committed_size = sum(self.sizes.get(shard, 0) for shard in self.committed)
        if not committed_size:
            return None
        per_byte = sum(self.committed.values()) / committed_size
        rest = [max(self.started.get(shard, 0), size * per_byte) for shard, size in self.sizes.items() if shard not in self.committed]
        return round(sum(self.committed.values()) + sum(rest))

    def snapshot(self, now: float) -> Progress:
        total = self.total_items()
        rate, real_time = self._rates(now, RATE_WINDOW_S)
        eta_rate, _ = self._rates(now, ETA_WINDOW_S)
        done = len(self.committed) == len(self.sizes)
        eta = 0.0 if done else None if total is None or not eta_rate else max(
            max(total - self.items, 0) / eta_rate - self._backlog_s(now), 0.0)
        return Progress(len(self.committed), len(self.sizes), self.items, total, self.known_items is not None,
                        self.errors, rate, real_time, eta)

    def _backlog_s(self, now: float) -> float:
        """How long ago the latest answer the driver knows of was given: the model has gone on answering
        since (rows on their way to the driver), which the items left do not know yet."""
        return max(now - max(block[1] for block in self.blocks), 0.0)

    def _rates(self, now: float, window: float) -> tuple[float | None, float | None]:
        """Items and audio seconds a second over the blocks answered in the last `window` (to the latest
        answer), from the first answer among them; unknown until the answers span MIN_RATE_SPAN_S."""
        if not self.blocks:
            return None, None
        latest = max(block[1] for block in self.blocks)
        recent = [block for block in self.blocks if block[1] >= latest - window]
        span = latest - min(block[0] for block in recent)
        if span < MIN_RATE_SPAN_S:
            return None, None
        return sum(block[2] for block in recent) / span, sum(block[3] for block in recent) / span


def shard_sizes(shards: list[InputShard]) -> dict[int, int]:
    """The ProgressEstimator's sizes of a run's shards: a tar shard's bytes, an item list shard's rows."""
    return {shard.number: shard.size if isinstance(shard, TarShard) else shard.rows for shard in shards}


class ProgressReport:
    """The estimator fed from the driver's write results: on a terminal a tqdm bar redrawn at each block
    (so at each commit) and every REPORT_EVERY_S, else a log line every REPORT_EVERY_S (a timer thread,
    so that a slow block does not silence it) and one at the end."""

    def __init__(self, estimator: ProgressEstimator, log: Any, stream: TextIO = sys.stderr, clock=time.time):
        self.estimator, self.log, self.clock = estimator, log, clock
        self.lock = threading.Lock()
        # the terminal's size (a pseudo-terminal without one, as `script` makes: 120 x 24, where tqdm would hide the bar)
        size = shutil.get_terminal_size((120, 24))
        self.bar = (tqdm(total=1, file=stream, bar_format="{bar:24} {desc}", ncols=size.columns, nrows=size.lines)
                    if stream.isatty() else None)
        self.stopped = threading.Event()
        self.timer = threading.Thread(target=self._every, name="nota-progress", daemon=True)
        self.timer.start()

    def add(self, results: pa.Table) -> None:
        """A batch of write results (write.WRITE_RESULT_SCHEMA rows)."""
        with self.lock:
            now = self.clock()
            for result in results.to_pylist():
                answered = (result["first_answered_s"], result["last_answered_s"]) if result["last_answered_s"] else None
                self.estimator.staged(now, result["shard"], result["staged_rows"], result["staged_errors"],
                                      result["staged_audio_seconds"], answered)
                if result["committed_rows"] is not None:
                    self.estimator.commit(result["shard"], result["committed_rows"])
        if self.bar is not None:  # a log line only every REPORT_EVERY_S
            self.show()

    def show(self) -> None:
        with self.lock:
            progress = self.estimator.snapshot(self.clock())
        if self.bar is not None:
            self.bar.total = max(progress.items_total or 0, progress.items_done, 1)
            self.bar.n = progress.items_done
            self.bar.set_description_str(progress.line(), refresh=True)
        else:
            self.log.info("progress", **progress.fields())

    def close(self) -> None:
        self.stopped.set()
        self.timer.join()
        self.show()
        if self.bar is not None:
            self.bar.close()

    def _every(self) -> None:
        while not self.stopped.wait(REPORT_EVERY_S):
            self.show()
