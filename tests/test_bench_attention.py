"""Each transformers baseline runs the attention it is named after, on every workload, whichever
runner was made last: spies on the functions transformers dispatches to count who calls what."""

import pytest
import torch

from tritongpt2.bench.runners import KINDS, HFCompiledStaticRunner, HFRunner
from tritongpt2.bench.suite import QUICK_SHAPE, build_model

pytest.importorskip("transformers")
from transformers.models.gpt2 import modeling_gpt2  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402


@pytest.fixture
def attention_calls(monkeypatch):
    calls = []
    eager, sdpa = modeling_gpt2.eager_attention_forward, ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(name, function):
        def counted(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(modeling_gpt2, "eager_attention_forward", spy("eager", eager))
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", spy("sdpa", sdpa))
    return calls


def run(runner, kind):
    ids = torch.randint(0, QUICK_SHAPE.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    if kind == "embed":
        runner.embed(ids)
    elif kind == "prefill":
        runner.prefill(ids)
    elif kind == "decode":
        runner.decode_step(ids, 16)()
    else:
        runner.generate(ids[:1], 3)


@pytest.mark.parametrize("order", [("eager", "sdpa"), ("sdpa", "eager")])
def test_hf_eager_runs_eager_and_hf_sdpa_runs_sdpa_in_any_build_order(attention_calls, order):
    model = build_model(QUICK_SHAPE, torch.float32, torch.device("cpu"))
    runners = {attention: HFRunner(model, attention) for attention in order}
    for kind in KINDS:
        for attention, runner in runners.items():
            attention_calls.clear()
            run(runner, kind)
            assert attention_calls and set(attention_calls) == {attention}, (runner.name, kind, attention_calls)


def test_the_compiled_baseline_runs_sdpa(attention_calls):
    model = build_model(QUICK_SHAPE, torch.float32, torch.device("cpu"))
    compiled = HFCompiledStaticRunner(model, backend="eager")
    HFRunner(model, "eager")  # made after it, as the suite makes runners
    for kind in compiled.kinds:
        attention_calls.clear()
        run(compiled, kind)
        assert attention_calls and set(attention_calls) == {"sdpa"}, (kind, attention_calls)
