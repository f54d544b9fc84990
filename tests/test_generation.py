"""Sampling and the generate loop (torch backend; the kernels are covered by test_engine)."""

import pytest
import torch

from checkpoints import save_model
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.generation import (
    SamplingParams, exponential_race, filter_logits, generate, inverse_transform, next_tokens, stream_tokens,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder, _ = save_model(tmp_path_factory.mktemp("gen"))
    return Engine.from_pretrained(folder, backend="torch", max_batch=4)


def prompt(batch=2, seq=5, seed=0):
    return torch.randint(0, 300, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 0.9, 1.0), (7, 1.0, 0.7), (5, 0.5, 1.3), (0, 1.0, 2.0)])
def test_filters_match_transformers_warpers(top_k, top_p, temperature):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(logits, SamplingParams(True, temperature, top_k, top_p))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got.softmax(-1), expected.softmax(-1))  # ours are shifted by each row's max
    assert torch.equal(got.amax(-1), torch.zeros(4))  # draw_tokens takes each row's largest score to be 0


def test_sampling_is_reproducible_from_a_seed_or_a_generator(engine):
    ids = prompt()
    options = dict(max_new_tokens=6, do_sample=True, temperature=1.5, eos_token_id=[])
    a = generate(engine, ids, seed=11, **options)
    b = generate(engine, ids, generator=torch.Generator().manual_seed(11), **options)
    c = generate(engine, ids, seed=12, **options)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_degenerate_sampling_is_greedy(engine):
    ids = prompt()
    greedy = generate(engine, ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(generate(engine, ids, max_new_tokens=6, do_sample=True, top_k=1, seed=0, eos_token_id=[]), greedy)
    assert torch.equal(generate(engine, ids, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=0, eos_token_id=[]), greedy)


def test_sampled_tokens_follow_the_distribution(engine):
    # At temperature 1 with top-k 3, every sampled token is one of the 3 most likely, and over many
    # draws each of them shows up.
    ids = prompt(1, 4)
    logits = engine.prefill(ids).logits
    top3 = set(torch.topk(logits, 3).indices[0].tolist())
    draws = {generate(engine, ids, max_new_tokens=1, do_sample=True, top_k=3, seed=s)[0, -1].item() for s in range(60)}
    assert draws == top3


@pytest.mark.parametrize(
    "params", [SamplingParams(True), SamplingParams(True, 0.7, 4), SamplingParams(True, 1.3, 0, 0.8)], ids=["plain", "top-k", "top-p"]
)
def test_sampled_frequencies_are_the_softmax_probabilities(params):
    # 40,000 draws from one row of logits (each row of the batch draws its own noise), counted against
    # the probabilities of the filtered softmax by Pearson's chi-square. With k tokens kept it has k - 1
    # degrees of freedom: mean k - 1, standard deviation sqrt(2 (k - 1)); ten of those above the mean
    # is beyond a one-in-a-million draw, and the seed is fixed. Sampling without the softmax scores
    # in the thousands.
    logits = torch.tensor([[2.0, 1.0, 0.5, -0.5, -1.0, -3.0, 0.0, 1.5]])
    draws = 40_000
    probs = filter_logits(logits, params).softmax(-1)[0].double()
    tokens = next_tokens(logits.expand(draws, -1), params, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=logits.shape[1]).double()
    kept = probs > 0
    assert kept.sum() < logits.shape[1] or params.top_k == 0 and params.top_p == 1
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    expected = probs[kept] * draws
    chi_square = ((counts[kept] - expected) ** 2 / expected).sum().item()
    freedom = int(kept.sum()) - 1
    assert chi_square < freedom + 10 * (2 * freedom) ** 0.5, f"chi-square {chi_square:.1f} over {freedom} degrees of freedom"


def test_draws_at_the_ends_of_the_uniform_range_stay_on_kept_tokens():
    # Rows whose first, last or middle tokens are filtered out (weight 0), drawn with the smallest and
    # the largest uniform numbers torch.rand gives: u = 0 takes the last kept token, u just under 1 the first.
    weights = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    largest = 1 - 2.0 ** -24
    for uniform, expected in ((0.0, [2, 3, 0, 2]), (largest, [1, 3, 0, 0])):
        assert inverse_transform(weights.clone(), torch.full((4,), uniform)).tolist() == expected, uniform
    # u splits a row's mass: at 0.5 the first of two equal tokens still has all of the lower half.
    assert inverse_transform(weights[3:].clone(), torch.tensor([0.5])).tolist() == [0]
    assert inverse_transform(weights[3:].clone(), torch.tensor([0.4])).tolist() == [2]


@pytest.mark.parametrize("temperature", [1e-38, 1e-30])
def test_a_vanishing_temperature_draws_the_most_likely_token(temperature):
    # logits / temperature overflows: the largest finite float stands for inf, so no row is NaN and
    # the draw is the limit, the most likely token (every draw in range).
    logits = torch.tensor([[-3.0, 2.5, 1.0, -0.5], [4.0, -1.0, 3.9, 0.0]])
    params = SamplingParams(True, temperature)
    for seed in range(20):
        assert next_tokens(logits, params, torch.Generator().manual_seed(seed)).tolist() == [1, 0]
    broken = torch.tensor([[float("nan"), 1.0, 0.0, -1.0]])
    assert 0 <= next_tokens(broken, SamplingParams(True), None).item() < 4


def test_the_gpus_exponential_race_follows_the_distribution():
    # The draw a GPU runs, run here on the CPU: 40,000 rows of one set of weights, each token's
    # count against its probability (chi-square with 3 degrees of freedom: the mean plus ten
    # standard deviations is beyond a one-in-a-million draw); a weight of 0 is never drawn.
    weights = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    draws = 40_000
    tokens = exponential_race(weights.expand(draws, -1).clone(), [torch.Generator().manual_seed(0)])
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[weights == 0].sum() == 0
    kept = weights > 0
    expected = weights[kept].double() / weights.sum() * draws
    chi_square = ((counts[kept] - expected) ** 2 / expected).sum().item()
    assert chi_square < 3 + 10 * 6 ** 0.5, chi_square
    # One generator per row: row r's noise is what its generator gives a row alone.
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    together = exponential_race(torch.rand(2, 50, generator=torch.Generator().manual_seed(9)), generators)
    alone = [exponential_race(torch.rand(2, 50, generator=torch.Generator().manual_seed(9))[r:r + 1],
                              [torch.Generator().manual_seed(s)]).item() for r, s in ((0, 1), (1, 2))]
    assert together.tolist() == alone


def test_eos_stops_each_row_and_pads_it(engine):
    ids = prompt(2, 5, seed=2)
    free = generate(engine, ids, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 7])  # row 0 emits it as its 3rd new token
    first_row0 = (free[0, 5:] == eos).nonzero()[0].item()
    out = generate(engine, ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=299)
    row0 = out[0, 5:]
    assert row0[first_row0] == eos and (row0[first_row0 + 1:] == 299).all()
    hit1 = (free[1, 5:] == eos).nonzero()
    if len(hit1) == 0:
        assert torch.equal(out[1], free[1]), "a row without EOS runs to max_new_tokens"


