"""Reading a Hugging Face GPT-2 checkpoint folder: config.json and the weight files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import GPT2Config

SAFETENSORS = "model.safetensors"
# A quantized save's weights: not model.safetensors, so that transformers, which cannot read them,
# refuses the folder (no weights file) instead of loading it with freshly initialised weights.
QUANTIZED_SAFETENSORS = "model.tritongpt2-quantized.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
HUB_FILES = ["*.json", "*.safetensors", "merges.txt"]
# Only for repositories without safetensors: .bin files of the big models are several GB.
HUB_BIN_FILES = ["pytorch_model*.bin"]


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local checkpoint folder, or a hub id downloaded through huggingface_hub when it is installed
    and the network answers."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; give the checkpoint folder that holds config.json")
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ValueError(f"no checkpoint folder at {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{text!r} is not a local folder, and downloading it needs huggingface_hub (not installed)") from None
    try:
        folder = Path(snapshot_download(text, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(text, allow_patterns=HUB_BIN_FILES))
        return folder
    except Exception as error:  # noqa: BLE001 - hub errors are many; all mean the same to the user
        raise ValueError(
            f"{text!r} is not a local folder and could not be downloaded from the Hugging Face hub "
            f"(no network, or no such model?): {type(error).__name__}: {error}"
        ) from None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder's config and every tensor in its weight files (base model and head)."""

    folder: Path
    config: GPT2Config
    state: dict[str, torch.Tensor]


def load_checkpoint(name_or_path: str | Path) -> Checkpoint:
    """config.json and the weights of a folder or hub id; ValueError naming the file at fault."""
    folder = resolve_model_dir(name_or_path)
    return Checkpoint(folder, load_config(folder), load_state_dict(folder))


def load_config(folder: Path) -> GPT2Config:
    return GPT2Config.from_json_file(folder / "config.json")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - unpickling refuses anything but tensors
            raise ValueError(
                f"{path} could not be loaded as a weights-only PyTorch file (truncated, corrupt, or holding more than "
                f"tensors?): {_unpickling_reason(error)}"
            ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of named tensors")
    wrong = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if wrong is not None:
        raise ValueError(f"{path} holds {wrong[0]!r}: {type(wrong[1]).__name__}, not a dict of named tensors")
    return state


def _unpickling_reason(error: Exception) -> str:
    """One line from torch.load's error: the weights-only unpickler's own reason when it gave one (its
    message is paragraphs of advice around it)."""
    _, found, reason = str(error).partition("WeightsUnpickler error:")
    reason = (reason if found else str(error)).split("Check the documentation")[0]
    first = " ".join(reason.split()).split(". ")[0]
    return first or type(error).__name__


def _load_sharded(folder: Path, index_name: str) -> dict[str, torch.Tensor]:
    path = folder / index_name
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path} has no weight_map of tensor names to shard files")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or not (folder / shard).is_file():
            raise ValueError(f"{path} names the shard {shard!r}, which is not a file in {folder}")
        state.update(_load_file(folder / shard))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ValueError(f"{path} lists tensors its shards do not hold: {', '.join(missing[:5])}")
    return state


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, from the first of: model.safetensors, tritongpt2's quantized
    save, the sharded index, pytorch_model.bin (weights only), its sharded index."""
    for name in (SAFETENSORS, QUANTIZED_SAFETENSORS):
        if (folder / name).is_file():
            return _load_file(folder / name)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _load_sharded(folder, SAFETENSORS_INDEX)
    if (folder / PYTORCH_BIN).is_file():
        return _load_file(folder / PYTORCH_BIN)
    if (folder / PYTORCH_BIN_INDEX).is_file():
        return _load_sharded(folder, PYTORCH_BIN_INDEX)
    raise ValueError(
        f"no weights in {folder}: expected {SAFETENSORS}, {QUANTIZED_SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN} "
        f"or {PYTORCH_BIN_INDEX}"
    )
