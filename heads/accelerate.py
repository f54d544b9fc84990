"""accelerate(model): run a loaded transformers GPT-2 model's forward and generate on tritongpt2."""

from __future__ import annotations

from typing import Any

from torch import nn

from tritongpt2.engine.config import GPT2Config
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.options import EngineOptions
from tritongpt2.engine.weights import shared_weights

from .models import MODEL_CLASSES

HEAD_MODULES = {
    "GPT2Model": (),
    "GPT2LMHeadModel": ("lm_head",),
    "GPT2DoubleHeadsModel": ("lm_head", "multiple_choice_head"),
    "GPT2ForSequenceClassification": ("score",),
    "GPT2ForTokenClassification": ("classifier",),
    "GPT2ForQuestionAnswering": ("qa_outputs",),
}


def accelerate(model: nn.Module, options: EngineOptions | None = None, **option_values: Any) -> nn.Module:
    """Make a transformers GPT-2 model (any of the six classes, any dtype, on CUDA or the CPU) run its
    forward and generate on tritongpt2, in place, sharing its weights; returns the same model.
    Only this instance changes: transformers' classes are untouched. Inference only (no autograd).
    Options as EngineOptions fields (backend=, max_batch=, max_seq=, cuda_graphs=; dtype= and device=
    first convert the model in place, as model.to() does)."""
    name = next((c.__name__ for c in type(model).__mro__ if c.__name__ in HEAD_MODULES), None)
    if name is None:
        raise ValueError(f"accelerate takes one of transformers' GPT-2 classes ({', '.join(HEAD_MODULES)}), got {type(model).__name__}")
    options = EngineOptions.of(options, **option_values)
    if options.dtype is not None or options.device is not None:
        model.to(device=options.device, dtype=options.dtype)
    config = GPT2Config.from_dict(model.config.to_dict())
    engine = Engine(config, shared_weights(model, config), options)
    fast = MODEL_CLASSES[name](config, engine, {head: getattr(model, head) for head in HEAD_MODULES[name]})
    model.forward = fast.forward
    if hasattr(fast, "generate"):
        model.generate = fast.generate
    # Kept off the module tree, so the model's state_dict and parameters stay exactly as they were.
    object.__setattr__(model, "tritongpt2", fast)
    return model
