"""The torch backend's decode step, called as transformers users call it, runs few aten ops: on a CPU
each one costs microseconds of dispatch, so their number bounds the step's overhead."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tritongpt2
from checkpoints import save_model
from tritongpt2.kernels.launch import VIEW_OPS

pytest.importorskip("transformers")
# gpt2's 12 layers and widths; a smaller vocabulary keeps the test quick (the LM head is one matmul whatever its size).
GPT2_LAYERS = dict(n_embd=768, n_head=12, n_layer=12, n_inner=None, n_positions=1024, vocab_size=4096)
MOST_OPS = 200


class WorkOps(TorchDispatchMode):
    """The aten ops that do work (views and metadata excluded), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.rstrip("_") not in VIEW_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def test_a_gpt2_decode_step_through_the_drop_in_api_runs_under_200_ops(tmp_path):
    save_model(tmp_path, **GPT2_LAYERS)
    model = tritongpt2.GPT2LMHeadModel.from_pretrained(tmp_path, backend="torch")
    prompt = torch.randint(0, GPT2_LAYERS["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=prompt)
        next_id = out.logits[:, -1:].argmax(-1)
        model(input_ids=next_id, past_key_values=out.past_key_values)
        counter = WorkOps()
        with counter:
            model(input_ids=next_id, past_key_values=out.past_key_values)
    total = sum(counter.ops.values())
    assert total < MOST_OPS, counter.ops.most_common()
    # Per layer: two LayerNorms, four matmuls, the K and V stores, attention, the activation.
    assert counter.ops["native_layer_norm"] == 2 * 12 + 1 and counter.ops["gelu"] == 12


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantized_bfloat16_decode_step_stays_under_250_ops(tmp_path, fmt):
    # The native bfloat16 kernels (kernels/cpu_quantized.py): one op a product, the bias added in
    # bfloat16, no casts around LayerNorm or attention. About 227 against float32's 171.
    from tritongpt2.engine.config import GPT2Config
    from tritongpt2.engine.engine import Engine
    from tritongpt2.engine.options import EngineOptions
    from tritongpt2.engine.quantize import Quantization, quantize_weights
    from tritongpt2.engine.weights import shared_weights

    _, model = save_model(tmp_path, **GPT2_LAYERS)
    model = model.to(torch.bfloat16)
    config = GPT2Config.from_dict(model.config.to_dict())
    weights = quantize_weights(shared_weights(model, config), config, Quantization(fmt))
    engine = Engine(config, weights, EngineOptions(backend="torch", cuda_graphs=False, max_batch=1, max_seq=80))
    prompt = torch.randint(0, GPT2_LAYERS["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    engine.prefill(prompt, logits=None)
    token = prompt[:, -1]
    engine.decode(token)
    counter = WorkOps()
    with counter:
        engine.decode(token)
    assert sum(counter.ops.values()) < 250, counter.ops.most_common()
    assert counter.ops["_to_copy"] < 10, counter.ops.most_common()
