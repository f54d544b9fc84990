"""Writing a benchmark run: JSON, a markdown table and a PNG chart, named by device and date, into a
new folder per run unless asked to update the committed results."""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROOFLINE_NOTE = (
    "% roofline: the ideal time over the median, where the ideal time is the larger of the bytes a step "
    "must move (bench/ideal.py) over the copy bandwidth measured in this run and its FLOPs over the "
    "measured matmul rate. The copy bandwidth counts bytes read plus written by a device-to-device copy, "
    "not the device's datasheet figure; a step that mostly reads can stream faster than a copy, and an "
    "implementation with faster arithmetic than the measured matmul (int8) can beat its FLOPs term, so "
    "figures over 100 are possible. % copy bandwidth: the bytes alone over that copy bandwidth."
)
PARITY_NOTE = (
    "Parity: each implementation's last-position logits against transformers eager run in float64 on the "
    "CPU; the limit is the dtype's tolerance (PARITY_TOLERANCE in bench/suite.py) plus twice the error "
    "transformers eager makes itself in the same dtype, measured in this run."
)
LM_HEAD_NOTE = "CTranslate2's embed figures include the LM head: it gives no hidden states."
CTRANSLATE2_INT8_NOTE = (
    "ctranslate2-int8 quantizes each product's input rows to int8 as well as the weights; tritongpt2's int8 "
    "rows are weight-only (activations in the row's dtype). What that costs CTranslate2 in accuracy: "
    "`tritongpt2 audit quantization` (bench/results/quantization-gpt2-float32.md)."
)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def results_stem(document: dict) -> str:
    return f"{slug(document['device'])}-{document['date']}" + ("-quick" if document.get("quick") else "")


