"""GPT-2 tokenizer files for the tests: the real ones from ../shared/gpt2-tokenizer when present,
else a small byte-level BPE trained here, so the tests pass on a checkout without ../shared."""

from __future__ import annotations

import shutil
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "gpt2-tokenizer"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, my name is GPT-2 and I like to write text.",
    "Once upon a time there was a little model that could predict the next token.",
    "The weather today is sunny with a chance of rain in the afternoon.",
] * 20


def write_tokenizer(folder: Path) -> int:
    """Put vocab.json and merges.txt in `folder`; returns the vocabulary size."""
    import json

    if (SHARED / "vocab.json").is_file() and (SHARED / "merges.txt").is_file():
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(SHARED / name, folder / name)
    else:
        from tokenizers import ByteLevelBPETokenizer

        trained = ByteLevelBPETokenizer()
        trained.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
        trained.save_model(str(folder))
    return len(json.loads((folder / "vocab.json").read_text()))
