"""accelerate(model): run a loaded transformers GPT-2 model's forward and generate on tritongpt2."""

from __future__ import annotations

from torch import nn

from tritongpt2.engine.config import GPT2Config
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.weights import LAYER_KEYS, GPT2Weights, LayerWeights
from tritongpt2.kernels.backend import resolve_backend

from .models import MODEL_CLASSES

HEAD_MODULES = {
    "GPT2Model": (),
    "GPT2LMHeadModel": ("lm_head",),
    "GPT2DoubleHeadsModel": ("lm_head", "multiple_choice_head"),
    "GPT2ForSequenceClassification": ("score",),
    "GPT2ForTokenClassification": ("classifier",),
    "GPT2ForQuestionAnswering": ("qa_outputs",),
}


def shared_weights(model: nn.Module) -> GPT2Weights:
    """The model's own tensors, not copies: the engine reads the same memory."""
    base = model.transformer if hasattr(model, "transformer") else model

    def tensor(module: nn.Module, path: str):
        for part in path.split("."):
            module = getattr(module, part)
        return module.detach()

    layers = [LayerWeights(**{name: tensor(block, key) for name, key in LAYER_KEYS.items()}) for block in base.h]
    wte = tensor(base, "wte.weight")
    lm_head = tensor(model, "lm_head.weight") if hasattr(model, "lm_head") else wte
    return GPT2Weights(wte, tensor(base, "wpe.weight"), layers, tensor(base, "ln_f.weight"), tensor(base, "ln_f.bias"), lm_head)


def accelerate(
    model: nn.Module,
    *,
    backend: str | None = None,
    max_batch: int = 8,
    max_seq: int | None = None,
    cuda_graphs: bool | None = None,
) -> nn.Module:
    """Make a transformers GPT-2 model (any of the six classes, any dtype, on CUDA or the CPU) run its
    forward and generate on tritongpt2, in place, sharing its weights; returns the same model.
    Only this instance changes: transformers' classes are untouched. Inference only (no autograd)."""
    name = next((c.__name__ for c in type(model).__mro__ if c.__name__ in HEAD_MODULES), None)
    if name is None:
        raise ValueError(f"accelerate takes one of transformers' GPT-2 classes ({', '.join(HEAD_MODULES)}), got {type(model).__name__}")
    config = GPT2Config.from_dict(model.config.to_dict())
    weights = shared_weights(model)
    if backend is None and weights.device.type == "cuda":
        backend = "triton"
    engine = Engine(config, weights, backend=resolve_backend(backend), max_batch=max_batch, max_seq=max_seq, cuda_graphs=cuda_graphs)
    fast = MODEL_CLASSES[name](config, engine, {head: getattr(model, head) for head in HEAD_MODULES[name]})
    model.forward = fast.forward
    if hasattr(fast, "generate"):
        model.generate = fast.generate
    # Kept off the module tree, so the model's state_dict and parameters stay exactly as they were.
    object.__setattr__(model, "tritongpt2", fast)
    return model
