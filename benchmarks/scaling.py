"""SIMULATED scale test of the batch job: does it use every GPU node it is given?

    python -m benchmarks.scaling --nodes 1,2,4 --items 64 --cost-s 0.1 --batch-size 4 [--warm-up]

THIS IS A SIMULATION. No model runs and no GPU is used: for each node count N it starts, on this one
machine, a local multi-node Ray (`ray.cluster_utils.Cluster`: a head node with no GPU and
`--head-cpus` CPUs, and N worker nodes, each with a fake `num_gpus=1` and `--cpus-per-node` CPUs),
and runs the real job (`jobs.infer.run`: the real manifest of small generated WAV files, real decode
tasks, the real actor pool, the write stage and Parquet output) with a STUB model in place of the real
one: `SimulatedPredictor` (a `Predictor` subclass that loads no weights) answers "simulated" and
sleeps `cost_s` per item of each batch. What it measures is the job's orchestration (one actor per GPU
node, every item exactly once, how the work spreads over the actors), not model speed. All nodes share
this machine's CPUs, so per-node start-up (each actor and decode worker imports torch) does not run in
parallel as it would on a real cluster: `job_wall_s` grows with N here, `model_phase_s` is the fair
measure of scaling. `--warm-up` takes that start-up out of the measured run too: the job runs once over a small
corpus on the same cluster first, so that every node's decode workers are up and have imported what they need
(the actors are still new), as on a cluster whose nodes start on their own CPUs.

Each node count runs in its own subprocess with a fresh Ray, shut down afterwards (Ray Data keeps
per-process state). Prints a table on stderr and the report as JSON on stdout (exit 1 unless every
check holds):

- `gpus`: fake GPUs in the cluster; `actors`: distinct `worker` values in the output; `actor_nodes`:
  distinct Ray node ids among them; `one_actor_per_gpu`: actors == gpus == actor_nodes;
  `items_per_actor`: rows each actor answered;
- `items_done`: unique ids in the output; `all_items_once`: every manifest item exactly once, no
  duplicates, no errors, every text "simulated";
- `job_wall_s` (the job's own wall time, `run()`'s summary: manifest, actor start-up, decoding, model,
  Parquet), `items_per_s`, `speedup` (over the 1-node run) and `efficiency` (speed-up / nodes);
  `startup_s`: job start to its first model batch;
- `model_phase_s`: first model batch start to last model batch end over all actors, and
  `model_items_per_s`, `model_speedup`, `model_efficiency` from it (the steady state, without
  start-up); `ideal_model_s` = items x cost_s / gpus, and `model_ideal_ratio` = ideal_model_s / model_phase_s
  (1.0: every GPU busy from the first batch to the last; it needs no 1-node run, see `--no-baseline`);
  where it falls short, `first_batch_spread_s` (the first actor's first batch to the last actor's),
  `last_batch_spread_s` (the first actor to end its last batch to the last one), `longest_idle_between_batches_s`
  (the longest wait of any actor between two of its batches) and `actor_busy_share` (the actors' model seconds
  over actors x model phase).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import soundfile as sf

from jobs.infer import parse_args, run
from jobs.inference.devices import FAKE_GPUS_ENV
from jobs.inference.predict import Predictor, worker_name
from jobs.inference.settings import JobSettings
from nota_model.build import LoadedModel
from nota_model.config import ModelConfig
from nota_model.decoding import GenerationOutput

RESULT_PREFIX = "SCALING_RESULT "
CORPUS = "scaling"
SIMULATED_TEXT = "simulated"


class SimulatedModel:
    """SIMULATION stand-in for the model: no weights; each batch sleeps `cost_s` per item and every
    answer is "simulated"."""

    device = "sim"

    def __init__(self, config: ModelConfig, cost_s: float):
        self.config = config
        self.cost_s = cost_s

    def prompt_for(self, task: str, prompt: str | None = None) -> str:
        return prompt or self.config.prompt.task_prompt(task)

    def generate(self, clips: list, prompts: list[str], decoding: Any = None, features: Any = None) -> GenerationOutput:
        started = time.perf_counter()
        time.sleep(self.cost_s * len(clips))
        return GenerationOutput(
            texts=[SIMULATED_TEXT] * len(clips), token_ids=[[] for _ in clips], output_tokens=[1] * len(clips),
            ttft_s=time.perf_counter() - started, tpot_s=None, decode_steps=1,
        )


class SimulatedPredictor(Predictor):
    """SIMULATION: the job's `Predictor` with model loading and generation replaced by `SimulatedModel`;
    its row building, batch fallback and output schema are the real ones."""

    def __init__(self, config: ModelConfig, checkpoint: str | None, settings: JobSettings, cost_s: float):
        model = SimulatedModel(config, cost_s)
        self.loaded = LoadedModel(model=model, identity=f"simulated+cost_s={cost_s}", checkpoint_sha256=None,
                                  checkpoint_report=None)
        self.model = model
        self.settings = settings
        self.worker = worker_name(model.device)


def write_corpus(root: Path, items: int, items_per_shard: int) -> Path:
    """`items` short WAV tones (1 to 2 s) and a manifest over them."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(items):
        seconds = 1.0 + (index % 3) / 2
        t = np.arange(int(seconds * 16000)) / 16000
        sf.write(root / f"clip{index}.wav", (0.3 * np.sin(2 * np.pi * (200 + 10 * index) * t)).astype(np.float32), 16000)
        lines.append(json.dumps({"id": f"clip{index}", "audio": f"clip{index}.wav"}))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    (root / "corpus.yaml").write_text(f"name: {CORPUS}\ntask: asr\nitems: items.jsonl\nitems_per_shard: {items_per_shard}\n")
    return root / "corpus.yaml"


