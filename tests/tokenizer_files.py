"""GPT-2 tokenizer files for the tests: the real ones from ../shared/gpt2-tokenizer when present,
else a small byte-level BPE trained here, so the tests pass on a checkout without ../shared."""

from __future__ import annotations

import json
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
    if (SHARED / "vocab.json").is_file() and (SHARED / "merges.txt").is_file():
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(SHARED / name, folder / name)
    else:
        from tokenizers import ByteLevelBPETokenizer

        trained = ByteLevelBPETokenizer()
        trained.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
        trained.save_model(str(folder))
    return len(json.loads((folder / "vocab.json").read_text()))


def save_model_with_tokenizer(folder: Path, *args, **overrides):
    """checkpoints.save_model over the tokenizer's vocabulary, <|endoftext|> its bos and eos token
    (the last id in GPT-2's vocabulary, the first in the one trained here)."""
    from checkpoints import save_model

    vocab = write_tokenizer(folder)
    endoftext = json.loads((folder / "vocab.json").read_text())["<|endoftext|>"]
    return save_model(folder, *args, vocab_size=vocab, bos_token_id=endoftext, eos_token_id=endoftext, **overrides)


def hf_tokenizer(folder: Path, **options):
    """transformers' tokenizer over the folder's vocab.json and merges.txt."""
    import transformers

    return transformers.GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"), **options)
