"""Reading a Hugging Face GPT-2 checkpoint folder: config.json and the weight files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import GPT2Config

SAFETENSORS = "model.safetensors"
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


def load_config(folder: Path) -> GPT2Config:
    return GPT2Config.from_json_file(folder / "config.json")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling refuses anything but tensors
        raise ValueError(f"{path} could not be loaded as a weights-only PyTorch file: {error}") from None


def _load_sharded(folder: Path, index_name: str) -> dict[str, torch.Tensor]:
    index = json.loads((folder / index_name).read_text())
    shards = sorted(set(index.get("weight_map", {}).values()))
    if not shards:
        raise ValueError(f"{folder / index_name} has no weight_map")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise ValueError(f"{folder / index_name} names the shard {shard}, which is not in {folder}")
        state.update(_load_file(folder / shard))
    return state


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, from the first of: model.safetensors, its sharded index,
    pytorch_model.bin (weights only), its sharded index."""
    if (folder / SAFETENSORS).is_file():
        return _load_file(folder / SAFETENSORS)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _load_sharded(folder, SAFETENSORS_INDEX)
    if (folder / PYTORCH_BIN).is_file():
        return _load_file(folder / PYTORCH_BIN)
    if (folder / PYTORCH_BIN_INDEX).is_file():
        return _load_sharded(folder, PYTORCH_BIN_INDEX)
    raise ValueError(
        f"no weights in {folder}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN} or {PYTORCH_BIN_INDEX}"
    )
