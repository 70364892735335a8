"""SIMULATED scale test (benchmarks.scaling): the real job on a local multi-node Ray with fake GPUs and a
stub model that sleeps a fixed cost per item. Two GPU nodes, in a subprocess with its own Ray (this pytest
process may hold the session's local Ray already); no 1-node run: the stub's known cost is the baseline."""

from benchmarks.scaling import simulate

ITEMS, COST_S = 32, 0.1


def test_two_gpu_nodes_get_one_actor_each_and_share_the_model_time():
    # 32 items, 2 per batch: enough batches for the stub's sleeps to dominate.
    summary = simulate(["--nodes", "2", "--no-baseline", "--items", str(ITEMS), "--cost-s", str(COST_S),
                        "--batch-size", "2", "--timeout-s", "240"])
    assert summary["simulation"] is True
    [run] = summary["runs"]
    assert "failed" not in run and run["nodes"] == run["gpus"] == 2, summary
    assert run["actors"] == run["actor_nodes"] == 2, f"2 fake GPUs: actors {run['workers']}"
    assert run["items_done"] == run["rows"] == ITEMS and run["duplicates"] == 0 and run["errors"] == 0, run
    assert run["all_items_once"] and run["one_actor_per_gpu"], run
    # The steady state (first model batch to last): one GPU needs at least ITEMS x COST_S = 3.2 s of sleeps, so a
    # model phase a tenth shorter shows both GPUs working at once (the second actor's first batch may come a second
    # later, fed by a decode worker that is still importing torch: first_batch_spread_s). The job's wall time is no
    # measure here: on one 2-core machine its start-up (every actor and decode worker imports torch) grows with the nodes.
    assert run["model_phase_s"] < 0.9 * ITEMS * COST_S, run
