"""README's Python examples run as written, each on its own, on a random-weight checkpoint folder in
place of "path/to/gpt2" (no network)."""

import json
import re
from pathlib import Path

import pytest

from checkpoints import save_model
from tokenizer_files import write_tokenizer

pytest.importorskip("transformers")
README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """GPT-2's vocabulary size (the examples use real token ids) on a small model (wide enough for nf4's
    blocks of 64), with a tokenizer."""
    folder = tmp_path_factory.mktemp("readme")
    write_tokenizer(folder)
    endoftext = json.loads((folder / "vocab.json").read_text())["<|endoftext|>"]
    save_model(folder, vocab_size=50257, n_embd=64, n_layer=2, n_head=2, n_inner=None, bos_token_id=endoftext,
               eos_token_id=endoftext)
    return folder


SERVER_URL = "http://127.0.0.1:8000/v1"


def test_readme_has_the_examples():
    assert len(SNIPPETS) == 6
    assert all('"path/to/gpt2"' in snippet or SERVER_URL in snippet for snippet in SNIPPETS)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"example-{i + 1}" for i in range(len(SNIPPETS))])
def test_readme_example_runs_as_written(folder, snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what an example saves lands there
    if SERVER_URL in snippet:
        pytest.importorskip("openai")
        run_against_a_server(folder, snippet)
        return
    code = snippet.replace('"path/to/gpt2"', repr(str(folder)))
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})  # a namespace of its own: nothing borrowed


def run_against_a_server(folder, snippet):
    """The client example against `tritongpt2 serve --model path/to/gpt2` (model id "gpt2"), on a free port."""
    from tritongpt2.engine.options import EngineOptions
    from tritongpt2.serve.app import ServeSettings
    from tritongpt2.serve.server import SchedulerOptions, ServerThread, app_for_model

    app = app_for_model(folder, EngineOptions(backend="torch", max_batch=2, max_seq=64), SchedulerOptions(), ServeSettings("gpt2"))
    with ServerThread(app) as server:
        code = snippet.replace(SERVER_URL, server.url + "/v1")
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
