"""The read plan, made on the driver: the run's input shards still to do (a tar shard, or `items_per_shard`
rows of an item list) and how they are cut into read tasks: a task per tar shard; an item list's pending rows
in tasks of whole blocks (up to about ITEMS_PER_LIST_TASK rows). Before it, `check_task`: the corpus's task
is one the model takes."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.corpus.errors import ManifestError
from jobs.corpus.manifest_schema import Manifest, check_tasks
from jobs.corpus.walk import InputShard, ListSlice, ReadPiece
from nota_model.config import ModelConfig, WhisperASRConfig
from nota_model.whisper_asr import ASR_TASK

# An item-list read task holds up to about this many rows (fewer on a small corpus, for parallelism).
ITEMS_PER_LIST_TASK = 1000
LIST_TASKS_WANTED = 16


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
    when it is an item list (a tar shard's items are known once it is read)."""

    pending: list[InputShard]
    shards: int
    items: int | None
    pending_items: int | None

    @classmethod
    def of(cls, manifest: Manifest, done: set[int]) -> ReadPlan:
        shards = manifest.input_shards()
        pending = [shard for shard in shards if shard.number not in done]
        if manifest.items is None:
            return cls(pending, len(shards), None, None)
        return cls(pending, len(shards), sum(s.rows for s in shards), sum(s.rows for s in pending))

    def describe(self) -> str:
        if self.items is None:
            return f"{len(self.pending)} of {self.shards} tar shards"
        return f"{self.pending_items} of {self.items} items"

    def read_tasks(self, block_rows: int) -> list[list[ReadPiece]]:
        """A task per tar shard; an item list's pending rows cut into tasks of whole blocks (a shard may be
        split between two), so that every block but the last is full."""
        if self.pending_items is None:
            return [[shard] for shard in self.pending]
        blocks_per_task = max(1, min(ITEMS_PER_LIST_TASK // block_rows, self.pending_items // (block_rows * LIST_TASKS_WANTED)))
        task_rows = block_rows * blocks_per_task
        tasks: list[list[ReadPiece]] = [[]]
        room = task_rows
        for shard in self.pending:
            start = 0
            while start < shard.rows:
                if room == 0:
                    tasks.append([])
                    room = task_rows
                stop = min(shard.rows, start + room)
                tasks[-1].append(ListSlice(shard, start, stop))
                room -= stop - start
                start = stop
        return [task for task in tasks if task]
