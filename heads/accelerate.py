"""accelerate(model): a loaded transformers GPT-2 model runs its forward and generate on tritongpt2.

The model stays a transformers model, and only this instance changes (its `forward` and `generate`
attributes): transformers' classes are untouched. Each call takes the fast path, tritongpt2's engine
over the model's own tensors, where the kernels compute what transformers' forward would; every
other call runs transformers' own forward of the same instance, on the same weights and the same
cache, with a warning (once per reason) that names why. Nothing transformers can do is refused.

Never stale: before each call the engine is checked against the module's current parameters
(objects, storage, dtype, device) and config, and rebuilt over them when anything changed; in-place
updates (load_state_dict) are seen at once, since the engine reads the model's own memory.

Quantized (accelerate(model, quantization="nf4")), the engine holds its own quantized copies of the
matmul weights beside the model's float parameters, which stay as they are for transformers' fallback
path: a one-time warning gives both sizes, and `model.tritongpt2.weight_memory()` reports them. Then
in-place updates count as changes too (each parameter's version counter is watched), and a rebuild
quantizes the current parameters again. (An update through `param.data` bypasses the counter: call
`model.tritongpt2.refresh(force=True)` after one.) A model that transformers loaded quantized
(bitsandbytes' load_in_4bit or load_in_8bit, or any quantization_config) is refused: accelerate the
float model with quantization= instead.

copy.deepcopy and pickling (torch.save of the whole model) give a model accelerated afresh, with the
same options, over its own copied tensors: the engine and the bound forward never travel with it.
"""

from __future__ import annotations

import copy
import inspect
import threading
import warnings
from typing import Any, Callable

import torch
from torch import nn

from tritongpt2.engine.config import GPT2Config
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.options import EngineOptions
from tritongpt2.engine.quantize import weight_bytes
from tritongpt2.engine.weights import shared_weights

from .cache import KVCache, new_cache
from .models import MODEL_CLASSES, IGNORED_KEYWORDS
from .outputs import ModelOutput, as_transformers_output

HEAD_MODULES = {
    "GPT2Model": (),
    "GPT2LMHeadModel": ("lm_head",),
    "GPT2DoubleHeadsModel": ("lm_head", "multiple_choice_head"),
    "GPT2ForSequenceClassification": ("score",),
    "GPT2ForTokenClassification": ("classifier",),
    "GPT2ForQuestionAnswering": ("qa_outputs",),
}
CACHE_NAMES = ("cache", "past_key_values")
# Config fields the engine is built from: a change rebuilds it.
STRUCTURE = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    "add_cross_attention", "tie_word_embeddings",
)
# What accelerate() adds to the instance's __dict__: left out of a copy, which is accelerated anew.
ACCELERATION_ATTRIBUTES = ("forward", "generate", "tritongpt2", "__reduce_ex__")
# What the engine's own generation loop serves exactly: greedy search and plain sampling.
FAST_GENERATION_FIELDS = frozenset({
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "transformers_version", "use_cache",
})


