"""The human side of scoring: a Markdown report with a table, per-worker speed and charts (PNG)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import cbook

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from jobs.scoring.totals import Distribution  # noqa: E402

QUALITY_COLUMNS = {"WER %": ("wer", 100), "CER %": ("cer", 100), "CIDEr-D": ("cider_d", 1), "SPICE": ("spice", 1),
                   "SPIDEr": ("spider", 1), "METEOR": ("meteor", 1)}


def table(groups: Sequence[dict[str, Any]]) -> str:
    """The metrics table, Markdown: one line a (corpus, task, model)."""
    header = ["corpus", "task", "model", "items", "errors", *QUALITY_COLUMNS, "items/s", "x real time", "ttft p50 s", "tpot p50 s"]
    lines = [_line(header), _line(["---"] * len(header))]
    for group in groups:
        quality = [_number(group["quality"].get(name), scale) for name, scale in QUALITY_COLUMNS.values()]
        speed = group["speed"] or {}
        latency = [_number((speed.get(name) or {}).get("p50"), 1, 4) for name in ("ttft_s", "tpot_s")]
        lines.append(_line([group["corpus"], group["task"], group["model"], group["items"], group["errors"], *quality,
                            _number(speed.get("items_per_s")), _number(speed.get("x_real_time")), *latency]))
    return "\n".join(lines)


def summary(groups: Sequence[dict[str, Any]]) -> str:
    """The table and its notes (errors left out, metrics unavailable): what a command prints at its end."""
    return "\n".join([table(groups), "", *_notes(groups)]).rstrip() + "\n"


def markdown(groups: Sequence[dict[str, Any]], predictions: str, charts: Sequence[str] = ()) -> str:
    parts = [f"# Scoring report\n\nPredictions: `{predictions}`\n", summary(groups)]
    parts += [f"![{name}]({name})\n" for name in charts]
    parts += ["## Workers\n", _workers(groups), "", DEFINITIONS]
    return "\n".join(parts)


DEFINITIONS = """## How these are computed
- Items with an error are counted and left out of quality metrics.
- WER: total word edits over total reference words, after the Whisper English normalizer (jiwer).
- CIDEr-D, SPICE, METEOR: pycocoevalcap over the PTB-tokenized captions, all references of an item;
  SPIDEr = (CIDEr-D + SPICE) / 2.
- items/s and x real time: items (audio seconds) over the wall time from a job's first model batch to
  its last, summed over jobs; start-up and model loading are not in it. Per worker: over busy time.
- ttft/tpot: each item's batch figures (encoders included in ttft); percentiles over items, exact (not
  a sketch): the values are merged across blocks as distinct values with their counts, at most one a batch.
"""


def _notes(groups: Sequence[dict[str, Any]]) -> list[str]:
    notes = []
    for group in groups:
        name = f"{group['corpus']} / {group['task']} / {group['model']}"
        if group["errors"]:
            codes = ", ".join(f"{code} {count}" for code, count in group["error_codes"].items())
            notes.append(f"- {name}: {group['errors']} of {group['items']} items had errors ({codes}), left out of quality metrics.")
        if group.get("segmented_items"):
            notes.append(f"- {name}: {group['segmented_items']} of {group['items']} items were long recordings, cut into "
                         "pieces and scored on the stitched text.")
        notes += [f"- {name}: **{metric} unavailable**: {reason}" for metric, reason in group["unavailable"].items()]
    return [*notes, ""] if notes else []


def _workers(groups: Sequence[dict[str, Any]]) -> str:
    header = ["corpus", "task", "worker", "items", "busy s", "items/s", "x real time", "output tokens/s"]
    lines = [_line(header), _line(["---"] * len(header))]
    for group in groups:
        for worker, speed in group["workers"].items():
            lines.append(_line([group["corpus"], group["task"], worker, speed["items"], _number(speed["wall_s"]),
                                _number(speed["items_per_s"]), _number(speed["x_real_time"]),
                                _number(speed["output_tokens_per_s"])]))
    return "\n".join(lines)


def charts(groups: Sequence[dict[str, Any]], latency: dict[tuple, dict[str, Distribution]]) -> dict[str, bytes]:
    """PNG charts by file name (under charts/): quality, speed, and the latency distribution
    (`latency`: the scorer's distributions by group key and latency)."""
    labels = {_key(group): f"{group['corpus']}\n{group['task']}" for group in groups}
    made = {
        "charts/quality.png": _bars(groups, labels, [("WER %", "wer", 100), ("SPIDEr", "spider", 1), ("CIDEr-D", "cider_d", 1)],
                                    lambda group, name: group["quality"].get(name)),
        "charts/speed.png": _bars(groups, labels, [("items/s", "items_per_s", 1), ("x real time", "x_real_time", 1)],
                                  lambda group, name: (group["speed"] or {}).get(name)),
        "charts/latency.png": _latency(groups, labels, latency),
    }
    return {name: png for name, png in made.items() if png is not None}


def _bars(groups, labels, panels, value: Callable[[dict, str], float | None]) -> bytes | None:
    panels = [(title, [(labels[_key(g)], value(g, name) * scale) for g in groups if _present(value(g, name))])
              for title, name, scale in panels]
    panels = [(title, bars) for title, bars in panels if bars]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, (title, bars) in zip(axes[0], panels):
        names, heights = zip(*bars)
        axis.bar(range(len(bars)), heights, color="#4878a8")
        axis.set_xticks(range(len(bars)), names, fontsize=8)
        axis.set_title(title)
        for x, height in enumerate(heights):
            axis.annotate(f"{height:.3g}", (x, height), ha="center", va="bottom", fontsize=8)
    return _png(figure)


def _latency(groups, labels, latency) -> bytes | None:
    panels = []
    for metric in ("ttft_s", "tpot_s"):
        boxes = [latency_box(values) | {"label": labels[_key(g)]} for g in groups
                 if (values := latency.get(_key(g), {}).get(metric)) is not None]
        if boxes:
            panels.append((metric.replace("_s", " (s)"), boxes))
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, (title, boxes) in zip(axes[0], panels):
        axis.bxp(boxes)  # what Axes.boxplot draws, from statistics gathered where the data is
        axis.tick_params(axis="x", labelsize=8)
        axis.set_title(f"{title} per item")
    return _png(figure)


def latency_box(distribution: Distribution) -> dict[str, Any]:
    """matplotlib's box-plot statistics of a latency over a group's items; repeated outliers once, since a
    marker drawn twice looks the same."""
    (stats,) = cbook.boxplot_stats(distribution.expand())
    return stats | {"fliers": np.unique(stats["fliers"])}


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def _key(item: dict[str, Any]) -> tuple:
    return item["corpus"] or "", item["task"] or "", item["model"] or ""


def _present(value: float | None) -> bool:
    return value is not None and value == value  # NaN: no wall time to divide by


def _number(value: float | None, scale: float = 1, digits: int = 3) -> str:
    return f"{value * scale:.{digits}g}" if _present(value) else "–"


def _line(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
