"""The read plan, made on the driver: the run's input shards still to do (a tar shard, or `items_per_shard`
rows of an item list), the rows an interrupted run staged for them (kept, not read again), and how the rest is
cut into read tasks: a task per tar shard (which walks the whole shard and skips the kept items); an item
list's rows to read in tasks of whole blocks (up to about ITEMS_PER_LIST_TASK rows). Before it, `check_task`:
the corpus's task is one the model takes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from jobs.corpus.errors import ManifestError
from jobs.corpus.manifest_schema import Manifest, check_tasks
from jobs.corpus.walk import InputShard, ListSlice, ReadPiece, TarShard
from jobs.inference.write import KeptRows
from nota_model.config import ModelConfig, WhisperASRConfig
from nota_model.whisper_asr import ASR_TASK

# An item-list read task holds up to about this many rows; fewer on a smaller corpus, so that it makes at least
# LIST_TASKS_WANTED tasks and LIST_TASKS_PER_ACTOR for each model actor. Ray Data hands all the rows of a read task
# to one actor (it merges a task's blocks up to its target block size), so a task is the unit the actors share:
# with few to each actor, the last ones leave some actors idle while others finish theirs (benchmarks/README.md).
ITEMS_PER_LIST_TASK = 1000
LIST_TASKS_WANTED = 16
LIST_TASKS_PER_ACTOR = 8


def check_task(manifest: Manifest, config: ModelConfig) -> None:
    """Refuse, before any model loads, a corpus whose task the model has no prompt for (`prompt.tasks`; the
    Whisper reference models: `asr`, and no prompt at all): every item of it would end as `invalid_prompt`.
    Items with a task or prompt of their own are the model's to check, item by item."""
    whisper = isinstance(config, WhisperASRConfig)
    where = f"manifest {manifest.name} with model {config.name}: "
    if whisper and manifest.prompt is not None:
        raise ManifestError(f"{where}the Whisper reference model takes no prompt: drop the manifest's `prompt:`")
    if manifest.prompt is None:
        check_tasks([manifest.task], (ASR_TASK,) if whisper else config.prompt.tasks, where=where)


@dataclass(frozen=True)
class ReadPlan:
    """The input shards of a run still to do, and what the driver knows of the corpus: its shards, and its items
    when it is an item list (a tar shard's items are known once it is read); `kept`: the rows an interrupted run
    staged, per pending shard."""

    pending: list[InputShard]
    shards: int
    items: int | None
    pending_items: int | None
    kept: dict[int, KeptRows] = field(default_factory=dict)

    @classmethod
    def of(cls, manifest: Manifest, done: set[int], kept: dict[int, KeptRows] | None = None) -> ReadPlan:
        """The shards not `done`, and their `kept` rows (`write.ShardStaging.kept_rows`)."""
        shards = manifest.input_shards()
        pending = [shard for shard in shards if shard.number not in done]
        if manifest.items is None:
            return cls(pending, len(shards), None, None, _kept_of(pending, kept))
        return cls(pending, len(shards), sum(s.rows for s in shards), sum(s.rows for s in pending), _kept_of(pending, kept))

    @property
    def kept_items(self) -> int:
        return sum(len(rows.indices) for rows in self.kept.values())

    @property
    def items_to_read(self) -> int | None:
        """The items the read tasks decode: the pending items but the kept ones (unknown for tar shards)."""
        return None if self.pending_items is None else self.pending_items - self.kept_items

    @property
    def reads(self) -> bool:
        """Whether any item is left to read (an item list's pending items may all be kept)."""
        return bool(self.pending) and self.items_to_read != 0

    def describe(self) -> str:
        """What the run is to do, for its headline: `40 of 64 items to run, 12 kept from an interrupted run`."""
        work = (f"{len(self.pending)} of {self.shards} tar shards" if self.items is None
                else f"{self.items_to_read} of {self.items} items")
        return f"{work} to run" + (f", {self.kept_items} kept from an interrupted run" if self.kept else "")

    def read_tasks(self, block_rows: int, pool: int = 1) -> list[list[ReadPiece]]:
        """A task per tar shard; an item list's rows to read cut into tasks of whole blocks (a shard may be
        split between two, and is split around its kept rows), so that every model batch but the last is full,
        and into enough tasks for a `pool` of model actors to share evenly."""
        if self.items_to_read is None:
            return [[shard] for shard in self.pending]
        tasks_wanted = max(LIST_TASKS_WANTED, LIST_TASKS_PER_ACTOR * pool)
        blocks_per_task = max(1, min(ITEMS_PER_LIST_TASK // block_rows, self.items_to_read // (block_rows * tasks_wanted)))
        task_rows = block_rows * blocks_per_task
        tasks: list[list[ReadPiece]] = [[]]
        room = task_rows
        for shard in self.pending:
            for start, stop in _runs_to_read(shard.rows, self.kept.get(shard.number)):
                while start < stop:
                    if room == 0:
                        tasks.append([])
                        room = task_rows
                    end = min(stop, start + room)
                    tasks[-1].append(ListSlice(shard, start, end))
                    room -= end - start
                    start = end
        return [task for task in tasks if task]

    def kept_indices(self, pieces: list[ReadPiece]) -> dict[int, frozenset[int]]:
        """The kept indices of a read task's tar shards, which it skips (an item list's kept rows are in no task)."""
        return {piece.number: self.kept[piece.number].indices for piece in pieces
                if isinstance(piece, TarShard) and piece.number in self.kept}


def _kept_of(pending: list[InputShard], kept: dict[int, KeptRows] | None) -> dict[int, KeptRows]:
    return {shard.number: kept[shard.number] for shard in pending if shard.number in (kept or {})}


def _runs_to_read(rows: int, kept: KeptRows | None) -> Iterator[tuple[int, int]]:
    """The runs [start, stop) of a shard's indices that are not kept."""
    if kept is None:
        yield 0, rows
        return
    start = 0
    for index in sorted(kept.indices) + [rows]:
        if index > start:
            yield start, min(index, rows)
        start = max(start, index + 1)
