"""What a person watching `jobs.infer` reads: shards done, items done of the (estimated) total, errors,
items/s and x real time over the last minute, and an ETA; a live bar on a terminal, a structured log
line otherwise (readable in `ray job logs`).

The driver learns a block's staged rows and a shard's commit from the write stage's results
(write.WRITE_RESULT_SCHEMA). A tar shard's item count is unknown until it is read, so the run's total
is estimated from the shards' bytes: items per byte of the committed shards times the bytes of all
the run's shards (an item list's total is known). The ETA is the items left over the rate of the last
ETA_WINDOW_S, counted from the first item (the model's start-up is not in it). `ProgressEstimator` is
pure (time is passed in), so its arithmetic is tested on a simulated clock.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import pyarrow as pa
from tqdm import tqdm

from jobs.pipeline.read import InputShard, TarShard

RATE_WINDOW_S = 60.0  # the items/s and x real time shown
ETA_WINDOW_S = 300.0  # the rate the ETA divides by: long enough to smooth the blocks' arrival
REPORT_EVERY_S = 30.0


@dataclass(frozen=True)
class Progress:
    shards_done: int
    shards: int
    items_done: int
    items_total: int | None  # known (an item list), else estimated from bytes once a shard is committed
    items_total_known: bool
    errors: int
    items_per_s: float | None  # over the last RATE_WINDOW_S
    x_real_time: float | None
    eta_s: float | None

    def line(self) -> str:
        """One line a person reads: `shards 3/8 · items 780/~2080 · errors 2 · 12.5 items/s · 40x real time · ETA 1m44s`."""
        total = "?" if self.items_total is None else f"{'' if self.items_total_known else '~'}{self.items_total}"
        rate, real_time = _figure(self.items_per_s), _figure(self.x_real_time)
        return (f"shards {self.shards_done}/{self.shards} · items {self.items_done}/{total} · errors {self.errors} · "
                f"{rate} items/s · {real_time}x real time · ETA {duration(self.eta_s)}")

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
        # (time, items, audio seconds) after each block: the rates count from the first block's arrival
        self.history: deque[tuple[float, int, float]] = deque()

    def staged(self, now: float, shard: int, rows: int, errors: int, audio_seconds: float) -> None:
        if shard not in self.committed:
            self.started[shard] = self.started.get(shard, 0) + rows
        self.items, self.errors, self.audio_seconds = self.items + rows, self.errors + errors, self.audio_seconds + audio_seconds
        self.history.append((now, self.items, self.audio_seconds))
        while len(self.history) > 2 and self.history[1][0] < now - ETA_WINDOW_S:
            self.history.popleft()

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
        eta = 0.0 if done else None if total is None or not eta_rate else max(total - self.items, 0) / eta_rate
        return Progress(len(self.committed), len(self.sizes), self.items, total, self.known_items is not None,
                        self.errors, rate, real_time, eta)

    def _rates(self, now: float, window: float) -> tuple[float | None, float | None]:
        """Items and audio seconds a second since the last block before `now - window` (or the first);
        unknown until a second block has come."""
        if len(self.history) < 2:
            return None, None
        start = self.history[0]
        for point in self.history:
            if point[0] > now - window:
                break
            start = point
        elapsed = now - start[0]
        if elapsed <= 0:
            return None, None
        return (self.items - start[1]) / elapsed, (self.audio_seconds - start[2]) / elapsed


def shard_sizes(shards: list[InputShard]) -> dict[int, int]:
    """The ProgressEstimator's sizes of a run's shards: a tar shard's bytes, an item list shard's rows."""
    return {shard.number: shard.size if isinstance(shard, TarShard) else shard.rows for shard in shards}


class ProgressReport:
    """The estimator fed from the driver's write results: on a terminal a tqdm bar redrawn at each block
    (so at each commit) and every REPORT_EVERY_S, else a log line every REPORT_EVERY_S (a timer thread,
    so that a slow block does not silence it) and one at the end."""

    def __init__(self, estimator: ProgressEstimator, log: Any, stream: TextIO = sys.stderr, clock=time.monotonic):
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
                self.estimator.staged(now, result["shard"], result["staged_rows"], result["staged_errors"], result["staged_audio_seconds"])
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