class Accelerated:
    """The tritongpt2 side of one accelerated model: its engine, rebuilt when the model changes, and
    the choice between the fast path and transformers' own forward. Calls are serialized."""

    def __init__(self, model: nn.Module, name: str, options: EngineOptions) -> None:
        self.model, self.name, self.options = model, name, options
        self.transformers_forward = type(model).forward.__get__(model)
        self.transformers_generate = type(model).generate.__get__(model) if hasattr(type(model), "generate") else None
        self.signature = inspect.signature(type(model).forward)
        self.lock = threading.RLock()
        self.fast: nn.Module | None = None
        self.unavailable: str | None = None  # why the fast path cannot run this model at all
        self._built_for: tuple[Any, ...] | None = None
        self._parameters: list[nn.Parameter] = []
        self._slots: list[tuple[dict, str, Any]] = []
        self._warned: set[str] = set()
        self.fast_keywords: set[str] = set()
        self._memory: dict[str, float] = {}
        self.refresh()

    @property
    def engine(self) -> Engine | None:
        return self.fast.engine if self.fast is not None else None

    def refresh(self, force: bool = False) -> None:
        """Rebuild the engine over the model's current tensors and config if any of them changed
        (or when `force`), quantizing them again when the engine runs quantized weights."""
        if self._built_for is not None and not self._changed() and not force:
            return
        self._slots = [
            (store, name, value)
            for module in self.model.modules()
            for store in (module._parameters, module._modules)
            for name, value in store.items()
        ]
        self._parameters = list(self.model.parameters())
        self._built_for = self._state()
        self.fast, self.unavailable = None, None
        try:
            config = GPT2Config.from_dict(self.model.config.to_dict())
            weights = shared_weights(self.model, config)
            engine = Engine(config, weights, self.options)
        except ValueError as error:
            self.unavailable = str(error)
            return
        if engine.quantization is not None:
            self._report_memory(weight_bytes(weights)["float"], weight_bytes(engine.weights)["quantized"], engine)
        heads = {head: getattr(self.model, head) for head in HEAD_MODULES[self.name]}
        self.fast = MODEL_CLASSES[self.name](self.model.config, engine, heads)
        self.fast_keywords = set(inspect.signature(self.fast.forward).parameters) | self.fast.extra_keywords | IGNORED_KEYWORDS

    def _report_memory(self, float_bytes: int, quantized_bytes: int, engine: Engine) -> None:
        self._memory = {"float_mb": float_bytes / 2**20, "quantized_mb": quantized_bytes / 2**20}
        if "memory" not in self._warned:
            self._warned.add("memory")
            warnings.warn(
                f"tritongpt2.accelerate: the engine runs its own {engine.quantization.describe()} copies of the matmul "
                f"weights, {self._memory['quantized_mb']:.1f} MB, beside the model's float ones, "
                f"{self._memory['float_mb']:.1f} MB, which transformers' fallback path keeps using "
                "(model.tritongpt2.weight_memory() reports both)",
                stacklevel=5,
            )

    def weight_memory(self) -> dict[str, float]:
        """The matmul weights' memory in MB: `float_mb`, the model's own parameters, and
        `quantized_mb`, the engine's quantized copies of them ({} when the engine runs the model's
        float parameters themselves, or cannot run it)."""
        return dict(self._memory) if self.engine is not None and self.engine.quantization is not None else {}

    def _state(self) -> tuple[Any, ...]:
        config = self.model.config
        # Quantized copies do not follow in-place updates of the parameters: their versions are watched too.
        versions = tuple(p._version for p in self._parameters) if self.options.quantization is not None else ()
        return (
            tuple(getattr(config, field, None) for field in STRUCTURE),
            tuple((p.data_ptr(), p.dtype) for p in self._parameters),
            versions,
        )

    def _changed(self) -> bool:
        if any(store.get(name) is not value for store, name, value in self._slots):
            return True
        return self._state() != self._built_for

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.refresh()
            arguments = self._bind(args, kwargs)
            reason = self.unavailable or self._fallback_reason(arguments)
            if reason is not None:
                return self._transformers(arguments, reason)
            out = self.fast(**arguments)
            return as_transformers_output(out) if isinstance(out, ModelOutput) else out

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self.signature.bind(self.model, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(self.signature.parameters)))
        for name, parameter in self.signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        return arguments

    def _fallback_reason(self, arguments: dict[str, Any]) -> str | None:
        """Why this call needs transformers' own forward, or None for the fast path."""
        config = self.model.config
        if arguments.get("output_attentions") or (arguments.get("output_attentions") is None and getattr(config, "output_attentions", False)):
            return "output_attentions: the flash-attention kernels never materialise the attention probabilities"
        if arguments.get("encoder_hidden_states") is not None or arguments.get("encoder_attention_mask") is not None:
            return "cross-attention (encoder_hidden_states) is not in the kernels"
        if self.model.training and max(config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) > 0:
            return "the model is in training mode, where transformers applies dropout"
        if torch.is_grad_enabled() and (
            any(p.requires_grad for p in self._parameters)
            or getattr(arguments.get("inputs_embeds"), "requires_grad", False)
        ):
            return "autograd is on and parameters require grad: the kernels compute no gradients (use torch.no_grad() or inference_mode for the fast path)"
        mask = arguments.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            return "a 4-D attention mask: the kernels take a padding mask per row"
        cache = next((arguments[name] for name in CACHE_NAMES if arguments.get(name) is not None), None)
        if cache is not None and not isinstance(cache, KVCache) and not _empty_cache(cache):
            return f"past_key_values is a {type(cache).__name__} that transformers' forward filled"
        positions = arguments.get("position_ids")
        if isinstance(positions, torch.Tensor) and mask is None and cache is None and positions.dim() and positions.shape[-1] > 1:
            if bool((positions.reshape(-1, positions.shape[-1]).diff(dim=-1) < 0).any()):
                return "position_ids restart within a row (packed sequences), which the kernels' causal mask does not separate"
        unknown = sorted(set(arguments) - self.fast_keywords)
        if unknown:
            return f"keyword arguments the tritongpt2 forward does not take: {', '.join(unknown)}"
        return None

    def _transformers(self, arguments: dict[str, Any], reason: str) -> Any:
        """transformers' forward of this instance. Without grad, its cache is a tritongpt2 one (new
        when none, or an empty one, was given), so later calls can take the fast path again."""
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"tritongpt2.accelerate: {reason}; running transformers' own forward", stacklevel=3)
        declared = next((n for n in CACHE_NAMES if n in self.signature.parameters), None)
        if declared is None:  # a class without a cache (question answering)
            return self.transformers_forward(**arguments)
        # The caller's name for the cache is kept: transformers warns about its deprecated one.
        name = next((n for n in CACHE_NAMES if arguments.get(n) is not None), declared)
        given = arguments.get(name)
        use_cache = arguments.get("use_cache")
        use_cache = self.model.config.use_cache if use_cache is None else use_cache
        rows, seq = _rows_and_length(arguments)
        fresh = given is None or (not isinstance(given, KVCache) and _empty_cache(given))
        if fresh and rows is not None and self.fast is not None and not torch.is_grad_enabled():
            ours = self.fast.cache_for(given, rows, seq) if given is not None else None
            if ours is None and use_cache:
                ours = new_cache(self.engine.new_cache(rows, seq))
            if ours is not None:
                arguments[name] = given = ours
        if isinstance(given, KVCache) and self.engine is not None:
            self.engine.cache_to_use(given.storage)  # a cache of the model's former dtype or device is refused
        return self.transformers_forward(**arguments)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.refresh()
            fast = self._fast_generation(args, kwargs)
            if fast is not None:
                return self.fast.generate(**fast)
        return self.transformers_generate(*args, **kwargs)

    def _fast_generation(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The engine loop's arguments when it serves this generate call exactly (greedy search or
        plain sampling of input_ids, within the engine's cache), None otherwise."""
        # transformers' generate runs without grad whatever the caller's mode: so does the engine loop.
        if self.fast is None or args[1:] or self.model.training:
            return None
        kwargs = dict(kwargs)
        input_ids = args[0] if args else kwargs.pop("inputs", kwargs.pop("input_ids", None))
        attention_mask = kwargs.pop("attention_mask", None)
        streamer = kwargs.pop("streamer", None)
        config = copy.deepcopy(kwargs.pop("generation_config", None) or self.model.generation_config)
        leftover = config.update(**kwargs)
        defaults = type(config)().to_dict()
        # Settings away from their defaults (False and None alike mean off).
        fields = {k for k, v in config.to_dict().items() if not k.startswith("_") and v != defaults.get(k) and (v or defaults.get(k))}
        if leftover or fields - FAST_GENERATION_FIELDS or not config.use_cache:
            return None
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] > self.engine.cache.max_batch:
            return None
        max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
        if max_new < 1 or input_ids.shape[1] + max_new > self.engine.cache.max_seq + 1:
            return None
        return dict(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new, do_sample=bool(config.do_sample),
            temperature=config.temperature if config.temperature is not None else 1.0, top_k=config.top_k,
            top_p=config.top_p if config.top_p is not None else 1.0, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id, streamer=streamer,
        )


