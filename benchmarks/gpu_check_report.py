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
    rows = [[name, m["audio_tokens_rel_error"], m["first_token_logits_rel_error"], m["first_token_argmax_agreement"],
             m["items_equal"], m["passed"]] for name, m in results["models"].items()]
    header = ["model", "audio tokens rel. error", "first-token logits rel. error", "argmax agreement",
              "batch == one at a time (fp16)", f"passed (< {results['tolerance']})"]
    return table(header, rows)


def efficiency_md(results: dict[str, Any]) -> str:
    rows = [[b["batch_size"], b["ttft_s"]["median"], b["tpot_s"]["median"], b["items_per_s"]["median"],
             b["output_tokens_per_s"]["median"], b["peak_memory_gb"], b.get("repeats", results["repeats"])]
            for b in results["batches"]]
    parts = [f"{results['model']}, {results['dtype']}, {results['clip_seconds']} s clips, {results['new_tokens']} new tokens "
             "(medians; synchronised).", "",
             table(["batch", "TTFT s", "TPOT s", "items/s", "output tokens/s", "peak memory GB", "repeats"], rows)]
    if "largest_batch" in results:
        oom = results.get("out_of_memory_at")
        parts += ["", f"Largest batch that fits: {results['largest_batch']}"
                  + (f" (out of memory at {oom})." if oom else f" (candidates up to {results['largest_candidate']}).")]
    if "batch1_comparison" in results:
        comparison = results["batch1_comparison"]
        parts += ["", table(["batch 1", "measured right", "seed's method here", "seed published (V100)"],
                            [[key, *values.values()] for key, values in comparison.items()])]
    return "\n".join(parts)


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
    keys = ["model", "steps", "batch_size", "amp", "samples_per_s", "measured_steps", "loss", "peak_gpu_memory_gib", "peak_rss_gib"]
    return table(["", "value"], [[key, results.get(key)] for key in keys])


SECTIONS = (("machine", machine_md), ("correctness", correctness_md), ("efficiency", efficiency_md), ("job", job_md),
            ("training", training_md))  # in the steps' order
