"""past_key_values for the drop-in classes: a handle on the engine's static cache."""

from __future__ import annotations

from dataclasses import dataclass

from tritongpt2.engine.engine import Engine


@dataclass(frozen=True)
class StaticCacheHandle:
    """What a forward returns as past_key_values. The keys and values stay in the engine's static
    cache; the handle says which state of it they are, and is refused once the cache has moved on
    (a later forward that did not continue from it, or a reset)."""

    engine: Engine
    epoch: int
    length: int
    batch: int

    @classmethod
    def of(cls, engine: Engine) -> StaticCacheHandle:
        cache = engine.cache
        return cls(engine, cache.epoch, cache.used, cache.batch)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def check_current(self, engine: Engine) -> None:
        cache = engine.cache
        if self.engine is not engine:
            raise ValueError("past_key_values comes from another model")
        if (cache.epoch, cache.used) != (self.epoch, self.length):
            raise ValueError(
                f"past_key_values is stale: it holds {self.length} tokens, but the model has run other "
                "inputs since; pass the past_key_values of the latest forward"
            )
