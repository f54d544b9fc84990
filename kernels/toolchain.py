"""The installed Triton's release, for the choices that differ between Triton versions."""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=None)  # a launcher asks at every launch
def triton_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a Triton version string, by default the installed triton's."""
    if version is None:
        import triton

        version = triton.__version__
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    return major, minor
