import json
from types import SimpleNamespace

import pytest
import torch

from jobs.bench import SEED_PUBLISHED, BenchSettings, bench, main, seed_method

SETTINGS = BenchSettings(seconds=2.0, batch_sizes=(1, 2), new_tokens=4, repeats=2, warmup=1)
TIMES = ("ttft_s", "tpot_s", "e2e_s", "items_per_s", "output_tokens_per_s")


@pytest.fixture(scope="module")
def report(tiny):
    return bench(tiny, SETTINGS)


def test_header_names_model_machine_and_settings(report):
    assert report["model"] == "tiny+no-checkpoint+float32"
    assert report["device"] == "cpu" and report["gpu"] is None
    assert report["dtype"] == "torch.float32" and report["torch_threads"] >= 1 and report["torch_version"]
    assert (report["clip_seconds"], report["new_tokens"], report["repeats"], report["warmup"]) == (2.0, 4, 2, 1)


def test_every_batch_size_has_positive_spreads_and_memory(report):
    assert [b["batch_size"] for b in report["batches"]] == [1, 2]
    for batch in report["batches"]:
        for key in TIMES:
            spread = batch[key]
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], (key, spread)
        assert batch["peak_memory_bytes"] > 0 and batch["peak_memory_gb"] > 0
        assert batch["memory_kind"].startswith("cpu peak RSS")


def test_exactly_new_tokens_per_item_and_tpot_over_the_later_steps(report):
    n = SETTINGS.new_tokens
    for batch in report["batches"]:
        assert batch["output_tokens_per_item"] == {"median": n, "min": n, "max": n}
        assert batch["tpot_steps"] == n - 1
        ttft, tpot, e2e = (batch[key]["median"] for key in ("ttft_s", "tpot_s", "e2e_s"))
        assert e2e >= ttft + (n - 1) * tpot * 0.5
        fastest = batch["e2e_s"]["min"]
        assert batch["output_tokens_per_s"]["max"] == pytest.approx(n * batch["batch_size"] / fastest, rel=1e-3)


def test_seed_method_and_published_numbers_sit_beside_the_batch1_figures(report):
    seed = report["seed_method"]
    assert seed["batch_size"] == 1 and seed["synchronised"] is False and seed["tpot_steps"] == 1
    assert seed["ttft_s"] > 0 and seed["tpot_s"] > 0
    assert report["seed_published"] == SEED_PUBLISHED == {"ttft_s": 0.1722, "tpot_s": 0.038, "peak_memory_gb": 3.83}
    batch1 = report["batches"][0]
    side_by_side = report["batch1_comparison"]
    assert side_by_side["ttft_s"] == {"correct": batch1["ttft_s"]["median"], "seed_method": seed["ttft_s"], "seed_published": 0.1722}
    assert side_by_side["tpot_s"] == {"correct": batch1["tpot_s"]["median"], "seed_method": seed["tpot_s"], "seed_published": 0.038}
    assert side_by_side["peak_memory_gb"] == {"correct": batch1["peak_memory_gb"], "seed_method": None, "seed_published": 3.83}


def test_main_prints_and_writes_the_report(tmp_path, capsys):
    output = tmp_path / "bench.json"
    argv = ["--model", "tiny", "--device", "cpu", "--seconds", "1", "--batch-sizes", "2", "--new-tokens", "3", "--repeats", "1"]
    assert main([*argv, "--warmup", "0", "--output", str(output)]) == 0
    written = json.loads(output.read_text())
    assert json.loads(capsys.readouterr().out) == written
    (batch,) = written["batches"]
    assert batch["batch_size"] == 2 and batch["tpot_steps"] == 2 and batch["output_tokens_per_item"]["min"] == 3
    assert written["batch1_comparison"]["ttft_s"]["correct"] is None and written["seed_method"]["ttft_s"] > 0


def test_main_refuses_a_single_new_token():
    with pytest.raises(SystemExit):
        main(["--new-tokens", "1"])


def test_seed_method_is_null_with_a_reason_for_other_models():
    seed = seed_method(object(), SETTINGS)
    assert seed["ttft_s"] is None and seed["tpot_s"] is None and seed["reason"]


class _Transformers4LLM(torch.nn.Module):
    """An LLM as transformers 4.x has it: the KV cache goes in and out as `past_key_values`, `cache` is unknown."""

    def __init__(self, llm: torch.nn.Module):
        super().__init__()
        self.llm = llm

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.llm.get_input_embeddings()

    def forward(self, past_key_values=None, **kwargs):
        if "cache" in kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'cache'")
        output = self.llm(cache=past_key_values, **kwargs)
        return SimpleNamespace(logits=output.logits, past_key_values=output.cache)


def test_the_seed_method_reads_the_kv_cache_of_transformers_4_and_5(tiny, monkeypatch):
    settings = BenchSettings(seconds=1.0, batch_sizes=(1,), new_tokens=2, repeats=1, warmup=0)
    assert seed_method(tiny.model, settings)["tpot_s"] > 0  # transformers 5: `cache`
    # setitem, not setattr: monkeypatch would undo a module attribute (kept in _modules) by deleting it
    monkeypatch.setitem(tiny.model._modules, "llama_model", _Transformers4LLM(tiny.model.llama_model))
    assert seed_method(tiny.model, settings)["tpot_s"] > 0
