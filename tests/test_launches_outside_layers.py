"""The work a decode step launches outside the transformer layers, counted as transformers users call
it (`model(input_ids=next_id, past_key_values=...)`): every kernel launch and every aten op that runs
on a device (views excepted; host reads counted, each is a device synchronisation). On a GPU each is a
launch of its own, and at decode sizes launches, not bytes, are what such small work costs.

Counted at one and two layers: the difference is a layer's work, the rest is outside the layers."""

from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tritongpt2
from checkpoints import save_model
from numerics import BACKEND, on
from tritongpt2.engine.engine import Engine
from tritongpt2.kernels.launch import VIEW_OPS, observing_launches

transformers = pytest.importorskip("transformers")
MOST_OUTSIDE = 8
# The range check of the caller's ids (one reduction, two host reads), the embedding with the cache's
# bookkeeping, the LM head (with ln_f).
DROP_IN_OUTSIDE = Counter({"aten.aminmax": 1, "aten._local_scalar_dense": 2, "embedding_kernel": 1, "split_linear_kernel": 1})
# Tokens the engine sampled itself are not checked.
ENGINE_OUTSIDE = Counter({"embedding_kernel": 1, "split_linear_kernel": 1})


class DeviceWork(TorchDispatchMode):
    """Kernel launches and the aten ops outside them that do work, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.work: Counter = Counter()
        self._in_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        if not self._in_kernel and name not in VIEW_OPS:
            self.work[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def launch(self, record):
        self.work[record.name] += 1
        self._in_kernel = True
        try:
            yield
        finally:
            self._in_kernel = False


def counted(step) -> Counter:
    counter = DeviceWork()
    with observing_launches(counter.launch), counter:
        step()
    return counter.work


def drop_in_decode_work(model, prompt) -> Counter:
    """The work of the second decode step after a prompt (the first makes what is made once)."""
    with torch.no_grad():
        out = model(input_ids=prompt)
        next_id = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=next_id, past_key_values=out.past_key_values)
        return counted(lambda: model(input_ids=next_id, past_key_values=out.past_key_values))


def native(folder, layers):
    save_model(folder, n_layer=layers)
    return tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend=BACKEND)


def accelerated(folder, layers):
    _, model = save_model(folder, n_layer=layers)
    return tritongpt2.accelerate(on(BACKEND, model), backend=BACKEND)


# A decode layer: c_attn, attention (which merges its own splits), c_proj, the MLP in one launch.
LAYER = Counter({"split_linear_kernel": 2, "decode_attention_kernel": 1, "decode_mlp_kernel": 1})


def outside_layers(work_of) -> Counter:
    one, two = work_of(1), work_of(2)
    layer = two - one
    assert layer == LAYER and not one - two
    return one - layer


@pytest.mark.parametrize("make", [native, accelerated])
def test_a_drop_in_decode_step_launches_little_outside_the_layers(tmp_path, make):
    prompt = on(BACKEND, torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(0)))
    outside = outside_layers(lambda layers: drop_in_decode_work(make(tmp_path / str(layers), layers), prompt))
    assert sum(outside.values()) <= MOST_OUTSIDE, outside
    assert outside == DROP_IN_OUTSIDE, "more work outside the layers than before: is it needed every step?"


def test_the_engine_loop_decode_launches_only_the_embedding_and_the_head(tmp_path):
    prompt = on(BACKEND, torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1)))

    def work(layers):
        folder, _ = save_model(tmp_path / str(layers), n_layer=layers)
        engine = Engine.from_pretrained(folder, backend=BACKEND, cuda_graphs=False)  # launches, not a replay
        tokens = engine.prefill(prompt).logits.argmax(-1)
        tokens = engine.decode(tokens, check_ids=False).logits.argmax(-1)
        return counted(lambda: engine.decode(tokens, check_ids=False))

    assert outside_layers(work) == ENGINE_OUTSIDE
