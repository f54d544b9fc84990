"""What can be checked of graph mode without a GPU: the captured step never reads a device value on
the host and takes its shapes from the bucket, and the graph runner feeds and reads the right
buffers (over a CPU stand-in whose replay re-runs the recorded step on the static buffers)."""

from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from checkpoints import save_model
from numerics import BACKEND, OPS, on, relative_error
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.forward import gpt2_step
from tritongpt2.engine import graphs
from tritongpt2.engine.graphs import EagerGraphs, bucket
from tritongpt2.engine.options import EngineOptions
from tritongpt2.kernels.launch import VIEW_OPS, recording_launches

pytest.importorskip("transformers")

HOST_READS = ("item", "tolist", "__bool__", "cpu", "numpy", "__int__", "__float__", "__index__")


@contextmanager
def host_reads_forbidden():
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def forbid(name):
        def raise_(*args, **kwargs):
            raise RuntimeError(f"Tensor.{name} inside a step that must be capturable")

        return raise_

    for name in HOST_READS:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("graphs"))


def step_inputs(batch, seq, seed, backend="torch"):
    """(ids, mask, the new-token count) on the backend's device."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (batch, seq), generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.3).to(torch.int32)
    mask[:, -1] = 1
    return on(backend, (ids, mask, torch.full((1,), seq, dtype=torch.int64)))


def recorded_step(engine, ids, mask, new, **options):
    with recording_launches() as records:
        gpt2_step(OPS, engine.config, engine.weights, engine.cache, ids, mask, new, **options)
    return records


def launch_shapes(records):
    def describe(arg):
        return ("tensor", tuple(arg.shape), arg.dtype) if isinstance(arg, torch.Tensor) else arg

    return [(r.kernel, r.grid, {k: describe(a) for k, a in r.arguments.items()}, r.num_warps) for r in records]


@pytest.mark.parametrize("seq", [1, 6])
def test_kernel_step_never_reads_the_device_and_takes_shapes_from_the_bucket(checkpoint, seq):
    engine = Engine.from_pretrained(checkpoint[0], backend=BACKEND)
    with host_reads_forbidden():
        first = recorded_step(engine, *step_inputs(4, seq, seed=1, backend=BACKEND), logits="last", hidden=True)
        engine.cache.lengths[:4] += 7  # other data, other cache state: the same launches
        second = recorded_step(engine, *step_inputs(4, seq, seed=2, backend=BACKEND), logits="last", hidden=True)
    assert first and launch_shapes(first) == launch_shapes(second)


def eager_and_graphed(folder, backend="torch"):
    eager = Engine.from_pretrained(folder, backend=backend, max_batch=4, max_seq=40)
    capture = EagerGraphs()
    graphed = Engine(eager.config, eager.weights, EngineOptions(backend=backend, max_batch=4, max_seq=40), graph_capture=capture)
    return eager, graphed, capture


def test_replays_give_fresh_correct_outputs_and_reuse_buffers(checkpoint):
    eager, graphed, capture = eager_and_graphed(checkpoint[0])
    buffers = {}
    for seed in range(3):
        ids, mask, _ = step_inputs(3, 5, seed)
        expected, got = eager.prefill(ids, mask, logits="all"), graphed.prefill(ids, mask, logits="all")
        assert relative_error(got.logits, expected.logits) < 1e-6
        tokens = expected.logits[:, -1].argmax(-1)
        for _ in range(3):
            expected, got = eager.decode(tokens), graphed.decode(tokens)
            assert relative_error(got.logits, expected.logits) < 1e-6
            tokens = expected.logits.argmax(-1)
        assert [key[:2] for key in graphed.graphs.keys()] == [(4, 16), (4, 1)], "buckets: 3 rows -> 4, 5 tokens -> 16"
        for key in graphed.graphs.keys():
            inputs = graphed.graphs.static_inputs(key)
            ptrs = {name: t.data_ptr() for name, t in inputs.items()}
            assert buffers.setdefault(key, ptrs) == ptrs, "a bucket's static buffers were reallocated"
    assert capture.captures == 2 == len(graphed.graphs), "one capture per bucket, reused after"


def test_outputs_handed_out_are_not_the_graph_buffers(checkpoint):
    _, graphed, _ = eager_and_graphed(checkpoint[0])
    ids, mask, _ = step_inputs(2, 5, seed=0)
    first = graphed.prefill(ids, mask).logits
    kept = first.clone()
    graphed.prefill(*step_inputs(2, 5, seed=1)[:2])
    assert torch.equal(first, kept)


def test_a_request_larger_than_any_bucket_is_a_clear_error(checkpoint):
    _, graphed, capture = eager_and_graphed(checkpoint[0])
    with pytest.raises(ValueError, match="batch 5 is larger than the cache's max_batch=4"):
        graphed.prefill(*step_inputs(5, 3, seed=0)[:2])
    with pytest.raises(ValueError, match="41 new tokens after 0 cached ones exceed the cache's max_seq=40"):
        graphed.prefill(*step_inputs(1, 41, seed=0)[:2])
    assert capture.captures == 0
    assert bucket(3, 8) == 4 and bucket(5, 6) == 6 and bucket(1, 40, smallest=16) == 16
    with pytest.raises(ValueError, match="larger than the largest bucket, 8"):
        bucket(9, 8)


def test_padding_that_would_overrun_the_cache_captures_the_exact_length(checkpoint):
    eager, graphed, _ = eager_and_graphed(checkpoint[0])
    ids, mask, _ = step_inputs(1, 30, seed=4)
    for engine in (eager, graphed):
        engine.prefill(ids, mask)
    more, more_mask, _ = step_inputs(1, 9, seed=5)
    expected = eager.prefill(more, more_mask, reset=False, logits="all").logits
    got = graphed.prefill(more, more_mask, reset=False, logits="all").logits
    assert relative_error(got, expected) < 1e-6
    assert [key[:2] for key in graphed.graphs.keys()] == [(1, 32), (1, 9)]


def test_kernels_under_graph_runner(checkpoint):
    eager, graphed, _ = eager_and_graphed(checkpoint[0], backend=BACKEND)
    ids, mask, _ = step_inputs(2, 4, seed=6, backend=BACKEND)
    for _ in range(2):
        expected, got = eager.prefill(ids, mask), graphed.prefill(ids, mask)
        assert relative_error(got.logits, expected.logits) < 1e-6
        tokens = expected.logits.argmax(-1)
        assert relative_error(graphed.decode(tokens).logits, eager.decode(tokens).logits) < 1e-6


def test_graphs_are_refused_on_cpu_backends(checkpoint):
    with pytest.raises(ValueError, match="CUDA graphs need a backend that can capture them"):
        Engine.from_pretrained(checkpoint[0], backend="torch", cuda_graphs=True)


class OpsOutsideReplay(TorchDispatchMode):
    """Counts the aten ops that run outside a graph replay: on a GPU, each that is not a view is a
    launch of its own, in front of the graph's."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.ops, self.replaying = Counter(), False
        replay = graphs._EagerGraph.replay

        def counted_replay(graph):
            self.replaying = True
            try:
                replay(graph)
            finally:
                self.replaying = False

        monkeypatch.setattr(graphs._EagerGraph, "replay", counted_replay)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.replaying and name.rstrip("_") not in VIEW_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def test_a_replayed_decode_copies_only_its_token_ids(checkpoint, monkeypatch):
    eager, graphed, _ = eager_and_graphed(checkpoint[0])
    ids, mask, _ = step_inputs(3, 5, seed=7)
    tokens = graphed.prefill(ids, mask).logits.argmax(-1)
    eager.prefill(ids, mask)
    graphed.decode(tokens, check_ids=False)
    eager.decode(tokens, check_ids=False)
    counter = OpsOutsideReplay(monkeypatch)
    with counter:
        got = graphed.decode(tokens, check_ids=False).logits
    assert counter.ops == Counter({"copy_": 1, "clone": 1}), "the ids in, the logits out; the mask and count stay"
    assert relative_error(got, eager.decode(tokens, check_ids=False).logits) < 1e-6


