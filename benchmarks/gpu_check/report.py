"""The GPU check's Markdown report (gpu_check.md): the step table, then a section per step that ran."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def markdown(report: dict[str, Any]) -> str:
    steps = {entry["name"]: entry for entry in report["steps"]}
    concurrent = " Quick mode: the steps ran side by side, so their times are not comparable." if report.get("concurrent") else ""
    parts = [f"# GPU check ({report['mode']}, {report['device']})", "", f"Started {report['started_at']}.{concurrent}", "",
             table(["step", "status", "seconds", "budget s", "note"],
                   [[e["title"], e["status"], e["seconds"], e["budget_s"], e["reason"] or e["results"].get("note", "")]
                    for e in report["steps"]])]
    for name, section in SECTIONS:
        if steps.get(name, {}).get("results"):
            parts += ["", f"## {steps[name]['title']}", "", section(steps[name]["results"])]
    return "\n".join(parts) + "\n"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(fmt(cell) for cell in line) + " |" for line in lines)


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def machine_md(results: dict[str, Any]) -> str:
    return table(["", "value"], list(results.items()))


def correctness_md(results: dict[str, Any]) -> str:
    rows = []
    for name, entry in results["models"].items():
        for variant, v in entry["variants"].items():
            if "skipped" in v:
                rows.append([name, variant, *[None] * 8, f"skipped: {v['skipped']}"])
                continue
            failed = [check for check, ok in v["checks"].items() if not ok]
            rows.append([name, variant, v["tolerance"], max(v["audio_tokens_batch_vs_alone"], v["logits_batch_vs_alone"]),
                         v["logits_permuted_vs_batch"], min(v["audio_tokens_swap_margin"], v["logits_swap_margin"]),
                         v["audio_tokens_rel_error"], v["first_token_logits_rel_error"], v["first_token_argmax_agreement"],
                         v["texts_equal"], "passed" if v["passed"] else f"FAILED: {', '.join(failed)}"])
    header = ["model", "precision", "tolerance", "batch vs alone", "permuted vs batch", "swap margin", "audio tokens vs fp32",
              "logits vs fp32", "argmax agreement", "greedy texts batch == alone", "result"]
    return f"Items: {', '.join(results['items'])} (one batch).\n\n" + table(header, rows)


def efficiency_md(results: dict[str, Any]) -> str:
    rows = [[b["batch_size"], b["ttft_s"]["median"], b["tpot_s"]["median"], b["items_per_s"]["median"],
             b["output_tokens_per_s"]["median"], b["peak_memory_gb"], *reserved_and_nvml_gb(b.get("gpu_memory")),
             b.get("repeats", results["repeats"])] for b in results["batches"]]
    parts = [f"{results['model']}, {results['dtype']}, {results['clip_seconds']} s clips, {results['new_tokens']} new tokens "
             "(medians; synchronised).", "",
             table(["batch", "TTFT s", "TPOT s", "items/s", "output tokens/s", "peak memory GB", "peak reserved GB",
                    "NVML process GB", "repeats"], rows)]
    emulations = {"v100_emulation": "V100 emulation (float16, flash attention off, one run each):",
                  "v100_qwen2_default": "V100 emulation of dtype auto for Qwen2 (float32 LLM, float16 encoders, flash "
                                        "attention off, one run each):"}
    for key, title in emulations.items():
        if key in results:
            rows = [[b["batch_size"], b["ttft_s"]["median"], b["tpot_s"]["median"], b["items_per_s"]["median"],
                     b["peak_memory_gb"]] for b in results[key]]
            parts += ["", title, "", table(["batch", "TTFT s", "TPOT s", "items/s", "peak memory GB"], rows)]
    if "largest_batch" in results:
        oom = results.get("out_of_memory_at")
        parts += ["", f"Largest batch that fits: {results['largest_batch']}"
                  + (f" (out of memory at {oom})." if oom else f" (candidates up to {results['largest_candidate']}).")]
    if "batch1_comparison" in results:
        comparison = results["batch1_comparison"]
        parts += ["", table(["batch 1", "measured right", "seed's method here", "seed published (V100)"],
                            [[key, *values.values()] for key, values in comparison.items()])]
    return "\n".join(parts)


def reserved_and_nvml_gb(memory: dict[str, int | None] | None) -> list[float | None]:
    """jobs.metrics.memory's peak reserved and NVML process figures in GB (None on CPU or where NVML cannot say)."""
    memory = memory or {}
    return [None if memory.get(key) is None else round(memory[key] / 1e9, 3) for key in ("max_reserved_bytes", "nvml_process_bytes")]


def job_md(results: dict[str, Any]) -> str:
    rows = []
    for r in results["runs"]:
        if "failed" in r:
            rows.append([r["corpus"], r["model"], r["engine"], f"FAILED: {r['failed'][:200]}", *[None] * 6])
            continue
        util = r["gpu_utilisation"]
        rows.append([r["corpus"], r["model"], r["engine"], r["items"], r["errors"], r["x_real_time"], r["model_phase_s"],
                     util.get("mean_pct"), util.get("max_pct"), util.get("reason", util["samples"])])
    return table(["corpus", "model", "engine", "items", "errors", "x real time", "model phase s", "GPU util mean %",
                  "GPU util max %", "NVML samples"], rows)


def training_md(results: dict[str, Any]) -> str:
    keys = ["model", "steps", "batch_size", "amp", "samples_per_s", "measured_steps", "loss", "peak_gpu_memory_gib",
            "peak_gpu_reserved_gib", "peak_rss_gib"]
    return table(["", "value"], [[key, results.get(key)] for key in keys])


def two_workers_md(results: dict[str, Any]) -> str:
    rows = [[r["rank"], r["device"], r["model_dtype"], r["autocast"], r["grad_scaler"], r["losses"][-1], r["losses_finite"],
             r["in_sync"], r["steps_per_s"], reserved_and_nvml_gb(r["gpu_memory"])[0]] for r in results["ranks"]]
    return table(["rank", "device", "model dtype", "autocast", "grad scaler", "last loss", "losses finite", "weights in sync",
                  "steps/s", "peak reserved GB"], rows)


SECTIONS = (("machine", machine_md), ("correctness", correctness_md), ("efficiency", efficiency_md),
            ("two_workers", two_workers_md), ("job", job_md), ("training", training_md))  # in the steps' order