# The modules bitsandbytes puts in place of a model's linear layers.
BITSANDBYTES_MODULES = ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")


def _refuse_quantized(model: nn.Module) -> None:
    """ValueError for a model transformers loaded quantized (bitsandbytes or another quantizer)."""
    config = getattr(model, "config", None)
    setting = getattr(config, "quantization_config", None)
    method = setting.get("quant_method") if isinstance(setting, dict) else getattr(setting, "quant_method", None)
    signs = {
        "load_in_4bit": getattr(model, "is_loaded_in_4bit", False),
        "load_in_8bit": getattr(model, "is_loaded_in_8bit", False),
        f"quantization_config quant_method={getattr(method, 'value', method)!r}": setting is not None,
        "an hf_quantizer": getattr(model, "hf_quantizer", None) is not None,
        "bitsandbytes layers": any(type(m).__name__ in BITSANDBYTES_MODULES for m in model.modules()),
    }
    how = next((sign for sign, found in signs.items() if found), None)
    if how is not None:
        raise ValueError(
            f"accelerate takes a float model, but this {type(model).__name__} was loaded quantized ({how}); load the "
            "float model and pass quantization='nf4' (bitsandbytes' 4-bit NormalFloat, the same bytes), 'int4' or "
            "'int8' to accelerate instead: tritongpt2 quantizes it for its own kernels"
        )