def measure(rows: list[dict[str, Any]], items: int, job_started: float) -> dict[str, Any]:
    """What the output says: actors and their nodes, items done, the model phase (`job_started`: the
    wall-clock time the job was started, for the start-up before its first model batch)."""
    ids = [row["id"] for row in rows]
    workers = sorted({row["worker"] for row in rows if row["worker"]})
    nodes = {worker.split(":node=")[1].split(":")[0] for worker in workers}
    batches = {(row["worker"], row["created_at"]): row["model_s"] for row in rows if row["model_s"] is not None}
    starts = [created.timestamp() - model_s for (_, created), model_s in batches.items()]
    ends = [created.timestamp() for (_, created) in batches]
    per_actor = {worker: sum(1 for row in rows if row["worker"] == worker) for worker in workers}
    spans: dict[str, list[tuple[float, float]]] = {}  # each actor's batches, (start, end), in time order
    for (worker, created), model_s in sorted(batches.items(), key=lambda batch: batch[0][1]):
        spans.setdefault(worker, []).append((created.timestamp() - model_s, created.timestamp()))
    first_batch = {worker: batches_of[0][0] for worker, batches_of in spans.items()}
    last_batch = {worker: batches_of[-1][1] for worker, batches_of in spans.items()}
    longest_gap = max((later[0] - earlier[1] for batches_of in spans.values()
                       for earlier, later in zip(batches_of, batches_of[1:])), default=0.0)
    phase = max(ends) - min(starts) if batches else 0.0
    return {
        "actors": len(workers),
        "actor_nodes": len(nodes),
        "workers": workers,
        "items_done": len(set(ids)),
        "rows": len(rows),
        "duplicates": len(ids) - len(set(ids)),
        "errors": sum(1 for row in rows if row["error"] is not None),
        "not_simulated": sum(1 for row in rows if row["text"] != SIMULATED_TEXT),
        "expected_ids": sorted(ids) == sorted(f"clip{index}" for index in range(items)),
        "items_per_actor": sorted(per_actor.values(), reverse=True),
        "model_phase_s": round(phase, 3) if batches else None,
        # what keeps the model phase from its ideal: actors starting their first batch late, or idle between batches
        "first_batch_spread_s": round(max(first_batch.values()) - min(first_batch.values()), 3) if batches else None,
        "last_batch_spread_s": round(max(last_batch.values()) - min(last_batch.values()), 3) if batches else None,
        "longest_idle_between_batches_s": round(longest_gap, 3) if batches else None,
        "actor_busy_share": round(sum(batches.values()) / (len(workers) * phase), 3) if phase else None,
        "startup_s": round(min(starts) - job_started, 3) if batches else None,
    }


