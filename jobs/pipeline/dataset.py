"""The Ray Data pipeline of a run: decode tasks feeding the model's actor pool, and the resources each gets."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from jobs.manifest import Manifest
from jobs.pipeline.decode import MAX_CLIP_BYTES, decode_audio_batch
from jobs.pipeline.predict import Predictor
from jobs.pipeline.settings import JobSettings
from nota_model.config import ModelConfig

BLOCKS_PER_ACTOR = 4
# A decode block holds up to this many model batches: its clips are sorted by duration, so that each batch
# holds clips of similar length, and every batch cut from it is full.
BATCHES_PER_BLOCK = 4
# On a node without GPUs decoding gets this share of a CPU, the model actors the rest.
CPU_NODE_DECODE_CPUS = 0.25
ACTOR_START_TIMEOUT_S = 900


def build_dataset(pending: pa.Table, manifest: Manifest, config: ModelConfig, args: argparse.Namespace, settings: JobSettings,
                  predictor: type[Predictor] = Predictor, predictor_kwargs: dict[str, Any] | None = None) -> ray.data.Dataset:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and gpus > 0)
    pool = args.pool_size or max(gpus, 1)
    sizing = resource_sizing(on_gpu, pool, args.cpus_per_actor, args.decode_cpus)
    block_rows = decode_block_rows(pending.num_rows, args.batch_size, pool)
    context = ray.data.DataContext.get_current()
    # Start feeding the model once the whole starting pool is up, so that no GPU idles while one actor takes
    # all. Set before the first dataset is made: a dataset keeps a copy of the context it was made in.
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    # A decoded block must stay one block, so that the model's batches cut from it are all full.
    context.target_max_block_size = max(context.target_max_block_size or 0, 2 * block_rows * MAX_CLIP_BYTES)
    blocks = [pending.slice(start, block_rows) for start in range(0, pending.num_rows, block_rows)]
    decoded = ray.data.from_arrow(blocks).map_batches(
        decode_audio_batch,
        batch_size=block_rows,
        batch_format="pyarrow",
        fn_kwargs={"audio": config.audio, "storage_options": manifest.storage_options, "features_for": config},
        num_cpus=sizing.decode_cpus,
    )
    return decoded.map_batches(
        predictor,
        batch_size=args.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={"config": config, "checkpoint": args.checkpoint, "settings": settings, **(predictor_kwargs or {})},
        compute=ray.data.ActorPoolStrategy(min_size=pool, max_size=max(pool, args.max_pool_size or pool)),
        num_gpus=1 if on_gpu else 0,
        num_cpus=sizing.actor_cpus,
    )  # Ray Data restarts a lost actor and retries its batches by default (max_restarts=-1, max_task_retries=-1)


@dataclass(frozen=True)
class ResourceSizing:
    actor_cpus: float
    decode_cpus: float


def resource_sizing(on_gpu: bool, pool: int, actor_cpus: float | None, decode_cpus: float | None) -> ResourceSizing:
    """CPUs for each model actor and each decode task. A GPU actor needs one CPU to feed its GPU and decoding
    takes whole CPUs beside it. Without GPUs the model is the work: decoding gets a small share of a node and
    the actors on it split the rest, so that the model's threads have the cores and decoding never starves it."""
    if on_gpu:
        return ResourceSizing(actor_cpus or 1.0, decode_cpus or 1.0)
    decode_cpus = decode_cpus or CPU_NODE_DECODE_CPUS
    if actor_cpus is None:
        node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
        actors_per_node = -(-pool // max(1, sum(1 for cpus in node_cpus if cpus >= 1)))
        actor_cpus = max(1.0, (max(node_cpus, default=1.0) - decode_cpus) / actors_per_node)
    return ResourceSizing(actor_cpus, decode_cpus)


def decode_block_rows(items: int, batch_size: int, pool: int) -> int:
    """Rows of a decode block: a whole number of model batches, up to BATCHES_PER_BLOCK, and few enough
    that a small corpus still gives several blocks to each starting actor."""
    batches = -(-items // (BLOCKS_PER_ACTOR * pool * batch_size))
    return batch_size * max(1, min(BATCHES_PER_BLOCK, batches))
