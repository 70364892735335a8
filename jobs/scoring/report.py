"""The human side of scoring: a Markdown report with a table, per-worker speed, an error analysis and
charts (PNG)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import cbook

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from jobs.metrics.registry import metric, registered  # noqa: E402
from jobs.scoring.analysis import DURATION_EDGES_S, WORST_ITEMS  # noqa: E402
from jobs.scoring.totals import Distribution  # noqa: E402

DURATION_CHART = "charts/wer_by_duration.png"
DURATION_LABELS = [f"{start}–{end}" for start, end in zip(DURATION_EDGES_S, DURATION_EDGES_S[1:])] + [f"{DURATION_EDGES_S[-1]}+"]

QUALITY_CHART = ("wer", "spider", "cider_d")  # the metrics charts/quality.png shows
SHOWN_CHARACTERS = 90  # of a text in the worst items' table


def table(groups: Sequence[dict[str, Any]]) -> str:
    """The metrics table, Markdown: one line a (corpus, task, model), with its items, errors, the items its
    quality metrics score and those they do not (answered without a reference), then a column a
    registered metric the report shows (jobs.metrics.registry), its better direction marked."""
    columns = [column for column in registered() if column.in_report]
    header = ["corpus", "task", "model", "items", "errors", "scored", "unscored",
              *(f"{column.unit_label} {column.arrow}" for column in columns)]
    lines = [_line(header), _line(["---"] * len(header))]
    for group in groups:
        unscored = group["items"] - group["errors"] - group["scored_items"]
        figures = [_number(column.value(group), column.scale, column.digits) for column in columns]
        lines.append(_line([group["corpus"], group["task"], group["model"], group["items"], group["errors"],
                            group["scored_items"], unscored, *figures]))
    return "\n".join(lines)


def summary(groups: Sequence[dict[str, Any]]) -> str:
    """The table and its notes (errors left out, metrics unavailable): what a command prints at its end."""
    return "\n".join([table(groups), "", *_notes(groups)]).rstrip() + "\n"


def markdown(groups: Sequence[dict[str, Any]], predictions: str, charts: Sequence[str] = (),
             analysis: dict[tuple, dict[str, Any]] | None = None) -> str:
    """The report; `analysis`: each group's error analysis (scoring.analysis.Analysis.summary), by group key."""
    parts = [f"# Scoring report\n\nPredictions: `{predictions}`\n", summary(groups)]
    parts += [f"![{name}]({name})\n" for name in charts if name != DURATION_CHART]
    parts += ["## Workers\n", _workers(groups), ""]
    if analysis:
        parts += [error_analysis(groups, analysis, DURATION_CHART in charts), flags_and_confidence(groups, analysis)]
    parts += [DEFINITIONS]
    return "\n".join(parts)


def error_analysis(groups: Sequence[dict[str, Any]], analysis: dict[tuple, dict[str, Any]], duration_chart: bool) -> str:
    """The error analysis section: WER by duration (a chart), then per group the worst items, the most
    frequent word substitutions, deletions and insertions, and the error codes with an example each."""
    parts = ["## Error analysis\n", "Per item: `items.parquet` (one row an item, its normalized texts and edits).\n"]
    if duration_chart:
        parts.append(f"![WER by duration]({DURATION_CHART})\n")
    for group in groups:
        found = analysis.get(_key(group))
        if not found:
            continue
        parts.append(f"### {group['corpus']} / {group['task']} / {group['model']}\n")
        if found["wer_by_duration"]:
            parts += ["WER by duration:\n", _duration_table(found["wer_by_duration"]), ""]
        if found["worst_items"]:
            by = "lowest CIDEr-D" if "cider_d" in found["worst_items"][0] else "highest WER"
            parts += [f"Worst items (the {WORST_ITEMS} with the {by} at most; texts normalized as scored):\n",
                      _worst_table(found["worst_items"]), ""]
        if any(found["word_edits"].values()):
            parts += ["Most frequent word edits:\n", _edits_table(found["word_edits"]), ""]
        if group["error_codes"]:
            parts += ["Errors:\n", _errors_table(group["error_codes"], found["error_examples"]), ""]
    return "\n".join(parts)


def flags_and_confidence(groups: Sequence[dict[str, Any]], analysis: dict[tuple, dict[str, Any]]) -> str:
    """The reference-free section: per group, the items each flag marks with examples, and, where references
    exist, the WER of the scored items by quarter of confidence: how far the confidence can be trusted on a
    corpus without references."""
    parts = ["## Flags and confidence\n",
             "What each row says about itself, without a reference (the `flags` and `mean_logprob` columns).\n"]
    for group in groups:
        parts.append(f"### {group['corpus']} / {group['task']} / {group['model']}\n")
        if not group["signalled_items"]:
            parts.append("Its rows carry no signals (a dry run, or predictions made before rows carried them).\n")
            continue
        found = analysis.get(_key(group), {})
        parts += [f"{group['flagged_items']} of {group['signalled_items']} answered items flagged:\n",
                  _flags_table(group["flags"], found.get("flag_examples", {})), ""]
        if found.get("confidence_quarters"):
            parts += ["WER by confidence (the scored items in quarters by mean token log-probability, the most "
                      "confident first):\n", _confidence_table(found["confidence_quarters"]), ""]
    return "\n".join(parts)


