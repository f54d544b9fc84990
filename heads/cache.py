"""past_key_values of the drop-in classes: transformers' Cache API over a tritongpt2 KV cache.

The keys and values live in the engine's StaticKVCache layout, [n_layer, rows, n_head, slots, head_dim],
which the kernels write in place; this object is the Cache that transformers' models and generate
expect over that same storage (no copy). Where transformers is installed the object is also an
instance of transformers.Cache (see `new_cache`), so transformers' own forward can write into it
(`update`) and its generation strategies can reorder, select, repeat and crop it.

It behaves as transformers' DynamicCache (layers show the tokens held) unless made `static`: then,
as a StaticCache of max_cache_len slots (and an instance of transformers.StaticCache), layers show
every slot and masks span them all, which is what generate(cache_implementation="static") expects.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tritongpt2.engine.kv_cache import StaticKVCache


class _LayerView:
    """One layer of the cache as transformers reads it: keys and values [batch, heads, tokens, head_dim],
    views of the storage."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    is_initialized = True

    def __init__(self, owner: KVCache, index: int) -> None:
        self.owner, self.index = owner, index

    @property
    def keys(self) -> torch.Tensor:
        storage = self.owner.storage
        return storage.keys[self.index, : storage.batch, :, : self.owner.shown]

    @property
    def values(self) -> torch.Tensor:
        storage = self.owner.storage
        return storage.values[self.index, : storage.batch, :, : self.owner.shown]

    @property
    def max_cache_len(self) -> int:
        return self.owner.storage.slots

    @property
    def device(self) -> torch.device:
        return self.owner.storage.device

    def get_seq_length(self) -> int:
        return self.owner.storage.used

    def get_max_length(self) -> int:
        return self.owner.storage.slots if self.owner.static else -1

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        if self.owner.static:
            return self.owner.storage.slots, 0
        length = query_length.shape[-1] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.owner.storage.used + length, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The storage exists from the start."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.update(key_states, value_states, self.index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.index})"


class KVCache:
    """past_key_values: transformers' Cache API (get_seq_length, update, crop, reorder_cache,
    batch_select_indices, batch_repeat_interleave, layers, ...) over `storage`, which the engine
    writes directly. Every row holds the same number of tokens (padding included), as in transformers."""

    def __init__(self, storage: StaticKVCache, static: bool = False) -> None:
        self.storage = storage
        self.static = static
        self.layers = [_LayerView(self, i) for i in range(storage.keys.shape[0])]
        self.layer_class_to_replicate = None
        self.offloading = False

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self.layers)}, batch={self.storage.batch}, tokens={self.storage.used})"

    @property
    def batch_size(self) -> int:
        return self.storage.batch

    max_batch_size = batch_size

    @property
    def max_cache_len(self) -> int:
        return self.storage.max_seq

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def shown(self) -> int:
        """How many slots a layer's keys and values show: those in use, or all of a static cache's."""
        return self.storage.slots if self.static else self.storage.used

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.storage.used

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.layers[0].get_max_length()

    get_max_cache_shape = get_max_length

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[0].get_mask_sizes(query_length)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.storage.used

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' forward writing one layer's new K, V [batch, heads, tokens, head_dim] at the next
        slots; returns the layer's keys and values up to them. The last layer's call advances the cache."""
        storage = self.storage
        batch, _, tokens, _ = key_states.shape
        if layer_idx == 0:
            storage.reserve(batch, tokens)
        start, end = storage.used, storage.used + tokens
        storage.keys[layer_idx, :batch, :, start:end] = key_states.to(storage.dtype)
        storage.values[layer_idx, :batch, :, start:end] = value_states.to(storage.dtype)
        shown = storage.slots if self.static else end
        keys, values = storage.keys[layer_idx, :batch, :, :shown], storage.values[layer_idx, :batch, :, :shown]
        if layer_idx == len(self.layers) - 1:
            storage.key_mask[:batch, start:end] = 1
            storage.lengths[:batch] = end
            storage.next_position[:batch] += tokens
            storage.advance(batch, tokens)
        return keys, values

    def reset(self) -> None:
        self.storage.reset()

    def crop(self, tokens: int) -> None:
        """crop(-n) removes the last n tokens, crop(0) none (transformers 5); crop(n) for n > 0 keeps
        the first n (transformers 4's max_length)."""
        self.storage.crop(tokens if tokens > 0 else self.storage.used + tokens)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.storage.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.storage.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.storage.select_rows(torch.arange(self.storage.batch).repeat_interleave(repeats))

    def offload(self, *args: Any, **kwargs: Any) -> None:
        """The storage stays where the engine computes."""

    def prefetch(self, *args: Any, **kwargs: Any) -> None:
        """The storage stays where the engine computes."""


@functools.cache
def _cache_class(static: bool) -> type:
    """KVCache, made a transformers DynamicCache (StaticCache when static) too where transformers is
    installed: what code that checks the kind of a generation's cache expects."""
    try:
        from transformers import DynamicCache, StaticCache
    except ImportError:
        return KVCache
    base = StaticCache if static else DynamicCache
    return type("KVCache", (KVCache, base), {"__doc__": KVCache.__doc__, "__module__": __name__})


def new_cache(storage: StaticKVCache, static: bool = False) -> KVCache:
    return _cache_class(static)(storage, static)


def static_length(cache: Any) -> int | None:
    """The slots of a transformers StaticCache (which generate makes for cache_implementation="static"), else None."""
    try:
        from transformers import StaticCache
    except ImportError:
        return None
    if not isinstance(cache, StaticCache) or not cache.layers:
        return None
    return getattr(cache.layers[0], "max_cache_len", None)
