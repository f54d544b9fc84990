"""EngineOptions are checked by every entry point that builds an engine, before anything is read."""

import re

import pytest
import torch

import tritongpt2
from checkpoints import save_model

pytest.importorskip("transformers")

ENTRY_POINTS = ["Engine", "Embedder", *tritongpt2.heads.models.MODEL_CLASSES]
NO_CUDA = re.escape("device='cuda' asked for, but torch.cuda.is_available() is False")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_cuda_without_cuda_is_refused_by_every_from_pretrained(tmp_path, no_cuda, entry_point):
    load = getattr(tritongpt2, entry_point).from_pretrained
    folder, _ = save_model(tmp_path / "model")
    with pytest.raises(ValueError, match=NO_CUDA):
        load(folder, device="cuda")
    # Before the checkpoint is read: a folder that is not there is not the error.
    with pytest.raises(ValueError, match=NO_CUDA):
        load(tmp_path / "not-there", device="cuda")
    with pytest.raises(ValueError, match=NO_CUDA):
        load(folder, options=tritongpt2.EngineOptions(device="cpu"), device="cuda")


@pytest.mark.parametrize("options", [dict(device="cuda"), dict(device="cuda:1"), dict(device=torch.device("cuda"))])
def test_accelerate_refuses_cuda_without_cuda_and_leaves_the_model_alone(tmp_path, no_cuda, options):
    _, model = save_model(tmp_path)
    with pytest.raises(ValueError, match="asked for, but torch.cuda.is_available.. is False"):
        tritongpt2.accelerate(model, **options)
    assert not hasattr(model, "tritongpt2") and "forward" not in vars(model)
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(device="cuda"), NO_CUDA),
        (dict(device="gpu"), "device='gpu' is not a device"),
        (dict(dtype=torch.float64), "dtype=torch.float64 is not supported"),
        (dict(dtype="half"), "dtype='half' is not supported"),
        (dict(max_batch=0), "max_batch=0 must be a positive integer"),
        (dict(max_batch=True), "max_batch=True must be a positive integer"),
        (dict(max_seq=2.5), "max_seq=2.5 must be a positive integer"),
        (dict(cuda_graphs="yes"), "cuda_graphs='yes' must be True, False or None"),
        (dict(backend=3), "backend=3 must be one of"),
    ],
)
def test_bad_options_name_the_option_and_the_value(no_cuda, options, message):
    with pytest.raises(ValueError, match=message):
        tritongpt2.EngineOptions(**options)


def test_unknown_options_are_a_type_error_naming_them(tmp_path):
    with pytest.raises(TypeError, match="unknown engine option.s. max_batches; known: backend"):
        tritongpt2.Engine.from_pretrained(tmp_path / "not-there", max_batches=2)