def test_buffers_refilled_when_the_batch_or_the_mask_changes_in_a_bucket(checkpoint):
    # Batches of 4 and then 3 rows, prompts of 5 and then 3 tokens, share the (4, 16) prefill and
    # (4, 1) decode buckets: what the earlier call wrote past the later one's corner must be
    # padding again. A one-token prefill shares the decode bucket with a mask that is not all ones:
    # the next decode must not find that mask in the buffer.
    eager, graphed, _ = eager_and_graphed(checkpoint[0])
    for batch, seq, seed in ((4, 5, 8), (3, 3, 9)):
        ids, mask, _ = step_inputs(batch, seq, seed)
        expected, got = eager.prefill(ids, mask).logits, graphed.prefill(ids, mask).logits
        assert relative_error(got, expected) < 1e-6
        tokens = torch.arange(batch) + 11
        for _ in range(2):
            assert relative_error(graphed.decode(tokens).logits, eager.decode(tokens).logits) < 1e-6
        decode_buffers = graphed.graphs.static_inputs((4, 1, ("attention_mask", "input_ids", "new_tokens"), "last", False))
        assert not decode_buffers["attention_mask"][batch:].any() and not decode_buffers["input_ids"][batch:].any()
        one, one_mask = tokens[:, None] + 1, torch.ones(batch, 1, dtype=torch.int32)
        one_mask[0] = 0
        expected = eager.prefill(one, one_mask, reset=False).logits
        got = graphed.prefill(one, one_mask, reset=False).logits
        assert relative_error(got[1:], expected[1:]) < 1e-6
        assert relative_error(graphed.decode(tokens).logits, eager.decode(tokens).logits) < 1e-6
    assert [key[:2] for key in graphed.graphs.keys()] == [(4, 16), (4, 1)]


def test_slot_numbered_and_mask_numbered_steps_do_not_share_a_graph(checkpoint):
    # Over a padded prompt the two numberings differ, so a graph of one replayed for the other would be wrong.
    eager, graphed, capture = eager_and_graphed(checkpoint[0])
    ids, mask, _ = step_inputs(2, 5, seed=10)
    for slot_positions in (True, False, True):
        expected = eager.prefill(ids, mask, slot_positions=slot_positions, logits="all").logits
        got = graphed.prefill(ids, mask, slot_positions=slot_positions, logits="all").logits
        assert relative_error(got, expected) < 1e-6
        token = expected[:, -1:].argmax(-1)
        expected = eager.prefill(token, reset=False, slot_positions=slot_positions).logits
        got = graphed.prefill(token, reset=False, slot_positions=slot_positions).logits
        assert relative_error(got, expected) < 1e-6
    assert capture.captures == 4, "a prefill and a one-token step, each numbered both ways"
