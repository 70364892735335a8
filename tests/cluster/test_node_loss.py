"""The model actor survives the loss of its node: on a local multi-node Ray (`ray.cluster_utils.Cluster`, in a
subprocess: this pytest process may hold the session's local Ray already) the node running the only model
actor is removed; Ray restarts the actor on the other GPU node, and the job ends with every item answered.

Ray logs at error level that the actor "has constructor arguments in the object store and max_restarts > 0"
(ray-project/ray#53727) for every Ray Data actor pool: Ray Data `ray.put`s the pool's map function (our
`Predictor` with its few kilobytes of constructor arguments) and its DataContext, and passes the references.
They stay referenced by the driver for the dataset's life, so a restart still finds them, as this shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray

from jobs.inference.devices import FAKE_GPUS_ENV
from jobs.infer import parse_args, run
from tests.cluster.test_infer_cluster import job_argv, predictor_pids, rows_by_id, write_corpus

ITEMS = 4
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}  # noticed in 1 s, not 15


def test_the_model_actor_is_restarted_on_another_node_when_its_node_is_lost(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {FAKE_GPUS_ENV: "1"}
    child = subprocess.run([sys.executable, "-m", "tests.cluster.test_node_loss", str(tmp_path)], env=env, capture_output=True,
                           text=True, timeout=240, cwd=Path(__file__).resolve().parents[2])
    assert child.returncode == 0, child.stderr[-3000:]
    removed = json.loads((tmp_path / "removed.json").read_text())["node"]
    rows = rows_by_id(tmp_path / "out")
    assert sorted(rows) == sorted(f"clip{index}" for index in range(ITEMS))
    assert all(row["error"] is None and row["text"] is not None for row in rows.values())
    nodes = {row["worker"].split(":node=")[1].split(":")[0] for row in rows.values()}
    assert removed not in nodes and len(nodes) == 1, (removed, nodes)  # all answered by the restarted actor


def lose_the_actor_node(work: Path) -> None:
    """Child process: a head (the driver's node, no GPU) and two one-GPU nodes; the job runs one model actor,
    whose node is removed as soon as the actor's process is up."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
                                                           "_system_config": FAST_NODE_DEATH})
    try:
        gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)

        def remove_the_actor_node() -> None:
            node = _wait_for_actor_node(gpu_nodes)
            cluster.remove_node(node, allow_graceful=False)
            (work / "removed.json").write_text(json.dumps({"node": node.node_id[:8]}))

        remover = threading.Thread(target=remove_the_actor_node, daemon=True)
        remover.start()
        run(parse_args(job_argv(write_corpus(work, ITEMS), work / "out", "--pool-size", "1", "--no-score")))
        remover.join(timeout=30)
        assert (work / "removed.json").exists(), "the job ended before the actor's node was removed"
    finally:
        ray.shutdown()
        cluster.shutdown()


def _wait_for_actor_node(nodes: list, timeout: float = 120):
    """The node whose raylet started the model actor's process."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in nodes}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for parent in map(_parent_pid, predictor_pids()):
            if parent in raylets:
                return raylets[parent]
        time.sleep(0.1)
    raise AssertionError("no model actor came up")


def _parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


if __name__ == "__main__":
    lose_the_actor_node(Path(sys.argv[1]))