def _flags_table(counts: dict[str, int], examples: dict[str, list[dict[str, str]]]) -> str:
    lines = [_line(["flag", "items", "examples (id: answer)"]), _line(["---"] * 3)]
    for flag, count in counts.items():
        shown = "; ".join(f"`{example['id']}`: {_cell(example['text']) or '(empty)'}" for example in examples.get(flag, []))
        lines.append(_line([f"`{flag}`", count, shown]))
    return "\n".join(lines)


def _confidence_table(quarters: Sequence[dict[str, Any]]) -> str:
    lines = [_line(["quarter", "items", "mean log-prob", "reference words", "word edits", "WER %"]), _line(["---"] * 6)]
    labels = {0: " (most confident)", len(quarters) - 1: " (least confident)"}
    for number, quarter in enumerate(quarters):
        lines.append(_line([f"{number + 1}{labels.get(number, '')}", quarter["items"],
                            f"{_number(quarter['highest_logprob'])} to {_number(quarter['lowest_logprob'])}",
                            quarter["reference_words"], quarter["word_edits"], _number(quarter["wer"], 100)]))
    return "\n".join(lines)


def _duration_table(buckets: Sequence[dict[str, Any]]) -> str:
    lines = [_line(["duration s", "items", "reference words", "word edits", "WER %"]), _line(["---"] * 5)]
    for bucket in buckets:
        lines.append(_line([_bucket_label(bucket), bucket["items"], bucket["reference_words"], bucket["word_edits"],
                            _number(bucket["wer"], 100)]))
    return "\n".join(lines)


def _bucket_label(bucket: dict[str, Any]) -> str:
    return f"{bucket['from_s']}–{bucket['to_s']}" if bucket["to_s"] is not None else f"{bucket['from_s']}+"


def _worst_table(items: Sequence[dict[str, Any]]) -> str:
    """ASR items (WER, edits) or captioned items (CIDEr-D, the references joined by ` / `)."""
    if "cider_d" in items[0]:
        lines = [_line(["id", "CIDEr-D", "references", "hypothesis"]), _line(["---"] * 4)]
        lines += [_line([f"`{item['id']}`", _number(item["cider_d"]), _cell(" / ".join(item["references"])),
                         _cell(item["hypothesis"])]) for item in items]
        return "\n".join(lines)
    lines = [_line(["id", "WER %", "edits", "reference", "hypothesis"]), _line(["---"] * 5)]
    for item in items:
        lines.append(_line([f"`{item['id']}`", _number(item["wer"], 100), item["word_edits"],
                            _cell(item["reference"]), _cell(item["hypothesis"])]))
    return "\n".join(lines)


def _edits_table(edits: dict[str, list[dict[str, Any]]]) -> str:
    """Substitutions, deletions and insertions side by side, most frequent first."""
    header = ["substitution", "n", "deletion", "n", "insertion", "n"]
    lines = [_line(header), _line(["---"] * len(header))]
    columns = [[(f"{e['reference']} → {e['hypothesis']}", e["count"]) for e in edits["substitution"]],
               [(e["reference"], e["count"]) for e in edits["deletion"]],
               [(e["hypothesis"], e["count"]) for e in edits["insertion"]]]
    for row in range(max(map(len, columns))):
        cells = []
        for column in columns:
            text, count = column[row] if row < len(column) else ("", "")
            cells += [_cell(text), count]
        lines.append(_line(cells))
    return "\n".join(lines)


def _errors_table(codes: dict[str, int], examples: dict[str, dict[str, str]]) -> str:
    lines = [_line(["error", "items", "example", "message"]), _line(["---"] * 4)]
    for code, count in codes.items():
        example = examples.get(code, {"id": "", "message": ""})
        lines.append(_line([f"`{code}`", count, f"`{example['id']}`", _cell(example["message"])]))
    return "\n".join(lines)


def _cell(text: str | None) -> str:
    """Text fit for a table cell: one line, pipes escaped, cut to SHOWN_CHARACTERS."""
    text = " ".join((text or "").split()).replace("|", "\\|")
    return text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS - 1] + "…"