def new_results_folder(label: str, now: datetime.datetime | None = None) -> Path:
    """./tritongpt2-results/<label>-<timestamp>: a run never overwrites another's files."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path.cwd() / "tritongpt2-results" / f"{slug(label)}-{stamp}"


def committed_results_folder() -> Path:
    """bench/results of the checkout tritongpt2 runs from; ValueError when it runs from elsewhere."""
    folder = Path(__file__).resolve().parent / "results"
    if not folder.is_dir():
        raise ValueError(f"--update-committed writes into a checkout's bench/results, and {folder} is not one")
    return folder


def _blank_none(value: object) -> str:
    return "" if value is None else str(value)


def _median_cell(record: dict) -> str:
    spread = record.get("spread_ms")
    return f"{record['median_ms']} ({spread[0]}-{spread[1]})" if spread else str(record["median_ms"])


def _speedups_cell(record: dict) -> str:
    spreads = record.get("speedup_spread_vs", {})
    return ", ".join(f"{k} {v}x" + (f" ({spreads[k][0]}-{spreads[k][1]})" if k in spreads else "")
                     for k, v in record.get("speedup_vs", {}).items())


def markdown(document: dict) -> str:
    rounds = document.get("rounds")
    lines = [
        f"Device: {document['device']} · {document['date']} · "
        + ", ".join(f"{k} {v}" for k, v in document["versions"].items()),
        f"Measured peaks: copy {document['peak']['copy_gb_s']} GB/s (read + written), matmul {document['peak']['matmul_tflop_s']} TFLOP/s",
        "",
        f"Each figure is the median of {rounds or 'several'} rounds' medians, with the range of the rounds' medians "
        "(and of the per-round speed-ups) in brackets. seq/context: tokens per row (embed, prefill, generate's "
        "prompt) or the cache context (decode).",
        "",
        "| model | dtype | workload | batch | seq/context | impl | median ms (min-max) | tokens/s | % roofline | % copy bandwidth | speed-up vs baselines |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in document["results"]:
        where = f"| {r['model']} | {r['dtype']} | {r['workload']} | {r['batch']} | {r.get('seq', r.get('context'))} | "
        impl = f"{r['impl']}{' (' + r['note'] + ')' if 'note' in r else ''}"
        if "error" in r:
            lines.append(where + f"{impl} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            where + f"{impl} | {_median_cell(r)} | {r['tokens_per_s']} | {_blank_none(r['roofline_pct'])} | "
            f"{_blank_none(r.get('bandwidth_pct'))} | {_speedups_cell(r)} |"
        )
    lines += ["", ROOFLINE_NOTE]
    if any(r["impl"] == "ctranslate2-int8" for r in document["results"]):
        lines += ["", CTRANSLATE2_INT8_NOTE]
    if document.get("parity"):
        lines += ["", "| parity check | impl | relative error vs float64 | limit | vs hf-eager |", "|---|---|---|---|---|"]
        for c in document["parity"]:
            if "error" in c:
                lines.append(f"| {c['model']} {c['dtype']} | {c['impl']} | failed: {c['error']} | | |")
                continue
            lines.append(f"| {c['model']} {c['dtype']} | {c['impl']} | {c['relative_error_vs_float64']:.2e} | "
                         f"{c['limit']:.2e} | {c['relative_error_vs_hf_eager']:.2e} |")
        lines += ["", PARITY_NOTE]
    return "\n".join(lines) + "\n"


def _workload_label(record: dict) -> str:
    return f"{record['model']} {record['dtype']} {record['workload']} {record['batch']}x{record.get('seq', record.get('context'))}"


def _size_explained(record: dict) -> str:
    what = "cache context" if record["workload"] == "decode" else "prompt tokens" if record["workload"] == "generate" else "tokens"
    return f"{record['batch']}x{record.get('seq', record.get('context'))} = batch x {what}"


def chart_figure(document: dict) -> Figure:
    """Median ms per implementation, one panel per workload, each on its own linear axis from zero,
    with the value on every bar and the range of the rounds' medians as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in document["results"] if "error" not in r]
    labels = sorted({_workload_label(r) for r in timed})
    impls = sorted({r["impl"] for r in timed})
    by_key = {(_workload_label(r), r["impl"]): r for r in timed}
    columns = min(3, len(labels)) or 1
    rows = math.ceil(len(labels) / columns) or 1
    height = 3.4 * rows + 1.2
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, height), squeeze=False)
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    for axis, label in zip(axes.flat, labels):
        present = [impl for impl in impls if (label, impl) in by_key]
        records = [by_key[(label, impl)] for impl in present]
        medians = [r["median_ms"] for r in records]
        low = [r["median_ms"] - r.get("spread_ms", [r["median_ms"]] * 2)[0] for r in records]
        high = [r.get("spread_ms", [r["median_ms"]] * 2)[1] - r["median_ms"] for r in records]
        bars = axis.bar(range(len(present)), medians, color=[colors[i] for i in present], yerr=[low, high], capsize=3)
        axis.bar_label(bars, labels=[f"{m:.3g}" for m in medians], fontsize=7, padding=2)
        axis.set_xticks(range(len(present)), [i + ("*" if "note" in by_key[(label, i)] else "") for i in present],
                        rotation=30, ha="right", fontsize=7)
        axis.set_title(label, fontsize=9)
        axis.set_xlabel(_size_explained(records[0]), fontsize=8)
        axis.set_ylabel("median ms (lower is better)", fontsize=8)
        axis.set_ylim(0, max(m + h for m, h in zip(medians, high)) * 1.2)
    for axis in list(axes.flat)[len(labels):]:
        axis.set_visible(False)
    figure.suptitle(f"tritongpt2 and its baselines on {document['device']}")
    notes = ["Bars: median ms of the rounds' medians, on a linear axis from zero; error bars: the range of the rounds' medians."]
    if any("note" in r for r in timed):
        notes.append("* " + LM_HEAD_NOTE)
    figure.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom")
    figure.tight_layout(rect=(0, (0.15 * len(notes) + 0.4) / height, 1, 1))
    return figure


def chart(document: dict, path: Path) -> bool:
    """Write the chart as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure = chart_figure(document)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_results(document: dict, folder: Path, *, with_chart: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = results_stem(document)
    written = [folder / f"{stem}.json", folder / f"{stem}.md"]
    for path, text in zip(written, (json.dumps(document, indent=1) + "\n", markdown(document))):
        # Written whole, then renamed over the last one: a run stopped mid-write (a GPU loan's time
        # limit) leaves the previous complete file, never half of one.
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
    if not with_chart:
        return written
    if chart(document, folder / f"{stem}.png"):
        written.append(folder / f"{stem}.png")
    else:
        print("matplotlib is not installed: no chart (pip install tritongpt2[bench])", file=sys.stderr)
    return written
