"""GPT-2's byte-level BPE tokenizer, loaded from a checkpoint folder through `tokenizers`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

ENDOFTEXT = "<|endoftext|>"
T = TypeVar("T")


class GPT2Tokenizer:
    """encode/decode with the folder's tokenizer.json, or vocab.json with merges.txt.
    tokenizer_config.json's add_prefix_space and add_bos_token are honoured (both off for GPT-2)."""

    def __init__(self, tokenizer: Tokenizer, *, add_bos_token: bool = False, bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> None:
        if add_bos_token and bos_token_id is None:
            raise ValueError("add_bos_token is set but the tokenizer has no bos token")
        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> GPT2Tokenizer:
        folder = Path(folder)
        settings = _read_json(folder / "tokenizer_config.json")
        add_prefix_space = bool(settings.get("add_prefix_space", False))
        if (folder / "tokenizer.json").is_file():
            tokenizer = _read(folder / "tokenizer.json", lambda: Tokenizer.from_file(str(folder / "tokenizer.json")))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            files = folder / "vocab.json", folder / "merges.txt"
            tokenizer = Tokenizer(_read(files, lambda: BPE.from_file(*map(str, files))))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
            tokenizer.decoder = decoders.ByteLevel()
            tokenizer.add_special_tokens([token for token in (ENDOFTEXT,) if tokenizer.token_to_id(token) is not None])
        else:
            raise ValueError(f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json with merges.txt")
        if "add_prefix_space" in settings and isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
            tokenizer.pre_tokenizer.add_prefix_space = add_prefix_space
        eos = _token_id(tokenizer, settings.get("eos_token", ENDOFTEXT))
        bos = _token_id(tokenizer, settings.get("bos_token", ENDOFTEXT))
        return cls(tokenizer, add_bos_token=bool(settings.get("add_bos_token", False)), bos_token_id=bos, eos_token_id=eos)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.add_bos_token else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def _read(files: Path | tuple[Path, ...], load: Callable[[], T]) -> T:
    """load(), with the tokenizers library's errors (plain Exceptions) as a ValueError naming the files."""
    try:
        return load()
    except Exception as error:  # noqa: BLE001 - tokenizers raises bare Exceptions
        names = " and ".join(map(str, files)) if isinstance(files, tuple) else str(files)
        raise ValueError(f"{names}: not a readable tokenizer: {error}") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON file: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, not an object of settings")
    return values


def _token_id(tokenizer: Tokenizer, token: str | dict | None) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if token else None
