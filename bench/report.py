"""Writing a benchmark run: JSON, a markdown table and a PNG chart, named by device and date."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def results_stem(document: dict) -> str:
    device = re.sub(r"[^A-Za-z0-9]+", "-", document["device"]).strip("-")
    return f"{device}-{document['date']}" + ("-quick" if document.get("quick") else "")


def _blank_none(value: object) -> str:
    return "" if value is None else str(value)


def markdown(document: dict) -> str:
    lines = [
        f"Device: {document['device']} · {document['date']} · "
        + ", ".join(f"{k} {v}" for k, v in document["versions"].items()),
        f"Measured peaks: copy {document['peak']['copy_gb_s']} GB/s, matmul {document['peak']['matmul_tflop_s']} TFLOP/s",
        "",
        "| model | dtype | workload | batch | seq/context | impl | median ms | tokens/s | % roofline | % copy bandwidth | speed-up vs baselines |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in document["results"]:
        speedups = ", ".join(f"{k} {v}x" for k, v in r.get("speedup_vs", {}).items())
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['workload']} | {r['batch']} | {r.get('seq', r.get('context'))} | "
            f"{r['impl']}{' (' + r['note'] + ')' if 'note' in r else ''} | {r['median_ms']} | {r['tokens_per_s']} | {_blank_none(r['roofline_pct'])} | {_blank_none(r.get('bandwidth_pct'))} | {speedups} |"
        )
    if document.get("parity"):
        lines += ["", "| parity check | impl | relative error vs hf-eager |", "|---|---|---|"]
        lines += [f"| {c['model']} {c['dtype']} | {c['impl']} | {c['relative_error_vs_hf_eager']:.2e} |" for c in document["parity"]]
    return "\n".join(lines) + "\n"


def _workload_label(record: dict) -> str:
    return f"{record['model']} {record['dtype']} {record['workload']} {record['batch']}x{record.get('seq', record.get('context'))}"


def chart(document: dict, path: Path) -> bool:
    """A bar chart of median ms per workload and implementation; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    median_ms = {(_workload_label(r), r["impl"]): r["median_ms"] for r in document["results"]}
    labels = sorted({label for label, _ in median_ms})
    impls = sorted({impl for _, impl in median_ms})
    figure, axis = plt.subplots(figsize=(max(8, len(labels) * 0.9), 5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        values = [median_ms.get((label, impl), 0) for label in labels]
        axis.bar([x + i * width for x in range(len(labels))], values, width, label=impl)
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=45, ha="right", fontsize=7)
    axis.set_ylabel("median ms (lower is better)")
    axis.set_yscale("log")
    axis.set_title(f"tritongpt2 and its baselines on {document['device']}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_results(document: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = results_stem(document)
    written = [folder / f"{stem}.json", folder / f"{stem}.md"]
    written[0].write_text(json.dumps(document, indent=1) + "\n")
    written[1].write_text(markdown(document))
    if chart(document, folder / f"{stem}.png"):
        written.append(folder / f"{stem}.png")
    else:
        print("matplotlib is not installed: no chart (pip install tritongpt2[bench])", file=sys.stderr)
    return written
