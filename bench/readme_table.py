"""README's GPU table, rendered from a benchmark results JSON into README.md between its markers:

    python -m tritongpt2.bench.readme_table RESULTS.json [README.md]

One row per model, dtype and workload, one column per implementation: median ms with the range of
the rounds' medians. The lines above the table name the device, the date, the versions and the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"


def _size(record: dict) -> str:
    if record["workload"] == "decode":
        return f"decode, batch {record['batch']}, context {record['context']}"
    return f"{record['workload']} {record['batch']} x {record['seq']}"


def _cell(record: dict | None) -> str:
    if record is None:
        return ""
    if "error" in record:
        return "failed"
    spread = record.get("spread_ms")
    text = f"{record['median_ms']:.3g}" + (f" ({spread[0]:.3g}-{spread[1]:.3g})" if spread else "")
    return f"**{text}**" if record["impl"] == "tritongpt2" else text


def render(document: dict, source: str) -> str:
    """The markdown that goes between the markers."""
    impls = list(dict.fromkeys(r["impl"] for r in document["results"]))
    rows: dict[tuple, dict[str, dict]] = {}
    for r in document["results"]:
        rows.setdefault((r["model"], r["dtype"], _size(r)), {})[r["impl"]] = r
    versions = ", ".join(f"{k} {v}" for k, v in document["versions"].items())
    lines = [
        f"Measured on **{document['device']}** on {document['date']} ({versions}); `{source}`. Median ms over "
        f"{document.get('rounds', 'several')} rounds, lower is better, with the range of the rounds' medians; "
        f"measured copy bandwidth {document['peak']['copy_gb_s']} GB/s, matmul {document['peak']['matmul_tflop_s']} TFLOP/s.",
        "",
        "| model | dtype | workload | " + " | ".join(impls) + " |",
        "|---|---|---|" + "---|" * len(impls),
    ]
    for (model, dtype, size), by_impl in rows.items():
        lines.append(f"| {model} | {dtype} | {size} | " + " | ".join(_cell(by_impl.get(i)) for i in impls) + " |")
    return "\n".join(lines)


def replace_between_markers(text: str, table: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {START} ... {END} markers to write the GPU table between")
    return text[: start + len(START)] + "\n" + table + "\n" + text[end:]


def update_readme(results: Path, readme: Path) -> None:
    document = json.loads(results.read_text())
    readme.write_text(replace_between_markers(readme.read_text(), render(document, results.name)))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m tritongpt2.bench.readme_table RESULTS.json [README.md]")
    update_readme(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) == 3 else "README.md"))