def _empty_cache(cache: Any) -> bool:
    return hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0


def _rows_and_length(arguments: dict[str, Any]) -> tuple[int | None, int]:
    inputs = arguments.get("input_ids")
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 1:
        return inputs.reshape(-1, inputs.shape[-1]).shape[0], inputs.shape[-1]
    embeds = arguments.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2:
        return embeds.reshape(-1, *embeds.shape[-2:]).shape[0], embeds.shape[-2]
    return None, 1


def _with_signature(method: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """method, presenting the signature of transformers' unbound `original` without self: generate
    and transformers' tests read a model's forward parameters to decide what to pass it."""

    # torch.compile cannot trace the engine (it launches its own kernels): compiling the model runs
    # this call as it is, rather than recompiling around it.
    @torch.compiler.disable
    def call(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    signature = inspect.signature(original)
    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    call.__name__, call.__qualname__, call.__doc__ = original.__name__, original.__qualname__, original.__doc__
    return call


def accelerate(model: nn.Module, options: EngineOptions | None = None, **option_values: Any) -> nn.Module:
    """Make a transformers GPT-2 model (any of the six classes, any dtype, on CUDA or the CPU) run its
    forward and generate on tritongpt2, in place, sharing its weights; returns the same model.
    Options as EngineOptions fields (backend=, max_batch=, max_seq=, cuda_graphs=, quantization=,
    group_size=, double_quant=; dtype= and device= first convert the model in place, as model.to()
    does). With quantization=, the engine runs quantized copies of the matmul weights (see the
    module's docstring): a format the backend does not run, or a group that does not divide the
    model's widths, is refused, and so is a model transformers loaded quantized. What the kernels cannot compute exactly
    (output_attentions, autograd, training-mode dropout, cross-attention, 4-D masks, caches filled by
    transformers) runs transformers' own forward, with a one-time warning naming the reason."""
    name = next((c.__name__ for c in type(model).__mro__ if c.__name__ in HEAD_MODULES), None)
    if name is None:
        raise ValueError(f"accelerate takes one of transformers' GPT-2 classes ({', '.join(HEAD_MODULES)}), got {type(model).__name__}")
    _refuse_quantized(model)
    options = EngineOptions.of(options, **option_values)
    if options.dtype is not None or options.device is not None:
        model.to(device=options.device, dtype=options.dtype)
    backend = options.backend_for(next(model.parameters()).device)  # a backend that cannot run here is refused now
    if options.quantization is not None:  # and so is a quantization that the backend or the model's shapes cannot take
        backend.check_quantization(options.quantization.format)
        options.quantization.check_model(GPT2Config.from_dict(model.config.to_dict()))
    accelerated = Accelerated(model, name, options)
    model.forward = _with_signature(accelerated.forward, type(model).forward)
    if accelerated.transformers_generate is not None:
        model.generate = _with_signature(accelerated.generate, type(model).generate)
    # Kept off the module tree, so the model's state_dict and parameters stay exactly as they were.
    object.__setattr__(model, "tritongpt2", accelerated)
    # copy.deepcopy and pickle look __reduce_ex__ up on the instance: a copy is the module's state
    # without what accelerate added (a lock, an engine, a forward bound to this instance), accelerated again.
    object.__setattr__(model, "__reduce_ex__", lambda protocol: (_accelerated_copy, (type(model), _plain_state(model), options)))
    return model


def _plain_state(model: nn.Module) -> dict[str, Any]:
    return {key: value for key, value in model.__dict__.items() if key not in ACCELERATION_ATTRIBUTES}


def _accelerated_copy(cls: type, state: dict[str, Any], options: EngineOptions) -> nn.Module:
    """A copied or unpickled accelerated model: its module state restored, then accelerated again."""
    model = cls.__new__(cls)
    model.__setstate__(state)
    return accelerate(model, options)
