"""Memory traffic of one step, counted under Triton's interpreter, against the ideal and transformers.

Ours: every interpreted tl.load / tl.store of every kernel launch, in bytes, masked-off lanes counted
as nothing (loads repeated by several programs count each time, so this is an upper bound on DRAM
traffic that L2 would partly absorb), plus the small torch ops of the step. Beside it, the distinct
bytes: each launch's loads and stores counted once per address (per element size), the DRAM traffic
if L2 served every repeat within a launch, a lower bound; the torch ops count the same in both.
Transformers: the bytes each aten op of its forward reads and writes, through a TorchDispatchMode;
ops that only make views move nothing, and a gather (the embedding) reads the rows it gathers, not
the table. The step runs at the real per-layer shapes with 2 layers (ours: the counts as the forward
enters and leaves each layer mark its work; every layer after the first moves the same bytes in the
same launches, the first reads the embedding's output a little differently) or with 1 and 2 layers
(transformers: the difference is one layer), scaled to full depth by the second layer's count.
With a quantization, ours runs the engine's quantized weights against the ideal of that format
(transformers, which has no such format of its own here, is not run).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tritongpt2.engine.quantize import Quantization
from tritongpt2.kernels.launch import VIEW_OPS, LaunchRecord, observing_launches, recording_launches

from .ideal import ideal_bytes
from .model_shapes import ModelShape
from .runners import cache_keyword
from .suite import build_model

WORKLOADS = ("decode", "prefill", "embed")
GATHER_OPS = {"embedding", "index_select", "index"}


# Kernels that read a few rows, not a weight or the KV cache: their program count does not decide
# how much of the GPU streams memory.
ROW_KERNELS = {"embedding_kernel", "layer_norm_kernel"}


@dataclass
class StepTraffic:
    bytes: int = 0
    distinct_bytes: int = 0
    launches: int = 0
    per_kernel: dict[str, int] = field(default_factory=dict)
    fewest_programs: dict[str, int] = field(default_factory=dict)  # per Triton kernel, over its launches

    def snapshot(self) -> StepTraffic:
        return StepTraffic(self.bytes, self.distinct_bytes, self.launches, dict(self.per_kernel), dict(self.fewest_programs))

    def since(self, earlier: StepTraffic) -> StepTraffic:
        """This count less `earlier`: a snapshot taken on the way, or the same step with a layer fewer.
        Its fewest_programs is this count's."""
        per_kernel = {k: v - earlier.per_kernel.get(k, 0) for k, v in self.per_kernel.items() if v != earlier.per_kernel.get(k, 0)}
        return StepTraffic(self.bytes - earlier.bytes, self.distinct_bytes - earlier.distinct_bytes,
                           self.launches - earlier.launches, per_kernel, dict(self.fewest_programs))

    def add(self, name: str, nbytes: int, programs: int | None = None, distinct: int | None = None) -> None:
        self.bytes += nbytes
        self.distinct_bytes += nbytes if distinct is None else distinct
        self.launches += 1
        self.per_kernel[name] = self.per_kernel.get(name, 0) + nbytes
        if programs is not None:
            self.fewest_programs[name] = min(programs, self.fewest_programs.get(name, programs))


def _tensor_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class AtenTraffic(TorchDispatchMode):
    """Bytes read and written per aten op, outside kernel launches."""

    def __init__(self, traffic: StepTraffic) -> None:
        super().__init__()
        self.traffic = traffic
        self.in_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        if self.in_kernel or name in VIEW_OPS:
            return out
        if name in GATHER_OPS:
            # The table's gathered rows (as large as the output) and the indices, not the table.
            nbytes = 2 * _tensor_bytes(out) + sum(_tensor_bytes(a) for a in args[1:])
        else:
            nbytes = sum(_tensor_bytes(a) for a in args) + sum(_tensor_bytes(v) for v in (kwargs or {}).values())
            nbytes += 0 if func.overloadpacket.__name__.endswith("_") else _tensor_bytes(out)
        self.traffic.add(f"aten.{name}", nbytes)
        return out


@contextmanager
def counting_kernel_traffic(traffic: StepTraffic, aten: AtenTraffic) -> Iterator[None]:
    """Count every interpreted load and store into the launch that runs it."""
    from triton.runtime.interpreter import InterpreterBuilder

    current: list[int] = [0]
    touched: dict[int, list[np.ndarray]] = {}  # element size -> the addresses the launch loaded or stored
    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
    # Their cache arguments differ between triton releases (3.6: cache_modifier, eviction_policy; 3.9:
    # cache_policy), so the wrappers pass every argument on as given and find ptrs and mask by name.
    load_args, store_args = inspect.signature(load), inspect.signature(store)

    def count(signature: inspect.Signature, args: tuple, kwargs: dict) -> None:
        bound = signature.bind(*args, **kwargs).arguments
        ptrs, mask = bound["ptrs"], bound["mask"]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        lanes = np.broadcast_to(mask.data, ptrs.data.shape).astype(bool)
        current[0] += int(np.count_nonzero(lanes)) * size
        touched.setdefault(size, []).append(ptrs.data[lanes])

    def counted_load(*args, **kwargs):
        count(load_args, args, kwargs)
        return load(*args, **kwargs)

    def counted_store(*args, **kwargs):
        count(store_args, args, kwargs)
        return store(*args, **kwargs)

    @contextmanager
    def observe(record: LaunchRecord) -> Iterator[None]:
        current[0] = 0
        aten.in_kernel = True
        try:
            yield
        finally:
            aten.in_kernel = False
            distinct = sum(size * np.unique(np.concatenate(addresses)).size for size, addresses in touched.items())
            touched.clear()
            traffic.add(record.kernel.fn.__name__, current[0], math.prod(record.grid), distinct)

    InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = counted_load, counted_store
    try:
        with observing_launches(observe):
            yield
    finally:
        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store


