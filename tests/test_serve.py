"""The OpenAI-compatible server against the official `openai` client, on 127.0.0.1: completions
(whole and streamed), embeddings, bad requests, backpressure, disconnects, API keys and metrics.
Greedy completions and embeddings are compared with the engine's own results, computed on an
engine of their own over the same checkpoint."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
import time
import warnings

import httpx
import numpy as np
import pytest
import torch

from tokenizer_files import save_model_with_tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("transformers")

from tritongpt2.embedder import Embedder  # noqa: E402
from tritongpt2.engine.engine import Engine  # noqa: E402
from tritongpt2.engine.generation import generate  # noqa: E402
from tritongpt2.engine.options import EngineOptions  # noqa: E402
from tritongpt2.engine.tokenizer import GPT2Tokenizer  # noqa: E402
from tritongpt2.serve.app import ServeSettings  # noqa: E402
from tritongpt2.serve.server import SchedulerOptions, ServerThread, app_for_engine, app_for_model, warn_if_exposed  # noqa: E402

MODEL = "tiny-gpt2"
TEXTS = ["The quick brown fox", "Hello, my name is", "Once upon a time there was", "rain", "The weather today",
         "a model that could predict", "jumps over the lazy dog.", "I like to write text"]
OPTIONS = EngineOptions(backend="torch", max_batch=8, max_seq=256)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    save_model_with_tokenizer(folder, n_embd=32, n_layer=2, n_head=2, n_inner=None, n_positions=256)
    return folder


@pytest.fixture(scope="module")
def tokenizer(folder):
    return GPT2Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder):
    """An engine of the test's own: the server's engine belongs to its scheduler."""
    return Engine.from_pretrained(folder, EngineOptions(backend="torch", max_batch=4, max_seq=256))


def start(folder, tokenizer, options=OPTIONS, scheduling=SchedulerOptions(max_queue=64), **settings):
    engine = Engine.from_pretrained(folder, options)
    return engine, ServerThread(app_for_engine(engine, tokenizer, scheduling, ServeSettings(MODEL, **settings)))


@pytest.fixture(scope="module")
def server(folder, tokenizer):
    _, thread = start(folder, tokenizer)
    with thread:
        yield thread


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(reference, tokenizer, prompt, max_tokens):
    """The engine's own greedy completion: (text, finish_reason, completion tokens)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    out = generate(reference, torch.tensor([ids]), max_new_tokens=max_tokens, eos_token_id=tokenizer.eos_token_id)
    tokens = out[0, len(ids):].tolist()
    if tokenizer.eos_token_id in tokens:
        end = tokens.index(tokenizer.eos_token_id)
        return tokenizer.decode(tokens[:end]), "stop", end + 1
    return tokenizer.decode(tokens), "length", len(tokens)


def metric(server, name):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    found = re.findall(rf"^{re.escape(name)} (\S+)$", text, flags=re.MULTILINE)
    return float(found[0]) if found else None