def one_run(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Child process: a fresh local Ray cluster of a head and `nodes` fake-GPU nodes, the job on it."""
    from ray.cluster_utils import Cluster

    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.head_cpus, "num_gpus": 0, "include_dashboard": False})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=args.cpus_per_node, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
        ray.data.DataContext.get_current().enable_progress_bars = False
        cluster_start_s = time.perf_counter() - started
        resources = ray.cluster_resources()
        ray_nodes = sum(1 for node in ray.nodes() if node["Alive"])
        if args.warm_up:
            simulated_job(args.warm_up_corpus, Path(args.work) / f"warm-up-{nodes}", args)
        output = Path(args.work) / f"out-{nodes}"
        job_started = time.time()
        job = simulated_job(args.corpus, output, args)
        rows = [row for part in sorted((output / CORPUS).glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]
    finally:
        ray.shutdown()
        cluster.shutdown()
    result = {
        "nodes": nodes,
        "gpus": int(resources.get("GPU", 0)),
        "ray_nodes": ray_nodes,
        "cluster_start_s": round(cluster_start_s, 2),
        "job_wall_s": job["wall_s"],
        **measure(rows, args.items, job_started),
    }
    result["ideal_model_s"] = round(args.items * args.cost_s / max(result["gpus"], 1), 3)
    if result["model_phase_s"]:
        result["model_ideal_ratio"] = round(result["ideal_model_s"] / result["model_phase_s"], 3)
    result["one_actor_per_gpu"] = result["actors"] == result["gpus"] == result["actor_nodes"]
    result["all_items_once"] = (result["items_done"] == result["rows"] == args.items and result["expected_ids"]
                                and result["errors"] == 0 and result["not_simulated"] == 0)
    return result


def simulated_job(corpus: str, output: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The real job over `corpus` with the stub model; its summary."""
    return run(parse_args(["--manifest", str(corpus), "--model", "tiny", "--output", str(output),
                           "--batch-size", str(args.batch_size), "--no-score",
                           "--set", "signals.skip_silence=false"]),  # its tones are no speech: they must reach the model
               predictor=SimulatedPredictor, predictor_kwargs={"cost_s": args.cost_s})


def spawn(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    """One node count in its own process (its own Ray, its own Ray Data state)."""
    command = [sys.executable, "-m", "benchmarks.scaling", "--one", str(nodes), "--corpus", str(args.corpus), "--work", str(args.work),
               "--items", str(args.items), "--cost-s", str(args.cost_s), "--batch-size", str(args.batch_size),
               "--cpus-per-node", str(args.cpus_per_node), "--head-cpus", str(args.head_cpus)]
    if args.warm_up:
        command += ["--warm-up", "--warm-up-corpus", str(args.warm_up_corpus)]
    # Its GPUs are Ray's fake ones: the actors run the stub on the CPU (jobs.inference.devices).
    env = {**{key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}, FAKE_GPUS_ENV: "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             cwd=Path(__file__).resolve().parent.parent)
    try:
        stdout, stderr = child.communicate(timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child and the Ray processes it started
        child.communicate()
        return {"nodes": nodes, "failed": f"timed out after {args.timeout_s} s"}
    results = [line[len(RESULT_PREFIX):] for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if child.returncode != 0 or not results:
        return {"nodes": nodes, "failed": f"exit {child.returncode}: {stderr[-2000:]}"}
    return json.loads(results[-1])


def simulate(argv: list[str]) -> dict[str, Any]:
    """Run the simulation for each node count (command-line arguments as for `main`); the report."""
    args = parser().parse_args(argv)
    node_counts = [int(n) for n in args.nodes.split(",")]
    if 1 not in node_counts and not args.no_baseline:
        node_counts.insert(0, 1)  # the baseline
    results = []
    with tempfile.TemporaryDirectory(prefix="nota-scaling-") as work:
        args.work = work
        args.corpus = write_corpus(Path(work) / "corpus", args.items, args.items_per_shard)
        if args.warm_up:  # a batch for each node's actor, twice over, in shards as small as the measured corpus's
            args.warm_up_corpus = write_corpus(Path(work) / "warm-up", 2 * max(node_counts) * args.batch_size,
                                               args.items_per_shard)
        for nodes in node_counts:
            results.append(spawn(nodes, args))
            print(f"[simulation] nodes={nodes}: {json.dumps(results[-1])[:600]}", file=sys.stderr, flush=True)
    return report(results, args)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    base = next((r for r in results if r.get("nodes") == 1 and "failed" not in r), None)
    for result in results:
        if "failed" in result or base is None or not result["model_phase_s"]:
            continue
        result["items_per_s"] = round(args.items / result["job_wall_s"], 3)
        result["speedup"] = round(base["job_wall_s"] / result["job_wall_s"], 3)
        result["efficiency"] = round(result["speedup"] / result["nodes"], 3)
        result["model_items_per_s"] = round(args.items / result["model_phase_s"], 3)
        result["model_speedup"] = round(base["model_phase_s"] / result["model_phase_s"], 3)
        result["model_efficiency"] = round(result["model_speedup"] / result["nodes"], 3)
    ok = all("failed" not in r and r["one_actor_per_gpu"] and r["all_items_once"] for r in results)
    return {
        "simulation": True,
        "what": "SIMULATED model (sleep cost_s per item, text 'simulated'); real Ray Data job on a local multi-node Ray "
                "with fake GPUs, all nodes on one machine",
        "items": args.items, "cost_s": args.cost_s, "batch_size": args.batch_size,
        "cpus_per_node": args.cpus_per_node, "head_cpus": args.head_cpus, "machine_cpus": os.cpu_count(),
        "ok": ok,
        "runs": results,
    }


def table(summary: dict[str, Any]) -> str:
    columns = ["nodes", "gpus", "actors", "actor_nodes", "items_done", "items_per_actor", "startup_s", "job_wall_s", "items_per_s", "speedup", "efficiency",
               "model_phase_s", "ideal_model_s", "model_ideal_ratio", "first_batch_spread_s", "last_batch_spread_s",
               "longest_idle_between_batches_s", "actor_busy_share", "model_speedup", "model_efficiency", "one_actor_per_gpu", "all_items_once"]
    lines = ["SIMULATION (stub model, fake GPUs on one machine)", " | ".join(columns)]
    for run_ in summary["runs"]:
        if "failed" in run_:
            lines.append(f"{run_['nodes']} | FAILED: ...{run_['failed'][-400:]}")
        else:
            lines.append(" | ".join(str(run_.get(column, "")) for column in columns))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,2,4", help="node counts to run, comma-separated (1, the baseline, is added)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="no 1-node run: only the model phase against its ideal (`model_ideal_ratio`) measures scaling")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--cost-s", type=float, default=0.1, help="simulated model seconds per item")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--items-per-shard", type=int, default=8)
    parser.add_argument("--cpus-per-node", type=int, default=1, help="logical CPUs of each fake-GPU node (its actor takes 1)")
    parser.add_argument("--head-cpus", type=int, default=1, help="logical CPUs of the head node (it runs the decode tasks)")
    parser.add_argument("--timeout-s", type=float, default=600, help="per node count")
    parser.add_argument("--warm-up", action="store_true",
                        help="run the job once over a small corpus on the same cluster before the measured run, so that "
                             "every node's decode workers have started and imported what they need: on a real cluster each "
                             "node does that on its own CPUs, here all share this machine's (the first batches' spread)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: run one node count
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--warm-up-corpus", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.one is not None:
        print(RESULT_PREFIX + json.dumps(one_run(args.one, args), default=str), flush=True)
        return 0
    summary = simulate(sys.argv[1:] if argv is None else argv)
    print(table(summary), file=sys.stderr, flush=True)
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