DEFINITIONS = """## How these are computed
- Items with an error are counted and left out of quality metrics, as are the unscored items: answered,
  but without a reference (or of a task no quality metric scores). ↓: lower is better; ↑: higher is better.
- WER: total word edits over total reference words, after the Whisper English normalizer (jiwer).
- CIDEr-D, SPICE, METEOR, BLEU, ROUGE-L: pycocoevalcap over the PTB-tokenized captions, all references
  of an item; SPIDEr = (CIDEr-D + SPICE) / 2; BLEU-n from the n-gram matches summed over all items
  (corpus-level), ROUGE-L the items' mean.
- Error analysis: from each item's word alignment (the same as WER's); a bucket's WER is its edits over
  its reference words; the worst items are those with the highest WER (then the most edits).
- Flags (the model config's `signals` thresholds): `no_speech` the VAD heard no speech, `repetition` the
  answer's compression ratio is high, `token_limit` it ran to the token limit, `low_confidence` its mean
  token log-probability is low. A quarter's WER is its items' edits over their reference words.
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
        if group["flagged_items"]:
            raised = ", ".join(f"{flag} {count}" for flag, count in group["flags"].items() if count)
            notes.append(f"- {name}: {group['flagged_items']} of {group['signalled_items']} answered items flagged ({raised}).")
        if group.get("segmented_items"):
            notes.append(f"- {name}: {group['segmented_items']} of {group['items']} items were long recordings, cut into "
                         "pieces and scored on the stitched text.")
        notes += [f"- {name}: **{metric} unavailable**: {reason}" for metric, reason in group["unavailable"].items()]
    return [*notes, ""] if notes else []


def _workers(groups: Sequence[dict[str, Any]]) -> str:
    header = ["corpus", "task", "worker", "items", "busy s", "items/s busy", "x real time busy", "output tokens/s"]
    lines = [_line(header), _line(["---"] * len(header))]
    for group in groups:
        for worker, speed in group["workers"].items():
            lines.append(_line([group["corpus"], group["task"], worker, speed["items"], _number(speed["wall_s"]),
                                _number(speed["items_per_s"]), _number(speed["x_real_time"]),
                                _number(speed["output_tokens_per_s"])]))
    return "\n".join(lines)


def charts(groups: Sequence[dict[str, Any]], latency: dict[tuple, dict[str, Distribution]],
           analysis: dict[tuple, dict[str, Any]] | None = None) -> dict[str, bytes]:
    """PNG charts by file name (under charts/): quality, speed, the latency distribution (`latency`: the
    scorer's distributions by group key and latency) and WER by duration."""
    labels = {_key(group): f"{group['corpus']}\n{group['task']}" for group in groups}
    made = {
        "charts/quality.png": _bars(groups, labels, [(shown.unit_label, shown.name, shown.scale)
                                                     for shown in map(metric, QUALITY_CHART)],
                                    lambda group, name: group["quality"].get(name)),
        "charts/speed.png": _bars(groups, labels, [(metric(name).label, name, 1) for name in ("items_per_s", "x_real_time")],
                                  lambda group, name: (group["speed"] or {}).get(name)),
        "charts/latency.png": _latency(groups, labels, latency),
        DURATION_CHART: _wer_by_duration(groups, analysis or {}),
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
    for latency_metric in ("ttft_s", "tpot_s"):
        boxes = [latency_box(values) | {"label": labels[_key(g)]} for g in groups
                 if (values := latency.get(_key(g), {}).get(latency_metric)) is not None]
        if boxes:
            panels.append((latency_metric.replace("_s", " (s)"), boxes))
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, (title, boxes) in zip(axes[0], panels):
        axis.bxp(boxes)  # what Axes.boxplot draws, from statistics gathered where the data is
        axis.tick_params(axis="x", labelsize=8)
        axis.set_title(f"{title} per item")
    return _png(figure)


def _wer_by_duration(groups, analysis) -> bytes | None:
    """WER per duration bucket, a line a group, each point labelled with its items."""
    lines = [(f"{g['corpus']} / {g['model']}", buckets) for g in groups
             if (buckets := [b for b in analysis.get(_key(g), {}).get("wer_by_duration", []) if b["wer"] is not None])]
    if not lines:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    for label, buckets in lines:
        positions = [DURATION_LABELS.index(_bucket_label(b)) for b in buckets]
        axis.plot(positions, [b["wer"] * 100 for b in buckets], marker="o", label=label)
        for x, bucket in zip(positions, buckets):
            axis.annotate(f"{bucket['items']}", (x, bucket["wer"] * 100), textcoords="offset points", xytext=(0, 5),
                          ha="center", fontsize=7)
    axis.set_xticks(range(len(DURATION_LABELS)), DURATION_LABELS, fontsize=8)
    axis.set_xlabel("audio duration (s); points labelled with their items")
    axis.set_ylabel("WER %")
    axis.set_ylim(bottom=0)
    axis.set_title("WER by duration")
    axis.legend(fontsize=7)
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