def test_greedy_completions_equal_the_engines_own(server, client, reference, tokenizer):
    expected = [greedy(reference, tokenizer, text, 12) for text in TEXTS[:3]]
    assert len({text for text, _, _ in expected}) == 3  # the model is not blind to its prompt
    got = client.completions.create(model=MODEL, prompt=TEXTS[:3], max_tokens=12, temperature=0)
    assert [(c.index, c.text, c.finish_reason) for c in got.choices] == [(i, e[0], e[1]) for i, e in enumerate(expected)]
    prompt_tokens = sum(len(tokenizer.encode(t)) for t in TEXTS[:3])
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, sum(e[2] for e in expected))
    ids = tokenizer.encode(TEXTS[3])
    single = client.completions.create(model=MODEL, prompt=ids, max_tokens=7, temperature=0)
    assert single.choices[0].text == greedy(reference, tokenizer, ids, 7)[0]
    echoed = client.completions.create(model=MODEL, prompt=TEXTS[4], max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == TEXTS[4] + greedy(reference, tokenizer, TEXTS[4], 5)[0]
    default = httpx.post(server.url + "/v1/completions", timeout=30,
                         json={"model": MODEL, "prompt": TEXTS[4], "max_tokens": None, "temperature": 0}).json()
    assert default["choices"][0]["text"] == greedy(reference, tokenizer, TEXTS[4], 16)[0]  # OpenAI's default, 16


def test_streaming_sends_a_chunk_per_token_then_usage(server, client, reference, tokenizer):
    text, reason, tokens = greedy(reference, tokenizer, TEXTS[5], 20)
    chunks = list(client.completions.create(model=MODEL, prompt=TEXTS[5], max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    *token_chunks, usage_chunk = chunks
    assert len(token_chunks) == tokens == usage_chunk.usage.completion_tokens and usage_chunk.choices == []
    assert "".join(c.choices[0].text for c in token_chunks) == text
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * (tokens - 1) + [reason]


def test_stop_strings_cut_the_completion_whole_and_streamed(server, client, reference, tokenizer):
    text, _, _ = greedy(reference, tokenizer, TEXTS[0], 30)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    whole = client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=30, temperature=0, stop=[stop, "\x00"])
    assert whole.choices[0].text == text[: text.index(stop)] and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 30
    streamed = client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_seeded_sampling_repeats_and_gives_n_choices(server, client, reference, tokenizer):
    ask = dict(model=MODEL, prompt=TEXTS[1], max_tokens=10, temperature=0.9, top_p=0.95, seed=7, n=3)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1  # each choice draws its own tokens
    # Choice 0 is what the engine's own sampling draws with the same seed.
    ids = tokenizer.encode(TEXTS[1])
    out = generate(reference, torch.tensor([ids]), max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95, seed=7,
                   eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    assert texts[0] == tokenizer.decode(out)


def test_embeddings_equal_the_embedders(server, client, reference, tokenizer):
    expected = Embedder(reference, tokenizer)(TEXTS)
    as_base64 = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 and decodes it
    as_floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    for response in (as_base64, as_floats):
        assert [d.index for d in response.data] == list(range(len(TEXTS)))
        np.testing.assert_array_equal(np.array([d.embedding for d in response.data], dtype=np.float32), expected)
    assert as_floats.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS)
    ids = client.embeddings.create(model=MODEL, input=[tokenizer.encode(TEXTS[2])], encoding_format="float")
    np.testing.assert_array_equal(np.array(ids.data[0].embedding, dtype=np.float32), expected[2])


def test_32_concurrent_clients_each_get_their_own_answer_once(server, reference, tokenizer):
    """32 threads, each with its own client: half ask for completions of different prompts and
    lengths, half for embeddings; every answer is the engine's own, none lost or given twice."""
    prompts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(32)]
    lengths = [4 + (i * 7) % 17 for i in range(32)]
    expected_text = {i: greedy(reference, tokenizer, prompts[i], lengths[i])[0] for i in range(0, 32, 2)}
    expected_vectors = Embedder(reference, tokenizer)([prompts[i] for i in range(1, 32, 2)])
    answers: dict[int, list] = {i: [] for i in range(32)}
    errors = []
    barrier = threading.Barrier(32, timeout=30)

    def ask(i):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            barrier.wait()
            if i % 2 == 0:
                response = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
                answers[i].append(response.choices[0].text)
            else:
                response = client.embeddings.create(model=MODEL, input=prompts[i])
                answers[i].append(np.array(response.data[0].embedding, dtype=np.float32))
        except Exception as error:  # noqa: BLE001 - reported below with the client's index
            errors.append((i, error))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors and all(len(answers[i]) == 1 for i in range(32))
    assert {i: answers[i][0] for i in range(0, 32, 2)} == expected_text
    np.testing.assert_array_equal(np.stack([answers[i][0] for i in range(1, 32, 2)]), expected_vectors)


BAD_COMPLETIONS = [
    ({"prompt": "hi", "max_tokens": 300}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [1, 2, 10 ** 6]}, "prompt"),
    ({"prompt": [[1, 2], "text"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 9}, "n"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "hi", "bogus": 1}, "bogus"),
    ({"max_tokens": 3}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS, ids=[p for _, p in BAD_COMPLETIONS])
def test_a_bad_completion_request_is_a_400_naming_the_field(server, body, param):
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_bad_requests_through_the_client_and_the_server_serves_on(server, client, reference, tokenizer):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input=["fine", ""])
    assert refused.value.body["param"] == "input" and "input[1]" in refused.value.body["message"]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-4", prompt="hi")
    assert unknown.value.body["param"] == "model"
    malformed = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30)
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    huge = httpx.post(server.url + "/v1/embeddings", content=b"x" * (2 << 20), timeout=30)
    assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]
    missing = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
    after = client.completions.create(model=MODEL, prompt=TEXTS[2], max_tokens=6, temperature=0)
    assert after.choices[0].text == greedy(reference, tokenizer, TEXTS[2], 6)[0]


