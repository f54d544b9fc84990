"""What a benchmark run shows: the chart (linear axes, values on the bars, sizes and caveats
explained, the spread), the markdown (spread, error rows, what % roofline is measured against), the
progress lines, and transformers kept quiet."""

import io
import warnings

import pytest

from tritongpt2.bench.progress import Progress
from tritongpt2.bench.quiet import quiet_transformers
from tritongpt2.bench.report import chart_figure, markdown
from tritongpt2.bench.suite import add_ratios


def record(workload: str, impl: str, rounds_ms: list[float], **extra) -> dict:
    size = {"context": 128} if workload == "decode" else {"seq": 16}
    ms = sorted(rounds_ms)[len(rounds_ms) // 2]
    return {"model": "gpt2", "dtype": "float32", "workload": workload, "batch": 1, **size, "impl": impl,
            "median_ms": ms, "spread_ms": [min(rounds_ms), max(rounds_ms)], "rounds_ms": rounds_ms,
            "tokens_per_s": 1.0, "roofline_pct": 120.0, "bandwidth_pct": 50.0, **extra}


@pytest.fixture
def document() -> dict:
    results = [
        record("embed", "hf-eager", [26.0, 30.0, 28.0]), record("embed", "tritongpt2", [25.0, 27.0, 26.0]),
        record("embed", "ctranslate2-float32", [20.0, 21.0, 22.0], note="includes the LM head: CTranslate2 gives no hidden states"),
        record("decode", "hf-eager", [31.0, 33.0, 37.0]), record("decode", "tritongpt2", [30.0, 31.0, 35.0]),
        {"model": "gpt2", "dtype": "float32", "workload": "decode", "batch": 1, "context": 128, "impl": "hf-sdpa",
         "error": "RuntimeError: out of memory"},
    ]
    add_ratios(results)
    return {"device": "CPU test", "date": "2026-01-01", "versions": {"torch": "2"}, "rounds": 3,
            "peak": {"copy_gb_s": 25.0, "matmul_tflop_s": 0.2}, "parity": [], "results": results}


def test_chart_is_linear_with_values_sizes_spread_and_caveats(document):
    BarContainer = pytest.importorskip("matplotlib.container").BarContainer
    figure = chart_figure(document)
    axes = [axis for axis in figure.axes if axis.get_visible()]
    assert len(axes) == 2  # one panel per workload
    for axis in axes:
        assert axis.get_yscale() == "linear" and axis.get_ylim()[0] == 0
        assert "batch x" in axis.get_xlabel()
        values = {text.get_text() for text in axis.texts}
        assert values and all(v.replace(".", "").isdigit() for v in values)
        [bars] = [c for c in axis.containers if isinstance(c, BarContainer)]
        assert bars.errorbar is not None  # the rounds' range
    decode = next(a for a in axes if "decode" in a.get_title())
    assert "cache context" in decode.get_xlabel() and {t.get_text() for t in decode.texts} == {"31", "33"}
    notes = " ".join(text.get_text() for text in figure.texts)
    assert "include the LM head" in notes and "linear" in notes
    pytest.importorskip("matplotlib.pyplot").close(figure)


def test_markdown_shows_spread_errors_and_what_roofline_is_against(document):
    text = markdown(document)
    assert "| 28.0 (26.0-30.0) |" in text
    assert "hf-eager 1.08x (1.04-1.11)" in text  # per-round ratios: 26/25, 30/27, 28/26
    assert "| hf-sdpa | failed: RuntimeError: out of memory |" in text
    assert "copy bandwidth measured in this run" in text and "over 100" in text
    assert "ctranslate2-int8" not in text


def test_markdown_says_ctranslate2_int8_quantizes_activations(document):
    document["results"].append(record("decode", "ctranslate2-int8", [14.0, 15.0, 16.0]))
    assert "ctranslate2-int8 quantizes each product's input rows to int8" in markdown(document)


def test_progress_says_what_runs_and_the_time_left():
    now = [0.0]
    out = io.StringIO()
    progress = Progress(4, stream=out, clock=lambda: now[0])
    progress.show("gpt2 float16 decode 64x1024 · hf-eager · round 1/3")
    now[0] = 90.0
    progress.advance()
    progress.show("gpt2 float16 decode 64x1024 · tritongpt2 · round 2/3")
    first, second = out.getvalue().splitlines()
    assert first.startswith("[0/4] gpt2 float16 decode 64x1024 · hf-eager")
    assert second.endswith("1m30s elapsed, about 4m30s left")
    with pytest.raises(ValueError, match="total=0"):
        Progress(0)


def test_transformers_is_quiet_inside_the_bench_only():
    from transformers.utils import logging

    logger = logging.get_logger("transformers.models.gpt2")
    before = logging.get_verbosity(), logging.is_progress_bar_enabled()
    with quiet_transformers(), warnings.catch_warnings(record=True) as caught:
        assert not logging.is_progress_bar_enabled()
        assert not logger.isEnabledFor(logging.WARNING)
        warnings.warn_explicit("noise", UserWarning, "modeling_gpt2.py", 1, module="transformers.models.gpt2")
    assert caught == []
    assert (logging.get_verbosity(), logging.is_progress_bar_enabled()) == before
