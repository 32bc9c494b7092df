"""The continuous-batching engine: parity with transformers, chunked prefill, FIFO, abort, row reuse, sampling."""

from __future__ import annotations

import functools
import random
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import hf_model, randomize_, tiny_config

from gemma2 import Gemma2Cache, Gemma2ForCausalLM, InputError
from gemma2.engine import Engine, StepEvent
from gemma2.sampling import SamplingParams

# Each window gets its own shape, so the suite covers several layouts (MQA, GQA, odd/even layers).
SHAPES: dict[int, dict[str, Any]] = {
    2: dict(num_hidden_layers=4, num_key_value_heads=1),
    3: dict(num_hidden_layers=3),
    4: dict(num_hidden_layers=2, vocab_size=131),
    5: dict(num_hidden_layers=3),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One intra-op thread: these models are tiny, and on a busy 2-core machine more threads
    spin-wait for each other (the file ran 8x slower with 2 threads beside another process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def pair(window: int) -> tuple[Any, Gemma2ForCausalLM]:
    """transformers' Gemma2ForCausalLM (eager, float32) and ours with the same random weights (read-only)."""
    config = tiny_config(sliding_window=window, **SHAPES[window])
    hf = hf_model(config, "causal", seed=window, std=0.1)
    hf.generation_config.eos_token_id = None  # the oracle never stops early (ignore_eos on our side)
    ours = Gemma2ForCausalLM(config)
    ours.load_state_dict(hf.state_dict())
    return hf, ours.eval()


def random_prompt(vocab: int, length: int, rng: random.Random) -> list[int]:
    """Any id of the vocabulary, pad (0) and eos (1) included: the engine has no padding."""
    return [rng.randrange(vocab) for _ in range(length)]


@functools.cache
def requests_for(window: int) -> list[tuple[list[int], int, list[int]]]:
    """14 (prompt, max_new_tokens, transformers' greedy tokens) with prompts of 1 .. 3W+2 tokens."""
    hf, ours = pair(window)
    W = window
    lengths = [1, 3 * W + 2, W, W + 1, 2, 2 * W, 2 * W + 1, W, 3 * W + 2, 1, 2 * W - 1, 3, 3 * W + 1, W + 2]
    rng = random.Random(100 + window)
    out = []
    for i, n in enumerate(lengths):
        prompt = random_prompt(ours.config.vocab_size, n, rng)
        new = 3 + (5 * i) % 7  # 3 .. 9
        ids = torch.tensor([prompt])
        with torch.no_grad():
            # An explicit all-ones mask: pad ids in the prompt are real tokens, as in the engine.
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
        out.append((prompt, new, expected[0, n:].tolist()))
    return out


def full_forward_logits(model: Gemma2ForCausalLM, ids: list[int]) -> torch.Tensor:
    """The last position's logits [V] of one uncached forward over ids, float32."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


@dataclass
class Trace:
    events: dict[Hashable, list[StepEvent]]
    steps: int
    waited: int  # requests added while every row was taken (they had to queue)
    interleaved: int  # steps in which a prompt was part-read while other rows produced tokens


def drive(
    engine: Engine,
    schedule: list[tuple[int, list[int], SamplingParams, Hashable]],
    max_steps: int = 2000,
) -> Trace:
    """Add each (step, prompt, params, id) before that step; step until done, checking FIFO and the budget.

    Checks after every step: waiting requests are admitted first come first served, exactly
    min(waiting, free rows) of them; prefill reads exactly min(prefill_chunk, unread prompt of
    the running rows) tokens; a request gets at most one event per step and none after it finished.
    """
    pending = sorted(schedule, key=lambda item: item[0])  # stable: same-step adds keep their order
    events: dict[Hashable, list[StepEvent]] = {}
    # The engine's request objects (kept after they finish), those added before the call included.
    tracked: dict[Hashable, Any] = dict(engine.requests)
    added: list[Hashable] = list(engine.requests)  # in the order they were added
    done: set[Hashable] = set()
    waited = interleaved = 0
    step = 0
    while pending or engine.has_unfinished():
        assert step < max_steps, "the engine does not finish"
        while pending and pending[0][0] <= step:
            _, prompt, params, rid = pending.pop(0)
            if engine.rows_in_use == engine.max_batch or engine.waiting:
                waited += 1
            assert engine.add(prompt, params, request_id=rid) == rid
            tracked[rid] = engine.requests[rid]
            added.append(rid)
        waiting_before = [r.request_id for r in engine.waiting]
        # The queue is FIFO: the waiting requests are the latest added ones, in order.
        assert waiting_before == [rid for rid in added if rid in set(waiting_before)]
        free_before = engine.max_batch - engine.rows_in_use
        admitted = waiting_before[: min(len(waiting_before), free_before)]
        prefilled_before = {rid: r.prefilled for rid, r in tracked.items()}
        unread = sum(
            len(r.prompt) - r.prefilled
            for rid, r in tracked.items()
            if rid not in done and (r.row is not None or rid in admitted)
        )
        out = engine.step()
        assert [r.request_id for r in engine.waiting] == waiting_before[len(admitted) :]
        read = sum(r.prefilled - prefilled_before[rid] for rid, r in tracked.items())
        assert read == min(engine.prefill_chunk, unread)
        ids = [e.request_id for e in out]
        assert len(ids) == len(set(ids)), "two events for one request in one step"
        produced = set()
        for event in out:
            assert event.request_id not in done, "an event after the request finished"
            events.setdefault(event.request_id, []).append(event)
            if event.token_id is not None:
                produced.add(event.request_id)
            if event.finished:
                done.add(event.request_id)
        part_read = [rid for rid, r in tracked.items() if r.row is not None and 0 < r.prefilled < len(r.prompt)]
        if part_read and produced - set(part_read):
            interleaved += 1
        step += 1
    assert engine.rows_in_use == 0 and sorted(engine.cache.free) == list(range(engine.max_batch))
    assert not engine.requests
    return Trace(events, step, waited, interleaved)


def tokens(trace: Trace) -> dict[Hashable, list[int]]:
    return {rid: [e.token_id for e in evs if e.token_id is not None] for rid, evs in trace.events.items()}


def check_finished_once(events: list[StepEvent], count: int, reason: str) -> None:
    """count token events, the last (and only the last) finished with reason."""
    assert len(events) == count
    assert [e.finished for e in events] == [False] * (count - 1) + [True]
    assert events[-1].finish_reason == reason
    assert all(e.finish_reason is None for e in events[:-1])
    assert all(e.token_id is not None for e in events)


def run_alone(model: Gemma2ForCausalLM, prompt: list[int], params: SamplingParams) -> list[StepEvent]:
    """One request in a fresh engine of one row."""
    engine = Engine(model, max_batch=1)
    trace = drive(engine, [(0, prompt, params, "only")])
    return trace.events["only"]


# ---- 1. greedy parity with transformers under continuous batching ------------------------------

# (window, rows, prefill_chunk, max_length): None grows the buffers, "tight" is the longest request.
BATCHING = [
    (2, 4, 1, None),
    (2, 7, 512, "tight"),
    (3, 5, 3, None),
    (4, 8, 4, "tight"),
    (5, 6, 512, "tight"),
    (5, 4, 3, None),
]


@pytest.mark.parametrize(("window", "rows", "chunk", "max_length"), BATCHING)
def test_greedy_tokens_equal_transformers_generate_for_each_prompt_alone(
    window: int, rows: int, chunk: int, max_length: str | None
) -> None:
    _, ours = pair(window)
    requests = requests_for(window)
    longest = max(len(p) + n for p, n, _ in requests)
    engine = Engine(ours, max_batch=rows, max_length=longest if max_length else None, prefill_chunk=chunk)
    # rows + 2 before the first step (two wait), then a few after 2, 5 and 9 steps.
    first = rows + 2
    later = [2, 5, 9]
    schedule = [
        (0 if i < first else later[(i - first) % 3], prompt, SamplingParams(max_new_tokens=new, ignore_eos=True), i)
        for i, (prompt, new, _) in enumerate(requests)
    ]
    trace = drive(engine, schedule)
    assert trace.waited >= 2  # some requests queued for a row
    if chunk < 3 * window + 2:
        assert trace.interleaved > 0  # prompts were read over several steps while other rows decoded
    assert sorted(trace.events) == list(range(len(requests)))
    got = tokens(trace)
    for i, (prompt, new, expected) in enumerate(requests):
        assert len(expected) == new
        check_finished_once(trace.events[i], new, "length")
        assert got[i] == expected, (i, len(prompt))


# ---- 2. seeded sampling does not depend on the batch ------------------------------------------


def sampled_requests(vocab: int, window: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(7)
    lengths = [1, 2 * window + 1, 3 * window + 2, window, 3, 2 * window, window + 1]
    out = []
    for i, n in enumerate(lengths):
        extra: dict[str, Any] = dict(top_k=20, top_p=0.9)
        if i == 3:
            extra = dict(top_k=0, min_p=0.05, repetition_penalty=1.3)
        params = SamplingParams(max_new_tokens=6 + i % 3, temperature=0.8, seed=1000 + i, ignore_eos=True, **extra)
        out.append((random_prompt(vocab, n, rng), params))
    # Two with the same prompt and settings, different seeds.
    out.append(
        (out[2][0], SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=5, ignore_eos=True))
    )
    return out


@pytest.mark.parametrize(("window", "rows", "chunk"), [(3, 3, 2), (4, 5, 512)])
def test_seeded_sampling_gives_the_same_tokens_alone_and_batched(window: int, rows: int, chunk: int) -> None:
    _, ours = pair(window)
    requests = sampled_requests(ours.config.vocab_size, window)
    alone = [[e.token_id for e in run_alone(ours, p, params)] for p, params in requests]
    # Greedy requests share the batch too.
    greedy_prompt = random_prompt(ours.config.vocab_size, 2 * window, random.Random(3))
    schedule = [(i % 4, p, params, i) for i, (p, params) in enumerate(requests)]
    schedule += [(1, greedy_prompt, SamplingParams(max_new_tokens=5, ignore_eos=True), "greedy")]
    trace = drive(Engine(ours, max_batch=rows, prefill_chunk=chunk), schedule)
    got = tokens(trace)
    for i, (_, params) in enumerate(requests):
        assert got[i] == alone[i], i
        check_finished_once(trace.events[i], params.max_new_tokens, "length")
    # The seeds matter: the same prompt with another seed, and greedy, give other tokens.
    assert got[7] != got[2][: len(got[7])]
    greedy = [
        [e.token_id for e in run_alone(ours, p, SamplingParams(max_new_tokens=params.max_new_tokens, ignore_eos=True))]
        for p, params in requests
    ]
    assert sum(g != s for g, s in zip(greedy, alone)) >= len(requests) // 2
    # And they reproduce: the same request again gives the same tokens.
    p, params = requests[1]
    assert [e.token_id for e in run_alone(ours, p, params)] == alone[1]


# ---- 3. abort ----------------------------------------------------------------------------------


def test_abort_frees_the_row_at_once_and_a_waiting_request_takes_it() -> None:
    _, ours = pair(3)
    vocab = ours.config.vocab_size
    rng = random.Random(11)
    long_params = SamplingParams(max_new_tokens=9, ignore_eos=True)
    a, b, c, d = (random_prompt(vocab, n, rng) for n in (4, 7, 5, 3))
    engine = Engine(ours, max_batch=2, prefill_chunk=4)
    engine.add(a, long_params, request_id="a")
    engine.add(b, long_params, request_id="b")
    engine.add(c, long_params, request_id="c")  # waits: both rows are taken
    events: dict[Hashable, list[StepEvent]] = {}
    for _ in range(4):  # a decodes, b is read in two chunks, then decodes
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)
    assert engine.rows_in_use == 2 and [r.request_id for r in engine.waiting] == ["c"]
    row_a = engine.requests["a"].row
    assert len(events["a"]) == 4 and not events["a"][-1].finished
    assert engine.cache.row_length(row_a) > 0

    assert engine.abort("a") is True
    # Free before the next step: the row is back in the pool, and wiped.
    assert engine.rows_in_use == 1 and row_a in engine.cache.free
    assert engine.cache.row_length(row_a) == 0
    assert bool((engine.cache.ring_positions[row_a] == -1).all())
    for buffer in (*engine.cache.keys, *engine.cache.values):
        assert buffer is not None and not buffer[row_a].any()
    assert engine.has_unfinished()
    assert engine.abort("a") is False  # already aborted
    assert engine.abort("nobody") is False

    engine.add(d, long_params, request_id="d")  # waits behind c
    assert engine.abort("d") is True  # a waiting request
    assert [r.request_id for r in engine.waiting] == ["c"]

    first = engine.step()
    by_id = {e.request_id: e for e in first}
    for rid in ("a", "d"):
        assert by_id[rid].token_id is None and by_id[rid].finished and by_id[rid].finish_reason == "abort"
    assert engine.requests["c"].row == row_a  # the waiting request took the freed row
    assert not engine.waiting
    for e in first:
        events.setdefault(e.request_id, []).append(e)
    while engine.has_unfinished():
        for e in engine.step():
            assert e.request_id not in ("a", "d")
            events.setdefault(e.request_id, []).append(e)
    assert len(events["a"]) == 5 and len(events["d"]) == 1
    check_finished_once(events["b"], 9, "length")
    check_finished_once(events["c"], 9, "length")
    # c, in a row another request left mid-sequence, gives what it gives alone; b is untouched.
    for rid, prompt in (("b", b), ("c", c)):
        assert [e.token_id for e in events[rid]] == [e.token_id for e in run_alone(ours, prompt, long_params)]
    assert engine.abort("b") is False  # finished requests are unknown
    assert engine.step() == []  # an idle engine has nothing to say


def test_aborting_a_request_part_way_through_its_prompt() -> None:
    _, ours = pair(4)
    rng = random.Random(12)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    long_prompt, other, waiting = (random_prompt(ours.config.vocab_size, n, rng) for n in (14, 3, 9))
    engine = Engine(ours, max_batch=2, prefill_chunk=3)
    engine.add(other, params, request_id="other")
    engine.add(long_prompt, params, request_id="long")
    engine.add(waiting, params, request_id="waiting")
    events: dict[Hashable, list[StepEvent]] = {}
    for _ in range(3):
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)
    request = engine.requests["long"]
    assert 0 < request.prefilled < len(long_prompt) and "long" not in events
    row = request.row
    assert engine.abort("long")
    assert row in engine.cache.free and engine.cache.row_length(row) == 0
    trace = drive(engine, [])
    assert [(e.token_id, e.finish_reason) for e in trace.events["long"]] == [(None, "abort")]
    for rid, prompt in (("other", other), ("waiting", waiting)):
        got = [e.token_id for e in events.get(rid, []) + trace.events[rid]]
        assert got == [e.token_id for e in run_alone(ours, prompt, params)]


def test_aborting_the_only_request_is_reported_on_the_next_step() -> None:
    _, ours = pair(2)
    engine = Engine(ours, max_batch=3)
    rid = engine.add([5, 6, 7], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert engine.abort(rid) is True  # before it ever ran
    assert engine.has_unfinished() and engine.rows_in_use == 0
    (event,) = engine.step()
    assert (event.request_id, event.token_id, event.finished, event.finish_reason) == (rid, None, True, "abort")
    assert not engine.has_unfinished() and engine.step() == []


# ---- 4. input errors at add --------------------------------------------------------------------


def test_a_request_longer_than_max_length_is_refused_naming_both_numbers() -> None:
    _, ours = pair(4)
    engine = Engine(ours, max_batch=2, max_length=20)
    with pytest.raises(InputError, match=r"prompt \(15 tokens\) plus max_new_tokens \(6\).*21.*max_length \(20\)"):
        engine.add([3] * 15, SamplingParams(max_new_tokens=6))
    assert not engine.waiting and not engine.requests
    engine.add([3] * 15, SamplingParams(max_new_tokens=5))  # exactly max_length fits
    # Without max_length the limit is the context length.
    context = ours.config.max_position_embeddings
    engine = Engine(ours)
    with pytest.raises(InputError, match=rf"\({context - 3} tokens\).*max_new_tokens \(4\).*max_length \({context}\)"):
        engine.add([3] * (context - 3), SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], None, "empty"),
        ([5, 131], None, "token id 131, outside the vocabulary"),
        ([-1, 5], None, "token id -1"),
        ([5, 2.0], None, "integer token ids"),
        ([5, True], None, "integer token ids"),
        (torch.tensor([[5, 6]]), None, "1-D tensor"),
        (torch.tensor([5.0, 6.0]), None, "1-D tensor"),
        (torch.tensor([True, False]), None, "1-D tensor"),
        ([5], SamplingParams(temperature=-0.5), "temperature"),
        ([5], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([5], SamplingParams(max_new_tokens=True), "max_new_tokens"),
        ([5], SamplingParams(top_p=0.0), "top_p"),
        ([5], SamplingParams(temperature=0.7, top_p=1.5), "top_p"),
        ([5], SamplingParams(top_k=-1), "top_k"),
        ([5], SamplingParams(min_p=2.0), "min_p"),
        ([5], SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        ([5], SamplingParams(logprobs=-1), "logprobs"),
        ([5], SamplingParams(seed="x"), "seed"),  # type: ignore[arg-type]
        ([5], SamplingParams(stop_token_ids=["a"]), "stop_token_ids"),  # type: ignore[list-item]
    ],
)
def test_bad_requests_are_refused_at_add(prompt: Any, params: SamplingParams | None, message: str) -> None:
    _, ours = pair(4)  # vocabulary of 131
    engine = Engine(ours, max_batch=2)
    with pytest.raises(InputError, match=message):
        engine.add(prompt, params)
    assert not engine.waiting and not engine.requests and not engine.has_unfinished()


@pytest.mark.parametrize("top_k", [2.5, True, "3"])
def test_a_top_k_that_is_not_an_integer_is_refused_at_add(top_k: Any) -> None:
    _, ours = pair(4)
    engine = Engine(ours, max_batch=2)
    engine.add([4, 5], SamplingParams(max_new_tokens=3), request_id="good")
    with pytest.raises(InputError, match="top_k"):
        engine.add([4, 5], SamplingParams(max_new_tokens=3, temperature=0.8, top_k=top_k))
    assert len(drive(engine, []).events["good"]) == 3  # the others are not hurt


def test_a_tensor_prompt_works_and_a_request_id_in_use_is_refused() -> None:
    _, ours = pair(4)
    engine = Engine(ours, max_batch=2)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    engine.add(torch.tensor([4, 5, 6]), params, request_id="x")
    with pytest.raises(InputError, match="'x' is already in use"):
        engine.add([4, 5, 6], params, request_id="x")
    trace = drive(engine, [])
    assert tokens(trace)["x"] == [e.token_id for e in run_alone(ours, [4, 5, 6], params)]


def test_an_automatic_request_id_never_collides_with_a_given_one() -> None:
    _, ours = pair(4)
    engine = Engine(ours, max_batch=2)
    engine.add([4, 5], request_id=0)
    assert engine.add([4, 5]) != 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_batch=0), "max_batch"),
        (dict(max_batch=True), "max_batch"),
        (dict(max_length=0), "max_length"),
        (dict(max_length=129), "max_length"),
        (dict(prefill_chunk=0), "prefill_chunk"),
        (dict(prefill_chunk=True), "prefill_chunk"),
        (dict(max_length=True), "max_length"),
    ],
)
def test_bad_engine_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    _, ours = pair(4)  # context of 128
    with pytest.raises(InputError, match=message):
        Engine(ours, **kwargs)


# ---- 5. a reused row sees no old keys ----------------------------------------------------------


@pytest.mark.parametrize(("window", "rows", "chunk"), [(2, 1, 3), (5, 3, 4)])
def test_a_row_reused_after_a_long_request_gives_the_fresh_logits(window: int, rows: int, chunk: int) -> None:
    _, ours = pair(window)
    vocab = ours.config.vocab_size
    rng = random.Random(window)
    long_prompt = random_prompt(vocab, 3 * window + 2, rng)
    short_prompt = random_prompt(vocab, 2, rng)
    short = SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=5)
    engine = Engine(ours, max_batch=rows, prefill_chunk=chunk)
    # The long request wraps its ring many times; neighbours (when there are rows) keep running.
    engine.add(long_prompt, SamplingParams(max_new_tokens=9, ignore_eos=True), request_id="long")
    for i in range(rows - 1):
        engine.add(random_prompt(vocab, window + i, rng), SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.step()
    row = engine.requests["long"].row
    while "long" in engine.requests:
        engine.step()
    # Its row is wiped at once: zero keys and values in every layer, no slot written, length 0.
    assert row in engine.cache.free and engine.cache.row_length(row) == 0
    assert bool((engine.cache.ring_positions[row] == -1).all())
    for buffer in (*engine.cache.keys, *engine.cache.values):
        assert buffer is not None and not buffer[row].any()
    engine.add(short_prompt, short, request_id="short")
    reused = [e for e in engine.step() if e.request_id == "short"]
    assert engine.requests["short"].row == row  # the lowest free row: the long request's
    reused += drive(engine, []).events["short"]
    fresh = run_alone(ours, short_prompt, short)
    assert [e.token_id for e in reused] == [e.token_id for e in fresh]
    for mine, theirs in zip(reused, fresh):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-5)
        assert [i for i, _ in mine.top_logprobs] == [i for i, _ in theirs.top_logprobs]
        assert [v for _, v in mine.top_logprobs] == pytest.approx([v for _, v in theirs.top_logprobs], abs=1e-5)


def test_reset_row_and_free_row_wipe_one_row_only() -> None:
    _, ours = pair(3)
    config = ours.config
    cache = Gemma2Cache(config, max_batch=3)
    rows = [cache.allocate_row() for _ in range(3)]
    assert rows == [0, 1, 2]
    with torch.no_grad():
        ours(torch.randint(0, 97, (3, 8)), past_key_values=cache, cache_rows=torch.tensor(rows))  # wraps the ring
        ours(torch.randint(0, 97, (2, 1)), past_key_values=cache, cache_rows=torch.tensor([2, 0]))
    assert cache.lengths.tolist() == [9, 8, 9]
    assert bool((cache.ring_positions >= 0).all())
    before = [(k.clone(), v.clone()) for k, v in zip(cache.keys, cache.values)]
    assert all(k[1].any() and v[1].any() for k, v in before)

    cache.reset_row(1)
    assert cache.row_length(1) == 0 and cache.lengths.tolist() == [9, 0, 9]
    assert cache.ring_positions[1].tolist() == [-1] * cache.ring
    assert bool((cache.ring_positions[[0, 2]] >= 0).all())
    for (k, v), (k0, v0) in zip(zip(cache.keys, cache.values), before):
        assert not k[1].any() and not v[1].any()
        assert torch.equal(k[[0, 2]], k0[[0, 2]]) and torch.equal(v[[0, 2]], v0[[0, 2]])
    assert 1 not in cache.free  # reset keeps the row

    cache.free_row(1)
    assert cache.free == [1]
    with pytest.raises(InputError, match="cache row 1 is not in use"):
        cache.free_row(1)
    with pytest.raises(InputError, match="not in use"):
        cache.free_row(3)
    cache.free_row(2)
    cache.free_row(0)
    assert cache.allocate_row() == 0 and cache.allocate_row() == 1  # the lowest first
    assert cache.row_length(0) == 0 and not any(k[0].any() for k in cache.keys)


def test_a_ring_shorter_than_the_window_when_max_length_is_below_it() -> None:
    _, ours = pair(5)
    engine = Engine(ours, max_batch=3, max_length=4, prefill_chunk=1)
    assert engine.cache.ring == 4
    rng = random.Random(4)
    schedule = [
        (i, random_prompt(97, n, rng), SamplingParams(max_new_tokens=4 - n, ignore_eos=True), i)
        for i, n in enumerate([1, 3, 2, 1])
    ]
    got = tokens(drive(engine, schedule))
    for _, prompt, params, rid in schedule:
        expected = list(prompt)
        for _ in range(params.max_new_tokens):
            expected.append(int(full_forward_logits(ours, expected).argmax()))
        assert got[rid] == expected[len(prompt) :]


# ---- 6. logprobs -------------------------------------------------------------------------------


@pytest.mark.parametrize(("window", "chunk"), [(2, 2), (4, 512)])
def test_logprobs_are_the_full_forward_log_softmax(window: int, chunk: int) -> None:
    _, ours = pair(window)
    vocab = ours.config.vocab_size
    rng = random.Random(20 + window)
    schedule = []
    for i, n in enumerate([1, 3 * window + 2, window + 1, 2 * window]):
        sampled = dict(temperature=0.8, top_k=10, seed=i) if i % 2 else {}
        params = SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=5, **sampled)
        schedule.append((i, random_prompt(vocab, n, rng), params, i))
    plain = random_prompt(vocab, 4, rng)
    schedule.append((0, plain, SamplingParams(max_new_tokens=3, ignore_eos=True), "plain"))
    trace = drive(Engine(ours, max_batch=3, prefill_chunk=chunk), schedule)
    assert all(e.logprob is None and e.top_logprobs is None for e in trace.events["plain"])
    for _, prompt, params, rid in schedule[:-1]:
        seen = list(prompt)
        for event in trace.events[rid]:
            expected = torch.log_softmax(full_forward_logits(ours, seen), dim=-1)
            assert event.logprob == pytest.approx(float(expected[event.token_id]), abs=1e-5)
            values, ids = torch.topk(expected, 5)
            assert [i for i, _ in event.top_logprobs] == ids.tolist()
            assert [v for _, v in event.top_logprobs] == pytest.approx(values.tolist(), abs=1e-5)
            top = [v for _, v in event.top_logprobs]
            assert top == sorted(top, reverse=True)
            if params.temperature == 0:
                assert event.top_logprobs[0][0] == event.token_id
            seen.append(event.token_id)


# ---- 7. stop tokens ----------------------------------------------------------------------------


def with_config(model: Gemma2ForCausalLM, **overrides: Any) -> Gemma2ForCausalLM:
    """The same weights under a config with other fields (stop tokens)."""
    other = Gemma2ForCausalLM(model.config.replace(**overrides))
    other.load_state_dict(model.state_dict())
    return other.eval()


def first_new(seq: list[int], start: int) -> int:
    """Index of the first token at or after start that does not occur before it."""
    return next(i for i in range(start, len(seq)) if seq[i] not in seq[:i])


def test_stop_tokens_the_checkpoints_eos_and_ignore_eos() -> None:
    _, base = pair(3)
    prompt = random_prompt(base.config.vocab_size, 6, random.Random(9))
    free = SamplingParams(max_new_tokens=9, ignore_eos=True)
    seq = [e.token_id for e in run_alone(base, prompt, free)]
    assert base.config.eos_token_id not in seq  # the default eos (1) never comes, so nothing stops early
    k = first_new(seq, 3)  # a token first produced at step k > 0
    j = first_new(seq, 1)  # another, earlier one
    assert j < k
    eos, other = seq[k], seq[j]

    def run(model: Gemma2ForCausalLM, params: SamplingParams) -> list[StepEvent]:
        # Among other requests, so a stop frees a row mid-batch.
        engine = Engine(model, max_batch=2, prefill_chunk=4)
        trace = drive(
            engine, [(0, prompt, params, "r"), (1, [7, 8, 9], SamplingParams(max_new_tokens=9, ignore_eos=True), "n")]
        )
        return trace.events["r"]

    # stop_token_ids=None: the config's eos (one id or a list) ends the request with "stop".
    for model in (with_config(base, eos_token_id=eos), with_config(base, eos_token_id=[1, eos])):
        events = run(model, SamplingParams(max_new_tokens=9))
        check_finished_once(events, k + 1, "stop")
        assert [e.token_id for e in events] == seq[: k + 1] and events[-1].token_id == eos
        # ignore_eos goes past it to the length.
        events = run(model, free)
        check_finished_once(events, 9, "length")
        assert [e.token_id for e in events] == seq
        # Ids given are stops in addition to the checkpoint's; ignore_eos keeps them.
        check_finished_once(run(model, SamplingParams(max_new_tokens=9, stop_token_ids=[other])), j + 1, "stop")
        events = run(model, SamplingParams(max_new_tokens=9, stop_token_ids=[other], ignore_eos=True))
        check_finished_once(events, j + 1, "stop")
        assert events[-1].token_id == other
    # generation_config.json's eos_token_id wins over the config's.
    model = with_config(base, eos_token_id=eos)
    model.generation_config = {"eos_token_id": [other]}
    events = run(model, SamplingParams(max_new_tokens=9))
    check_finished_once(events, j + 1, "stop")
    assert events[-1].token_id == other
    # A stop token as the very first token (from the prefill) ends at once; max_new_tokens=1 too.
    check_finished_once(run(base, SamplingParams(max_new_tokens=9, stop_token_ids=[seq[0]])), 1, "stop")
    check_finished_once(run(base, SamplingParams(max_new_tokens=1, ignore_eos=True)), 1, "length")
    # A stop token reached exactly at the length is a "stop".
    check_finished_once(run(base, SamplingParams(max_new_tokens=k + 1, stop_token_ids=[eos])), k + 1, "stop")


# ---- 8. batch invariance in bf16 ---------------------------------------------------------------


def with_native_kernels(model: Gemma2ForCausalLM) -> str:
    """Install the native CPU kernels where this CPU runs them; returns the backend's name."""
    try:
        from gemma2.backends import apply_backend
    except ImportError:  # the older layout: the kernels apply by themselves where they can
        return "built-in"
    return apply_backend(model, "auto")


def test_bf16_batched_tokens_mostly_equal_each_request_alone() -> None:
    """bf16 on the CPU (the native kernels where this CPU has them): batched vs alone.

    Observed on an AVX-512 BF16 CPU: 100 % of the 2 x 68 tokens agree, with the native kernels
    ("cpu" backend) and with PyTorch's (GEMMA2_CPU_KERNELS=off).
    """
    config = tiny_config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
    )
    model = Gemma2ForCausalLM(config)
    randomize_(model, seed=1, std=0.1)
    model = model.to(torch.bfloat16).eval()
    backend = with_native_kernels(model)
    rng = random.Random(8)
    requests = [
        (random_prompt(256, n, rng), SamplingParams(max_new_tokens=5 + i % 8, ignore_eos=True))
        for i, n in enumerate((1, 3, 4, 5, 7, 9, 12, 14))
    ]
    alone = [[e.token_id for e in run_alone(model, p, params)] for p, params in requests]
    schedule = [(i // 3, p, params, i) for i, (p, params) in enumerate(requests)]
    # All 8 in one batch (the native kernels' most rows), then 3 rows reused as requests finish.
    for rows, chunk in ((8, 6), (3, 512)):
        got = tokens(drive(Engine(model, max_batch=rows, prefill_chunk=chunk), schedule))
        pairs = [(a, b) for i in range(len(requests)) for a, b in zip(got[i], alone[i], strict=True)]
        agree = sum(a == b for a, b in pairs) / len(pairs)
        assert agree >= 0.9, f"{agree:.0%} of bf16 tokens agree ({rows} rows, backend {backend})"


# ---- 9. arrival order does not matter ----------------------------------------------------------


def test_arrival_order_and_step_offsets_do_not_change_any_request() -> None:
    _, ours = pair(3)
    vocab = ours.config.vocab_size
    rng = random.Random(30)
    requests = []
    for i, n in enumerate([1, 11, 3, 6, 2, 9, 4, 7]):
        sampled = dict(temperature=0.8, top_p=0.9, top_k=30, seed=50 + i) if i % 3 == 1 else {}
        requests.append(
            (
                f"r{i}",
                random_prompt(vocab, n, rng),
                SamplingParams(max_new_tokens=1 + i % 5, ignore_eos=True, logprobs=2, **sampled),
            )
        )
    ids = [rid for rid, _, _ in requests]
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    orders = [
        [(0, rid) for rid in ids],  # all at once, in order
        [(i // 2, rid) for i, rid in enumerate(reversed(ids))],  # reversed, two per step
        [(3 * i % 7, rid) for i, rid in enumerate(shuffled)],  # shuffled, scattered offsets
    ]
    by_id = {rid: (prompt, params) for rid, prompt, params in requests}
    results = []
    for order in orders:
        schedule = [(step, *by_id[rid], rid) for step, rid in order]
        trace = drive(Engine(ours, max_batch=3, prefill_chunk=3), schedule)
        results.append(trace)
    first = tokens(results[0])
    for trace in results[1:]:
        assert tokens(trace) == first
        for rid in ids:
            assert [e.logprob for e in trace.events[rid]] == pytest.approx(
                [e.logprob for e in results[0].events[rid]], abs=1e-5
            )
    for rid, _, params in requests:
        check_finished_once(results[0].events[rid], params.max_new_tokens, "length")