def test_models_health_and_metrics(server, client):
    # Its own requests: under xdist this module's tests spread over workers, each with its own server.
    client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=3, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=-1)
    client.embeddings.create(model=MODEL, input=TEXTS[1])
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    assert metric(server, 'tritongpt2_requests_total{route="/v1/completions",status="200"}') >= 1
    assert metric(server, 'tritongpt2_requests_total{route="/v1/completions",status="400"}') >= 1
    assert metric(server, 'tritongpt2_request_duration_seconds_count{route="/v1/embeddings"}') >= 1
    assert metric(server, "tritongpt2_generated_tokens_total") > 0
    assert metric(server, "tritongpt2_queue_depth") == 0 and metric(server, "tritongpt2_running_batch_size") == 0


def test_a_client_that_disconnects_mid_stream_frees_its_row_at_once(server):
    """The client reads three tokens of 240 and closes the stream: the server stops the request
    (its row freed, far fewer than 240 tokens generated) instead of running it to the end."""
    tokens_before = metric(server, "tritongpt2_generated_tokens_total")
    body = {"model": MODEL, "prompt": TEXTS[6], "max_tokens": 240, "temperature": 0.7, "seed": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        data = (line for line in response.iter_lines() if line.startswith("data:"))
        assert all(json.loads(next(data)[5:])["choices"][0]["finish_reason"] is None for _ in range(3))
    deadline = time.monotonic() + 10
    while metric(server, "tritongpt2_running_batch_size") != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metric(server, "tritongpt2_running_batch_size") == 0
    assert metric(server, "tritongpt2_generated_tokens_total") - tokens_before < 240


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_client_that_leaves_before_its_first_token_frees_its_row(folder, tokenizer, stream):
    """While the engine is held, the client gives up (a timeout) or closes its stream before any
    token came; by the time the engine is free the request is cancelled, and its row is freed
    after the one step that was already under way."""
    engine, thread = start(folder, tokenizer, EngineOptions(backend="torch", max_batch=2, max_seq=256))
    with thread:
        url = thread.url + "/v1/completions"
        body = {"model": MODEL, "prompt": TEXTS[0], "max_tokens": 200, "temperature": 0.7, "seed": 3, "stream": stream}
        with engine.lock:
            if stream:
                with httpx.stream("POST", url, json=body, timeout=10) as response:
                    assert response.status_code == 200
            else:
                with pytest.raises(httpx.TimeoutException):
                    httpx.post(url, json=body, timeout=1.0)
            time.sleep(0.5)  # ample time for the server to see the connection close
        deadline = time.monotonic() + 10
        while metric(thread, "tritongpt2_generated_tokens_total") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        while metric(thread, "tritongpt2_running_batch_size") != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metric(thread, "tritongpt2_running_batch_size") == 0
        assert metric(thread, "tritongpt2_generated_tokens_total") <= 2
        if not stream:
            assert metric(thread, 'tritongpt2_requests_total{route="/v1/completions",status="499"}') == 1


def test_a_full_queue_answers_503_with_retry_after_never_hangs(folder, tokenizer):
    """One row and a queue of one: while the engine is held, the first request waits in the queue and
    the second is turned away at once; the first is answered when the engine is free."""
    engine, thread = start(folder, tokenizer, EngineOptions(backend="torch", max_batch=1, max_seq=64),
                           SchedulerOptions(max_queue=1))
    with thread:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "temperature": 0}
        results = {}
        with engine.lock:  # the engine's thread cannot prefill until the test lets go
            waiting = threading.Thread(target=lambda: results.setdefault(
                "first", httpx.post(thread.url + "/v1/completions", json=body, timeout=60)))
            waiting.start()
            deadline = time.monotonic() + 10
            while metric(thread, "tritongpt2_queue_depth") != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            turned_away = httpx.post(thread.url + "/v1/completions", json=body, timeout=10)
        waiting.join(60)
    assert turned_away.status_code == 503 and turned_away.headers["retry-after"] == "1"
    assert turned_away.json()["error"]["code"] == "overloaded"
    assert results["first"].status_code == 200 and results["first"].json()["usage"]["completion_tokens"] == 3


