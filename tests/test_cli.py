"""The tritongpt2 command end to end, on a random-weight checkpoint with GPT-2's tokenizer files."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tokenizer_files import hf_tokenizer, save_model_with_tokenizer
from tritongpt2.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model_with_tokenizer(tmp_path_factory.mktemp("cli"), n_layer=2)


def cli(*args, stdin=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "tritongpt2.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=env, timeout=600)


def hf_greedy_text(folder, model, prompt, new_tokens):
    tokenizer = hf_tokenizer(folder)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:])


def test_greedy_generation_text_equals_transformers(checkpoint):
    folder, model = checkpoint
    prompt = "Hello, my name is"
    result = cli("generate", "--model", folder, "--max-new-tokens", 12, prompt)
    assert result.returncode == 0, result.stderr
    assert result.stdout == hf_greedy_text(folder, model, prompt, 12) + "\n"


def test_prompt_from_standard_input_and_sampling(checkpoint):
    folder, _ = checkpoint
    first = cli("generate", "--model", folder, "--max-new-tokens", 6, "--top-k", 5, "--seed", 3, stdin="The weather\n")
    again = cli("generate", "--model", folder, "--max-new-tokens", 6, "--top-k", 5, "--seed", 3, stdin="The weather\n")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("The weather") and first.stdout == again.stdout


def test_errors_are_one_clear_line(checkpoint, tmp_path):
    result = cli("generate", "--model", tmp_path / "missing", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"tritongpt2: error: no checkpoint folder at {tmp_path / 'missing'}"]
    folder, _ = checkpoint
    result = cli("embed", "--model", folder, stdin="")
    assert result.returncode == 2
    assert result.stderr.strip() == "tritongpt2: error: no text to embed: give texts as arguments, or on standard input one per line"


@pytest.mark.parametrize("pooling", ["mean", "last", "first"])
def test_embed_writes_json_and_npy(checkpoint, tmp_path, pooling):
    folder, model = checkpoint
    texts = ["The quick brown fox", "Hello"]
    result = cli("embed", "--model", folder, "--pooling", pooling, "--normalize", *texts)
    assert result.returncode == 0, result.stderr
    vectors = np.array(json.loads(result.stdout)["embeddings"])
    assert vectors.shape == (2, 80)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    out = tmp_path / "vectors.npy"
    assert cli("embed", "--model", folder, "--pooling", pooling, "--normalize", "--output", out, *texts).returncode == 0
    np.testing.assert_allclose(np.load(out), vectors, rtol=1e-6)


def run_main(capsys, *args, stdin=None, monkeypatch=None):
    """The command in this process: (exit status, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def broken(folder, tmp_path, change):
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    change(copy)
    return copy


BROKEN = {
    "truncated safetensors": ("model.safetensors", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:999])),
    "config null": ("config.json", lambda f: (f / "config.json").write_text("null")),
    "config field": ("config.json", lambda f: (f / "config.json").write_text('{"layer_norm_epsilon": "x"}')),
    "garbage vocab.json": ("vocab.json", lambda f: (f / "vocab.json").write_text("garbage")),
    "garbage .bin": ("pytorch_model.bin", lambda f: (f / "model.safetensors").unlink() or (f / "pytorch_model.bin").write_bytes(b"x")),
}


@pytest.mark.parametrize("command", ["generate", "embed"])
@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_checkpoint_is_one_line_and_status_2(checkpoint, tmp_path, capsys, command, case):
    name, change = BROKEN[case]
    folder = broken(checkpoint[0], tmp_path, change)
    status, out, err = run_main(capsys, command, "--model", folder, "hello")
    assert status == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith(f"tritongpt2: error: {folder / name}")


def test_temperature_0_is_greedy(checkpoint, capsys):
    folder, model = checkpoint
    prompt = "Hello, my name is"
    greedy = hf_greedy_text(folder, model, prompt, 8) + "\n"
    for options in (["--temperature", 0], ["--temperature", 0, "--top-k", 5, "--seed", 1]):
        assert run_main(capsys, "generate", "--model", folder, "--max-new-tokens", 8, *options, prompt) == (0, greedy, "")
    status, sampled, _ = run_main(capsys, "generate", "--model", folder, "--max-new-tokens", 8, "--temperature", 1, "--seed", 0, prompt)
    assert status == 0 and sampled != greedy


@pytest.mark.parametrize(
    "options,message",
    [
        (["--top-p", 0], r"top_p=0.0 must be in \(0, 1\]"),
        (["--top-p", 1.5], r"top_p=1.5 must be in \(0, 1\]"),
        (["--temperature", -1], "temperature=-1.0 must be a positive number"),
        (["--top-k", -2], r"top_k=-2 must be a non-negative integer \(0 turns it off\)"),
        (["--max-new-tokens", 0], "max_new_tokens=0 must be a positive integer"),
    ],
)
def test_sampling_options_are_checked_as_the_python_api_checks_them(checkpoint, capsys, options, message):
    status, out, err = run_main(capsys, "generate", "--model", checkpoint[0], *options, "Hello")
    assert status == 2 and out == ""
    assert re.fullmatch(f"tritongpt2: error: {message}\n", err)


@pytest.mark.parametrize("options,message", [
    (["--double-quant"], "group_size=None and double_quant=True need a quantization format"),
    (["--quantization", "int4", "--group-size", "48"], "group_size=48 is not one of int4's 32, 64, 128"),
])
def test_the_traffic_audit_checks_its_quantization_before_counting(capsys, monkeypatch, tmp_path, options, message):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main(capsys, "audit", "traffic", *options)
    assert status == 2 and out == ""
    assert err == f"tritongpt2: error: {message}\n"
    assert list(tmp_path.iterdir()) == []  # no results folder made


def test_a_prompt_longer_than_the_model_says_so(checkpoint, capsys):
    status, out, err = run_main(capsys, "generate", "--model", checkpoint[0], "hello " * 100)
    assert status == 2 and out == ""
    assert re.fullmatch(r"tritongpt2: error: a prompt of \d+ tokens is longer than the model's context of max_seq=64 "
                        r"tokens; shorten it to leave room for new ones\n", err)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--help"])
    assert exited.value.code == 0
    assert "(default: 50)" in " ".join(capsys.readouterr().out.split())


def test_embed_reads_texts_from_standard_input_one_per_line(checkpoint, capsys, monkeypatch):
    folder, _ = checkpoint
    status, given, _ = run_main(capsys, "embed", "--model", folder, "The quick brown fox", "Hello")
    assert status == 0
    assert run_main(capsys, "embed", "--model", folder, stdin="The quick brown fox\n\nHello\n", monkeypatch=monkeypatch) == (0, given, "")


def test_embed_says_which_file_it_wrote_and_warns_of_long_texts(checkpoint, capsys, tmp_path):
    folder, _ = checkpoint
    status, out, err = run_main(capsys, "embed", "--model", folder, "--output", tmp_path / "e2", "Hello", "hello " * 100)
    assert status == 0 and out == "" and (tmp_path / "e2.npy").exists()
    warning, wrote = err.strip().splitlines()
    assert warning.startswith("tritongpt2: warning: 1 text(s) longer than the model's context of max_seq=64 tokens (texts[1] has ")
    assert wrote == f"wrote {tmp_path / 'e2.npy'}"
    status, _, err = run_main(capsys, "embed", "--model", folder, "--output", tmp_path / "e3.npy", "Hello")
    assert status == 0 and err == f"wrote {tmp_path / 'e3.npy'}\n" and (tmp_path / "e3.npy").exists()