class _MarkedLayers(list):
    """The engine's layers: each pass of the forward over them snapshots the count as it enters each
    layer and as it leaves the last (the forward's only use of the list is that loop)."""

    def __init__(self, layers: list, traffic: StepTraffic) -> None:
        super().__init__(layers)
        self.traffic = traffic
        self.marks: list[StepTraffic] = []

    def __iter__(self) -> Iterator:
        self.marks = []
        for layer in super().__iter__():
            self.marks.append(self.traffic.snapshot())
            yield layer
        self.marks.append(self.traffic.snapshot())


def _ids(shape: ModelShape, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, shape.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))


def ours_step(
    model: torch.nn.Module, shape: ModelShape, workload: str, batch: int, context: int,
    quantization: Quantization | None = None,
) -> tuple[StepTraffic, list[StepTraffic]]:
    """The step's whole count, and each layer's."""
    from tritongpt2.engine.config import GPT2Config
    from tritongpt2.engine.engine import Engine
    from tritongpt2.engine.options import EngineOptions
    from tritongpt2.engine.weights import shared_weights

    config = GPT2Config.from_dict(model.config.to_dict())
    options = EngineOptions(backend="interpret", max_batch=batch, quantization=quantization)
    engine = Engine(config, shared_weights(model, config), options)
    traffic = StepTraffic()
    aten = AtenTraffic(traffic)
    layers = engine.weights.layers = _MarkedLayers(engine.weights.layers, traffic)
    if workload == "decode":
        # One decode uncounted first, its kernels recorded instead of run (minutes under the
        # interpreter at gpt2's size): the engine makes its per-shape constants on the first. The
        # host's count of cached tokens is a prefill of context - 2 tokens; the cache's device state
        # (mask, lengths) is that of context - 1, as the uncounted step's kernels would have left it.
        # The cached values do not change the traffic.
        cache = engine.cache
        cache.key_mask[:batch, : context - 1] = 1
        cache.lengths[:batch] = cache.next_position[:batch] = context - 1
        cache.advance(batch, context - 2)
        tokens = _ids(shape, batch, 1)[:, 0]
        with recording_launches():
            engine.decode(tokens, check_ids=False)
        run: Callable[[], object] = lambda: engine.decode(tokens, check_ids=False)
    else:
        ids = _ids(shape, batch, context)
        run = (lambda: engine.prefill(ids)) if workload == "prefill" else (lambda: engine.prefill(ids, logits=None, hidden=True))
    with counting_kernel_traffic(traffic, aten), aten:
        run()
    return traffic, [later.since(earlier) for earlier, later in zip(layers.marks, layers.marks[1:])]


def hf_step(model: torch.nn.Module, shape: ModelShape, workload: str, batch: int, context: int) -> StepTraffic:
    traffic = StepTraffic()
    with torch.no_grad():
        if workload == "decode":
            out = model(input_ids=_ids(shape, batch, context - 1), use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            tokens = _ids(shape, batch, 1)
            with AtenTraffic(traffic):
                model(input_ids=tokens, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
        else:
            ids = _ids(shape, batch, context)
            with AtenTraffic(traffic):
                model(input_ids=ids, logits_to_keep=1) if workload == "prefill" else model.transformer(input_ids=ids)
    return traffic


def scaled(whole: StepTraffic, layer: StepTraffic, counted_layers: int, layers: int) -> tuple[int, int, int]:
    """(bytes, distinct bytes, launches) at full depth from a step over `counted_layers` layers and one layer's count."""
    extra = layers - counted_layers
    return (whole.bytes + extra * layer.bytes, whole.distinct_bytes + extra * layer.distinct_bytes,
            whole.launches + extra * layer.launches)


def run_traffic_audit(
    shape: ModelShape, workload: str, batch: int, context: int, dtype: torch.dtype, quantization: Quantization | None = None
) -> list[dict]:
    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r} must be one of {', '.join(WORKLOADS)}")
    if not 1 <= context <= shape.n_positions:
        raise ValueError(f"context {context} must be between 1 and {shape.n_positions}")
    element = torch.empty((), dtype=dtype).element_size()
    rows = []
    models = {n: build_model(replace(shape, n_layer=n), dtype, torch.device("cpu")) for n in (1, 2)}
    for model in models.values():
        model.config._attn_implementation = "eager"
    ideal = ideal_bytes(shape, workload, batch, context, element, quantization=quantization)
    whole, (_, layer) = ours_step(models[2], shape, workload, batch, context, quantization)
    measured = [("tritongpt2", whole, layer)]
    if quantization is None:
        one, two = (hf_step(models[n], shape, workload, batch, context) for n in (1, 2))
        measured.append(("hf-eager", two, two.since(one)))
    for impl, whole, layer in measured:
        total, distinct, launches = scaled(whole, layer, 2, shape.n_layer)
        rows.append({
            "model": shape.name, "workload": workload, "batch": batch, "context": context, "n_layer": shape.n_layer,
            "dtype": str(dtype).removeprefix("torch."), "impl": impl, "bytes": total, "ideal_bytes": ideal,
            "quantization": None if quantization is None else quantization.describe(),
            "ratio_to_ideal": round(total / ideal, 3), "distinct_bytes": distinct,
            "distinct_ratio_to_ideal": round(distinct / ideal, 3), "launches": launches,
            "launches_per_layer": layer.launches,
            "fewest_programs": min((p for k, p in whole.fewest_programs.items() if k not in ROW_KERNELS), default=None),
            "programs_per_kernel": whole.fewest_programs,
            "per_layer_bytes": layer.per_kernel,
        })
    return rows
