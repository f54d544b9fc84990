"""tritongpt2: GPT-2 inference on hand-written Triton kernels."""

from tritongpt2.embedder import Embedder
from tritongpt2.engine.config import GPT2Config
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.generation import generate, stream_tokens
from tritongpt2.engine.options import EngineOptions
from tritongpt2.engine.quantize import Quantization
from tritongpt2.heads.accelerate import accelerate
from tritongpt2.heads.models import (
    GPT2DoubleHeadsModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from tritongpt2.kernels.backend import BACKENDS, resolve_backend

__all__ = [
    "BACKENDS", "Embedder", "Engine", "EngineOptions", "GPT2Config", "GPT2DoubleHeadsModel", "GPT2ForQuestionAnswering",
    "GPT2ForSequenceClassification", "GPT2ForTokenClassification", "GPT2LMHeadModel", "GPT2Model",
    "Quantization", "accelerate", "generate", "resolve_backend", "stream_tokens",
]
__version__ = "0.1.0"