def test_an_api_key_is_required_and_compared(folder, tokenizer):
    _, thread = start(folder, tokenizer, EngineOptions(backend="torch", max_batch=1, max_seq=64), api_key="s3cret")
    with thread:
        url = thread.url + "/v1/models"
        assert httpx.get(url, timeout=10).status_code == 401
        wrong = httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}, timeout=10).status_code == 200
        assert httpx.get(thread.url + "/health", timeout=10).status_code == 200
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_the_engine_is_built_on_a_thread_that_has_ended(folder, monkeypatch):
    # Each thread that runs torch's parallel ops keeps an OpenMP team while it lives, and libgomp cuts
    # every team's spin-wait short once their threads outnumber the CPUs: the scheduler's thread must
    # be the only one left that has run them. An error on the building thread reaches the caller.
    builders = []
    real = Engine.from_pretrained
    monkeypatch.setattr(Engine, "from_pretrained",
                        lambda *args, **kwargs: builders.append(threading.current_thread()) or real(*args, **kwargs))
    app_for_model(folder, OPTIONS, SchedulerOptions())
    assert len(builders) == 1 and builders[0] is not threading.current_thread() and not builders[0].is_alive()
    with pytest.raises(ValueError, match="max_seq=1000"):
        app_for_model(folder, EngineOptions(backend="torch", max_seq=1000), SchedulerOptions())


def test_binding_beyond_localhost_without_a_key_warns():
    with pytest.warns(UserWarning, match="beyond localhost"):
        warn_if_exposed("0.0.0.0", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_exposed("0.0.0.0", "key")
        warn_if_exposed("127.0.0.1", None)
        warn_if_exposed("::1", None)


def test_the_serve_command_serves_until_stopped(folder, unused_port):
    process = subprocess.Popen(
        [sys.executable, "-m", "tritongpt2.cli", "serve", "--model", str(folder), "--backend", "torch", "--port",
         str(unused_port), "--max-batch", "2", "--max-seq", "64", "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline, health = time.monotonic() + 60, None
        while health is None and time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{unused_port}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.json() == {"status": "ok"}, process.stderr.read() if process.poll() else ""
        models = httpx.get(f"http://127.0.0.1:{unused_port}/v1/models", timeout=5).json()
        assert models["data"][0]["id"] == folder.name
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture
def unused_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_base64_embeddings_are_little_endian_float32(server, reference, tokenizer):
    response = httpx.post(server.url + "/v1/embeddings", timeout=30,
                          json={"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(response["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(vector, Embedder(reference, tokenizer)([TEXTS[0]])[0])
    assert json.dumps(response)  # plain JSON
