"""Checks that need a CUDA GPU: graph replays against the eager kernels, float16 and bfloat16 parity
with transformers. Skipped without one (the CPU stand-ins are in test_graphs and test_engine)."""

import copy

import pytest
import torch

from checkpoints import save_model
from numerics import assert_close, relative_error
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.generation import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("gpu"), n_layer=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_replays_match_the_eager_kernels(checkpoint, dtype, monkeypatch):
    pools = []
    capture_graph = torch.cuda.graph

    def recording_graph(graph, pool=None, **kwargs):
        pools.append(pool)
        return capture_graph(graph, pool=pool, **kwargs)

    monkeypatch.setattr(torch.cuda, "graph", recording_graph)
    folder, model = checkpoint
    eager = Engine.from_pretrained(folder, dtype=dtype, backend="triton", cuda_graphs=False, max_batch=4)
    graphed = Engine.from_pretrained(folder, dtype=dtype, backend="triton", max_batch=4)
    oracle_model = copy.deepcopy(model).to(device="cuda", dtype=torch.float32)

    @torch.no_grad()
    def oracle(ids: torch.Tensor) -> torch.Tensor:
        return oracle_model(input_ids=ids).logits.double()  # the whole sequence, in float32, no cache

    # A graph runs a prefill padded up to its bucket, where a matmul may take other tiles (other MMA
    # instructions) than at the exact shape: not bit-equal to the eager kernels, but no further from
    # the float32 oracle than the tolerance plus twice the eager kernels' own error.
    for seed in range(3):
        ids = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(seed)).cuda()
        expected, got = eager.prefill(ids, logits="all"), graphed.prefill(ids, logits="all")
        assert_close(got.logits, oracle(ids), same_dtype=expected.logits)
        tokens = expected.logits[:, -1].argmax(-1)
        for _ in range(4):
            ids = torch.cat([ids, tokens[:, None]], dim=1)
            expected, got = eager.decode(tokens), graphed.decode(tokens)
            assert_close(got.logits, oracle(ids)[:, -1], same_dtype=expected.logits)
            tokens = expected.logits.argmax(-1)
    assert len(graphed.graphs) == 2
    assert len(pools) == 2 and pools[0] is not None and pools[0] == pools[1], "every graph must share one pool"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parity_with_transformers(checkpoint, dtype):
    folder, model = checkpoint
    model = copy.deepcopy(model).to(device="cuda", dtype=dtype)  # a copy: Module.to converts in place
    engine = Engine.from_pretrained(folder, dtype=dtype, backend="triton")
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    got = engine.prefill(ids, mask, logits="all").logits
    assert relative_error(got[mask.bool()], expected[mask.bool()]) < TOLERANCE[dtype]


def test_float32_greedy_generation_on_the_gpu(checkpoint):
    folder, model = checkpoint
    model = copy.deepcopy(model).to(device="cuda", dtype=torch.float32)
    engine = Engine.from_pretrained(folder, backend="triton")
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(engine, ids, max_new_tokens=12, eos_token_id=[]), expected.cpu())
