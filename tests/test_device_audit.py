"""The device audit's rules (device_audit.py), installed for each test here: what it refuses and what
it lets through. The whole suite runs under it with TRITONGPT2_TEST_DEVICE_AUDIT=1."""

import pytest
import torch

import device_audit
import tritongpt2
from checkpoints import save_model
from device_audit import DeviceMismatch, OnDevice
from numerics import BACKEND, device_of, on, relative_error
from tritongpt2.engine import generation
from tritongpt2.engine.engine import Engine

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(BACKEND != device_audit.FOREIGN, reason="the audit stands in for a GPU on a CPU-only machine")


@pytest.fixture
def audit(monkeypatch):
    """The audit on for one test (already on for the whole run under TRITONGPT2_TEST_DEVICE_AUDIT=1)."""
    if not device_audit.ENABLED:
        monkeypatch.setattr(device_audit, "ENABLED", True)
        device_audit.install(monkeypatch.setattr)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("audit"), n_layer=1)


def ids(seed=0):
    return torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(seed))


def test_device_of_each_backend():
    assert device_of("triton") == torch.device("cuda") and device_of("interpret") == device_of("torch") == torch.device("cpu")


def test_marked_tensors_mix_as_cuda_tensors_do(audit):
    device, cpu = on(BACKEND, torch.arange(6.0).reshape(2, 3)), torch.ones(2, 3)
    assert isinstance(device, OnDevice) and isinstance(device[:, 1:].sum(-1), OnDevice)
    for mixed in (lambda: device + cpu, lambda: torch.equal(device, cpu), lambda: torch.cat([device, cpu]),
                  lambda: cpu[device[:, 0] > 0]):
        with pytest.raises(DeviceMismatch, match="device audit"):
            mixed()
    with pytest.raises(TypeError, match="to numpy"):
        device.numpy()
    # What CUDA allows: a 0-dim CPU tensor (a scalar), CPU indices into a device tensor, copies across.
    assert isinstance(device * torch.tensor(2.0), OnDevice) and isinstance(device[cpu[:, 0] > 0], OnDevice)
    device[0] = cpu[0]
    cpu.copy_(device)
    for back in (device.cpu(), device.to("cpu"), on("torch", device)):
        assert type(back) is torch.Tensor and torch.equal(back, cpu)
    assert relative_error(device, cpu) == 0.0  # numerics compares on the CPU


def test_the_kernel_backend_refuses_cpu_tensors_and_hands_out_device_ones(audit, checkpoint):
    engine = Engine.from_pretrained(checkpoint[0], backend=BACKEND, max_batch=2)
    with pytest.raises(ValueError, match=r"Engine.prefill: argument 1 is a CPU tensor.*numerics.on\(backend"):
        engine.prefill(ids())
    with pytest.raises(ValueError, match="attention_mask is a CPU tensor"):
        engine.prefill(on(BACKEND, ids()), attention_mask=torch.ones(2, 5))
    out = engine.prefill(on(BACKEND, ids()), logits="all")
    assert isinstance(out.logits, OnDevice)
    with pytest.raises(DeviceMismatch):
        torch.equal(out.logits, torch.zeros(2, 5, 300))
    assert isinstance(engine.decode(out.logits[:, -1].argmax(-1)).logits, OnDevice)
    # generate hands back CPU tensors, as documented; its own calls to the engine are not the tests'.
    tokens = generation.generate(engine, on(BACKEND, ids()), max_new_tokens=2, eos_token_id=[])
    assert type(tokens) is torch.Tensor and tokens.shape == (2, 7)
    with pytest.raises(ValueError, match="generate: argument 1 is a CPU tensor"):
        generation.generate(engine, ids(), max_new_tokens=2)


def test_the_torch_backend_refuses_device_tensors(audit, checkpoint):
    engine = Engine.from_pretrained(checkpoint[0], backend="torch")
    with pytest.raises(ValueError, match=r"is on the interpret backend's device .*, but this runs on the CPU"):
        engine.prefill(on(BACKEND, ids()))
    assert type(engine.prefill(ids()).logits) is torch.Tensor
    model = tritongpt2.GPT2LMHeadModel.from_pretrained(checkpoint[0], backend="torch")
    with pytest.raises(ValueError, match="GPT2LMHeadModel.forward: input_ids is on the interpret backend's device"):
        model(input_ids=on(BACKEND, ids()))


def test_accelerate_wants_the_model_on_the_backends_device(audit, tmp_path):
    _, model = save_model(tmp_path, n_layer=1)
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
    with pytest.raises(ValueError, match="the model is on the CPU: move it with numerics.on"):
        tritongpt2.accelerate(model, backend=BACKEND)
    assert "forward" not in vars(model)
    tritongpt2.accelerate(on(BACKEND, model))  # the default backend of a model on the device: the kernel one
    assert model.tritongpt2.engine.backend.name == BACKEND
    with torch.no_grad():
        got = model(input_ids=on(BACKEND, ids())).logits
        with pytest.raises(ValueError, match="accelerated GPT2LMHeadModel.forward: input_ids is a CPU tensor"):
            model(input_ids=ids())
    assert isinstance(got, OnDevice) and relative_error(got, expected) < 2e-5
    with pytest.raises(ValueError, match="backend='torch' runs on the CPU, but the model is on"):
        tritongpt2.accelerate(on(BACKEND, save_model(tmp_path / "other", n_layer=1)[1]), backend="torch")
