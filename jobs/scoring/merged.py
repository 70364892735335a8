"""Accumulators that merge: a Ray Data aggregate over them, and dicts of them. Kept apart from modules
that import torch, since Ray workers import the module an aggregate comes from."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from ray.data.aggregate import AggregateFnV2


class Merged(AggregateFnV2):
    """A Ray Data aggregate over accumulators that merge: `start` makes one from a block, `finish` turns
    the merged one into the result, in the task that merged it. Accumulators travel pickled, as Ray
    Data keeps them in Arrow blocks."""

    def __init__(self, start: Callable[[pa.Table], Any], finish: Callable[[Any], Any]):
        self._start, self._finish = start, finish
        super().__init__("merged", zero_factory=bytes, on=None, ignore_nulls=False)

    def aggregate_block(self, block: pa.Table) -> bytes:
        return pickle.dumps(self._start(block))

    def combine(self, current: bytes, new: bytes) -> bytes:
        if not current or not new:
            return current or new
        return pickle.dumps(pickle.loads(current).merge(pickle.loads(new)))

    def finalize(self, accumulator: bytes) -> bytes:
        return pickle.dumps(self._finish(pickle.loads(accumulator)))


def merge_by_key(mine: dict, theirs: dict) -> dict:
    """Two dicts of accumulators, those under the same key merged."""
    return {key: mine[key].merge(theirs[key]) if key in mine and key in theirs else mine.get(key) or theirs[key]
            for key in mine | theirs}
