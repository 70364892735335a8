"""The Ray Data pipeline of a run: read tasks (read and decode) feeding the model's actor pool (or the dry run's
rows), then the write stage; the resources each gets; and the end-of-run finish of shards left incomplete."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.annotations import RayDeprecationWarning

from jobs.corpus.items import WorkItemChecks
from jobs.corpus.manifest_schema import Manifest
from jobs.corpus.walk import InputShard, walk, whole
from jobs.inference.devices import uses_gpus
from jobs.inference.decode import MAX_CLIP_BYTES
from jobs.inference.options import CPU_NODE_DECODE_CPUS, RunOptions
from jobs.inference.plan import ReadPlan
from jobs.inference.predict import Predictor, dry_run_rows
from jobs.inference.read import CorpusDatasource, ReadContext
from jobs.inference.settings import JobSettings
from jobs.inference.write import Commit, ShardStaging, finish_shard, write_rows
from nota_model.config import ModelConfig
from nota_model.errors import ConfigError

BLOCKS_PER_ACTOR = 4
# A decode block holds up to this many model batches: its clips are sorted by duration, so that each batch
# holds clips of similar length, and every batch cut from it is full.
BATCHES_PER_BLOCK = 4
ACTOR_START_TIMEOUT_S = 900


def build_dataset(plan: ReadPlan, manifest: Manifest, config: ModelConfig, options: RunOptions, settings: JobSettings,
                  staging: ShardStaging, predictor: type[Predictor] = Predictor,
                  predictor_kwargs: dict[str, Any] | None = None) -> ray.data.Dataset:
    """Rows of the write stage's results (`write.WRITE_RESULT_SCHEMA`): a few per block, no item data."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = uses_gpus(options.accelerator)
    pool = options.pool_size or default_pool_size(gpus, on_gpu, options.actors_per_gpu)
    # A dry run has no model: reading and decoding are the work, a CPU each.
    sizing = (ResourceSizing(0.0, options.decode_cpus or 1.0) if options.dry_run
              else resource_sizing(on_gpu, pool, options.cpus_per_actor, options.decode_cpus, options.gpus_per_actor))
    block_rows = decode_block_rows(plan.items_to_read, options.batch_size, pool)
    context = ray.data.DataContext.get_current()
    # Start feeding the model once the whole starting pool is up, so that no GPU idles while one actor takes
    # all. Set before the first dataset is made: a dataset keeps a copy of the context it was made in.
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    # A decoded block must stay one block, so that the model's batches cut from it are all full.
    context.target_max_block_size = max(context.target_max_block_size or 0, 2 * block_rows * MAX_CLIP_BYTES)
    source = CorpusDatasource(plan, ReadContext(manifest, config, block_rows, staging.expect,
                                                dry_run=options.dry_run), pool)
    # As many output blocks as read tasks: Ray Data would otherwise split each task's blocks to reach its
    # minimum parallelism (200), and the model's batches cut from the pieces would not be full.
    decoded = ray.data.read_datasource(source, num_cpus=sizing.decode_cpus, override_num_blocks=len(source.tasks))
    if options.dry_run:
        rows = decoded.map_batches(dry_run_rows, batch_size=None, batch_format="pyarrow", fn_kwargs={"settings": settings},
                                   num_cpus=sizing.decode_cpus)
    else:
        with _restarts_through_remote_args():
            rows = decoded.map_batches(
                predictor,
                batch_size=options.batch_size,
                batch_format="pyarrow",
                fn_constructor_kwargs={"config": config, "checkpoint": options.checkpoint, "settings": settings,
                                       **(predictor_kwargs or {})},
                compute=ray.data.ActorPoolStrategy(min_size=pool, max_size=max(pool, options.max_pool_size or pool)),
                num_gpus=sizing.actor_gpus,
                num_cpus=sizing.actor_cpus,
                # A lost actor (its node gone, or ended by a device failure: devices.end_actor) is restarted and its
                # batches retried; an actor that keeps failing fails the job instead of looping on a broken GPU.
                max_restarts=options.actor_restarts,
                max_task_retries=-1,
            )
    # The write stage stages each block of rows as the model returns it (a decode block's, or a few small ones'
    # the pool took together to fill a batch): never held back to gather more, so that progress moves and an
    # interruption loses only the blocks in flight; a block's rows are staged in one file, so a big shard's files
    # are few. Shards are committed as the stream goes.
    return rows.map_batches(write_rows, batch_size=None, batch_format="pyarrow",
                            fn_kwargs={"staging": staging}, num_cpus=sizing.decode_cpus)