def test_generation_stops_when_every_row_has_finished(engine):
    ids = prompt(1, 5, seed=2)
    free = generate(engine, ids, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 6])
    first = (free[0, 5:] == eos).nonzero()[0].item()
    out = generate(engine, ids, max_new_tokens=8, eos_token_id=eos)
    assert out.shape[1] == 5 + first + 1
    assert torch.equal(out[0], free[0, : 5 + first + 1])


def test_streaming_yields_tokens_in_order(engine):
    ids = prompt(2, 5, seed=4)
    seen = []
    out = generate(engine, ids, max_new_tokens=5, eos_token_id=[], streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, 5:])
    streamed = list(stream_tokens(engine, ids, max_new_tokens=5, eos_token_id=[]))
    assert torch.equal(torch.stack(streamed, 1), out[:, 5:])


@pytest.mark.parametrize(
    "options,message",
    [
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"top_k": -1}, "top_k=-1"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"max_new_tokens": 70}, "leaves room for 60 new ones"),
        ({"seed": 1, "generator": torch.Generator()}, "seed or generator"),
    ],
)
def test_bad_generation_options(engine, options, message):
    with pytest.raises(ValueError, match=message):
        generate(engine, prompt(), **options)


@pytest.mark.parametrize(
    "ids,message",
    [
        (torch.zeros(1, 70, dtype=torch.long), "a prompt of 70 tokens is longer than the model's context of max_seq=64 tokens"),
        ([[1, 2, 3]], r"input_ids must be a torch.Tensor of \[batch, seq\] \(or \[seq\]\), got list"),
        (torch.tensor(3), r"input_ids must be a torch.Tensor of \[batch, seq\] \(or \[seq\]\), got \(\)"),
    ],
)
def test_bad_prompts_are_refused_when_the_stream_is_made(engine, ids, message):
    with pytest.raises(ValueError, match=message):
        stream_tokens(engine, ids)  # not iterated: the call itself checks


def test_each_step_is_queued_before_the_previous_tokens_reach_the_host(engine, monkeypatch):
    # On a GPU the device then computes step t + 1 while the host streams step t.
    events = []
    decode = engine.decode
    monkeypatch.setattr(engine, "decode", lambda *args, **kwargs: events.append("decode") or decode(*args, **kwargs))
    for _ in stream_tokens(engine, prompt(), max_new_tokens=4, eos_token_id=[]):
        events.append("tokens")
    assert events == ["decode", "tokens"] * 3 + ["tokens"], "no decode after the last step"
