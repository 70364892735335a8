"""SIMULATED scale test (benchmarks.scaling): the real job on a local multi-node Ray with fake GPUs and a
stub model that sleeps a fixed cost per item. One and two GPU nodes, each in its own subprocess with
its own Ray (this pytest process may hold the session's local Ray already)."""

from benchmarks.scaling import simulate


def test_two_gpu_nodes_get_one_actor_each_and_halve_the_model_time():
    # 32 items, 2 per batch: enough batches for the stub's sleeps to dominate.
    summary = simulate(["--nodes", "1,2", "--items", "32", "--cost-s", "0.1", "--batch-size", "2", "--timeout-s", "240"])
    assert summary["simulation"] is True
    runs = {run["nodes"]: run for run in summary["runs"]}
    assert sorted(runs) == [1, 2] and not any("failed" in run for run in runs.values()), summary
    for nodes, run in runs.items():
        assert run["gpus"] == nodes, run
        assert run["actors"] == run["actor_nodes"] == nodes, f"{nodes} fake GPUs: actors {run['workers']}"
        assert run["items_done"] == run["rows"] == 32 and run["duplicates"] == 0 and run["errors"] == 0, run
        assert run["all_items_once"] and run["one_actor_per_gpu"], run
    # The steady state (first model batch to last): on one 2-core machine the job's start-up (torch imported
    # by every actor and decode worker of every fake node) grows with the node count, so its wall time is
    # no measure of scaling here; the stub's sleeps are.
    assert runs[2]["model_speedup"] > 1.3, summary