@contextmanager
def _restarts_through_remote_args() -> Iterator[None]:
    """Ray 2.60 (pinned) deprecates passing Ray remote arguments to `map_batches` for 2.64, but names no other way
    to give the model actors `max_restarts` and `max_task_retries`, on which a lost node or a failed device
    relies. Its warning is silenced here, for this call alone, rather than shown to every user as if ours to fix;
    the pin's next bump must find the new way (tests/cluster/test_infer_cluster.py checks no other call warns)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning)
        yield


def finish_shards(plan: ReadPlan, manifest: Manifest, staging: ShardStaging, settings: JobSettings) -> dict[int, Commit]:
    """Shards with staging left after the run, each finished by a Ray task (`write.finish_shard`): the commits
    of those that were incomplete."""
    pending = {shard.number: shard for shard in plan.pending}
    shards = [number for number in staging.staged_shards() if number in pending]
    finished = ray.get([_finish_shard.remote(pending[number], manifest, staging, settings) for number in shards])
    return {shard: commit for shard, commit in zip(shards, finished) if commit is not None}


@ray.remote(num_cpus=0.25)
def _finish_shard(shard: InputShard, manifest: Manifest, staging: ShardStaging, settings: JobSettings) -> Commit | None:
    items = (item for item, _ in walk(whole(shard), manifest, WorkItemChecks(manifest), with_audio=False))
    return finish_shard(staging, shard.number, items, settings)


@dataclass(frozen=True)
class ResourceSizing:
    actor_cpus: float
    decode_cpus: float
    actor_gpus: float = 0.0


def default_pool_size(gpus: int, on_gpu: bool, actors_per_gpu: int) -> int:
    """Model actors to start with when --pool-size is not given: `actors_per_gpu` (1 / --gpus-per-actor) for
    each GPU up when the job starts on a GPU run, else one per GPU; at least one."""
    return max(1, gpus * (actors_per_gpu if on_gpu else 1))


def resource_sizing(on_gpu: bool, pool: int, actor_cpus: float | None, decode_cpus: float | None,
                    gpus_per_actor: float = 1.0) -> ResourceSizing:
    """CPUs (and GPUs) for each model actor and each decode task. A GPU actor gets its share of a GPU and
    needs one CPU to feed it, and decoding takes whole CPUs beside it. Without GPUs the model is the work:
    decoding gets a small share of a node and the actors on it split the rest, so that the model's threads have
    the cores and decoding never starves it."""
    if on_gpu:
        return ResourceSizing(actor_cpus or 1.0, decode_cpus or 1.0, gpus_per_actor)
    if gpus_per_actor != 1:
        raise ConfigError(f"--gpus-per-actor {gpus_per_actor} is for GPU runs, but this run's model actors run on "
                          "CPUs (--accelerator auto and no GPU in the cluster when the job started): use "
                          "--accelerator gpu on a cluster whose GPU nodes join later, or drop --gpus-per-actor")
    decode_cpus = decode_cpus or CPU_NODE_DECODE_CPUS
    if actor_cpus is None:
        node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
        actors_per_node = -(-pool // max(1, sum(1 for cpus in node_cpus if cpus >= 1)))
        actor_cpus = max(1.0, (max(node_cpus, default=1.0) - decode_cpus) / actors_per_node)
    return ResourceSizing(actor_cpus, decode_cpus)


def decode_block_rows(items: int | None, batch_size: int, pool: int) -> int:
    """Rows of a decode block: a whole number of model batches, up to BATCHES_PER_BLOCK, and few enough
    that a small corpus (`items`, when known) still gives several blocks to each starting actor."""
    if items is None:
        return batch_size * BATCHES_PER_BLOCK
    batches = -(-items // (BLOCKS_PER_ACTOR * pool * batch_size))
    return batch_size * max(1, min(BATCHES_PER_BLOCK, batches))
