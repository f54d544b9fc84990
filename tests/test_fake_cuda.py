"""Which backend and device every entry point picks on a machine with CUDA, checked on this one: with
torch.cuda.is_available() made True and nothing put on CUDA. An engine whose weights would go to the
GPU is built to the end of its constructor (its backend chosen, its graphs switched on) with its
tensors kept off the GPU, then stops with `Picked`; one on the CPU is built and runs for real.

The resolution rules themselves are in test_backend.py (test_the_default_follows_the_weights_device);
`bench --quick` staying on the CPU is in test_bench_cli.py; the refusals without CUDA in test_options.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tritongpt2
from checkpoints import save_model
from numerics import relative_error
from tokenizer_files import save_model_with_tokenizer
from tritongpt2 import cli
from tritongpt2.engine import engine as engine_module
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.weights import GPT2Weights
from tritongpt2.heads.models import MODEL_CLASSES
from tritongpt2.kernels import backend as backend_module
from tritongpt2.kernels.backend import BACKEND_ENV, Backend

transformers = pytest.importorskip("transformers")
ENTRY_POINTS = ["Engine", "Embedder", *MODEL_CLASSES]


class Picked(Exception):
    """An engine was built for the GPU: the entry point stops here, before anything runs."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(f"{engine.backend.name} on {engine.device}")
        self.engine = engine


@dataclasses.dataclass
class WeightsOnFakeCuda(GPT2Weights):
    """Checked and cast weights, kept on the CPU while saying they are on CUDA."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA available, in a process as a GPU machine starts one (no TRITON_INTERPRET, no kernels built
    yet, no $TRITONGPT2_BACKEND); what would go to CUDA stays on the CPU (weights) or on meta (the KV
    cache), the triton backend's kernels are not built, and Engine.from_checkpoint raises Picked for
    an engine on CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(backend_module, "kernel_mode", lambda: None)
    monkeypatch.setattr(backend_module, "_interpret_env_on", lambda: False)
    real_ops = Backend.ops
    monkeypatch.setattr(Backend, "ops", property(lambda b: "kernels not built" if b.needs_cuda else real_ops.fget(b)))

    real_weights = engine_module.weights_from_state_dict

    def weights_from_state_dict(*args, device=None, **kwargs):
        if device is None or torch.device(device).type != "cuda":
            return real_weights(*args, device=device, **kwargs)
        on_cpu = real_weights(*args, device="cpu", **kwargs)
        return WeightsOnFakeCuda(**{f.name: getattr(on_cpu, f.name) for f in dataclasses.fields(on_cpu)})

    class StaticKVCache(engine_module.StaticKVCache):
        def __init__(self, *args, device, **kwargs):
            super().__init__(*args, device="meta" if torch.device(device).type == "cuda" else device, **kwargs)

    class NoCudaGraphs:
        pass

    real_from_checkpoint = Engine.from_checkpoint.__func__

    def from_checkpoint(cls, checkpoint, options=None):
        engine = real_from_checkpoint(cls, checkpoint, options)
        if engine.device.type == "cuda":
            raise Picked(engine)
        return engine

    monkeypatch.setattr(engine_module, "weights_from_state_dict", weights_from_state_dict)
    monkeypatch.setattr(engine_module, "StaticKVCache", StaticKVCache)
    monkeypatch.setattr(engine_module, "CudaGraphs", NoCudaGraphs)
    monkeypatch.setattr(Engine, "from_checkpoint", classmethod(from_checkpoint))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model_with_tokenizer(tmp_path_factory.mktemp("fake-cuda"), n_layer=1)


def load(entry_point, folder, **options):
    return getattr(tritongpt2, entry_point).from_pretrained(folder, **options)


def engine_of(loaded):
    return loaded if isinstance(loaded, Engine) else loaded.engine


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_from_pretrained_defaults_to_triton_on_cuda_with_graphs(fake_cuda, checkpoint, entry_point):
    with pytest.raises(Picked) as picked:
        load(entry_point, checkpoint[0])
    engine = picked.value.engine
    assert engine.backend.name == "triton" and engine.device == torch.device("cuda", 0)
    assert engine.graphs is not None and engine.weights.dtype == torch.float32  # the checkpoint's dtype
    with pytest.raises(Picked) as picked:
        load(entry_point, checkpoint[0], dtype=torch.bfloat16, backend="triton")
    assert picked.value.engine.weights.dtype == torch.bfloat16 and picked.value.engine.cache.keys.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:.*newly initialised")  # an LM checkpoint loaded into the other classes
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_from_pretrained_on_the_cpu_takes_the_torch_backend_and_runs(fake_cuda, checkpoint, entry_point):
    folder, model = checkpoint
    for options in (dict(device="cpu"), dict(backend="torch")):
        loaded = load(entry_point, folder, **options)
        engine = engine_of(loaded)
        assert engine.backend.name == "torch" and engine.device == torch.device("cpu") and engine.graphs is None
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert relative_error(engine.prefill(ids, logits="all").logits, expected) < 2e-5
    with pytest.raises(ValueError, match="backend='triton' runs on cuda, but the weights are on cpu"):
        load(entry_point, folder, device="cpu", backend="triton")


def test_accelerate_keeps_a_cpu_model_on_the_torch_backend(fake_cuda, tmp_path):
    _, model = save_model(tmp_path, n_layer=1)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        tritongpt2.accelerate(model)
        engine = model.tritongpt2.engine
        assert engine.backend.name == "torch" and engine.device == torch.device("cpu") and engine.graphs is None
        assert relative_error(model(input_ids=ids).logits, expected) < 2e-5
    with pytest.raises(ValueError, match="backend='triton' runs on cuda, but the weights are on cpu"):
        tritongpt2.accelerate(save_model(tmp_path / "other", n_layer=1)[1], backend="triton")


@pytest.mark.parametrize("command", [["generate", "--max-new-tokens", "2"], ["embed"]])
def test_the_cli_takes_triton_on_cuda_and_torch_when_asked(fake_cuda, checkpoint, capsys, command):
    folder = str(checkpoint[0])
    with pytest.raises(Picked) as picked:
        cli.main([*command, "--model", folder, "hello"])
    assert picked.value.engine.backend.name == "triton" and picked.value.engine.device.type == "cuda"
    assert cli.main([*command, "--model", folder, "--backend", "torch", "hello"]) == 0
    assert capsys.readouterr().out
