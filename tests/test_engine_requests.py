"""The engine's request features for the server: groups sharing one prefill (n), prompt log
probabilities (echo), min_tokens, logit bias, and OpenAI's presence and frequency penalties."""

from __future__ import annotations

import random
from collections.abc import Hashable
from typing import Any

import pytest
import torch
from conftest import randomize_, tiny_config

from gemma2 import Gemma2ForCausalLM
from gemma2.engine import Engine, StepEvent
from gemma2.errors import InputError
from gemma2.sampling import SamplingParams, output_penalties


@pytest.fixture(scope="module")
def model() -> Gemma2ForCausalLM:
    torch.set_num_threads(1)
    return randomize_(Gemma2ForCausalLM(tiny_config(sliding_window=4)), seed=3, std=0.15).eval()


def run(engine: Engine) -> dict[Hashable, list[StepEvent]]:
    events: dict[Hashable, list[StepEvent]] = {}
    while engine.has_unfinished():
        for event in engine.step():
            events.setdefault(event.request_id, []).append(event)
    return events


def tokens(events: list[StepEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def prompt(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 97) for _ in range(length)]


def alone(model: Gemma2ForCausalLM, ids: list[int], params: SamplingParams, chunk: int = 512) -> list[StepEvent]:
    engine = Engine(model, max_batch=1, prefill_chunk=chunk)
    engine.add(ids, params, request_id="x")
    return run(engine)["x"]


def count_prompt_tokens(model: Gemma2ForCausalLM) -> tuple[list[int], Any]:
    """Tokens each forward of several tokens reads (prefill chunks), by wrapping the model's forward."""
    read: list[int] = []
    forward = model.forward

    def counting(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if input_ids.shape[1] > 1:
            read.append(input_ids.numel())
        return forward(input_ids, *args, **kwargs)

    return read, counting


@pytest.mark.parametrize("chunk", [3, 512])
def test_a_group_reads_its_prompt_once_and_each_member_samples_as_alone(model: Gemma2ForCausalLM, chunk: int) -> None:
    ids = prompt(11)
    params = [
        SamplingParams(max_new_tokens=6, ignore_eos=True),
        SamplingParams(max_new_tokens=4, temperature=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_new_tokens=7, temperature=1.2, top_k=20, seed=6, ignore_eos=True, logprobs=3),
    ]
    engine = Engine(model, max_batch=4, prefill_chunk=chunk)
    read, counting = count_prompt_tokens(model)
    model.forward = counting  # type: ignore[method-assign]
    try:
        ids_of_group = engine.add_group(ids, params, ["a", "b", "c"])
        events = run(engine)
    finally:
        del model.forward
    assert ids_of_group == ["a", "b", "c"]
    assert sum(read) == len(ids)  # once, not three times
    for rid, p in zip("abc", params):
        solo = alone(model, ids, p, chunk)
        assert tokens(events[rid]) == tokens(solo)
        # Decoding three rows at once may round float32 sums differently from one: not the tokens.
        assert [e.logprob for e in events[rid]] == pytest.approx([e.logprob for e in solo], abs=1e-5)
        assert events[rid][-1].finish_reason == "length"


def test_a_group_waits_for_enough_free_rows_and_is_refused_past_max_batch(model: Gemma2ForCausalLM) -> None:
    engine = Engine(model, max_batch=3)
    engine.add(prompt(5), SamplingParams(max_new_tokens=3, ignore_eos=True), request_id="first")
    engine.add_group(prompt(4, 1), [SamplingParams(max_new_tokens=2, ignore_eos=True)] * 3, ["g0", "g1", "g2"])
    engine.step()
    assert engine.rows_in_use == 1  # the group needs three rows at once
    events = run(engine)
    assert all(len(tokens(events[r])) == 2 for r in ("g0", "g1", "g2"))
    with pytest.raises(InputError, match="max_batch"):
        engine.add_group(prompt(4), [SamplingParams()] * 4)
    with pytest.raises(InputError, match="twice"):
        engine.add_group(prompt(4), [SamplingParams()] * 2, ["same", "same"])


@pytest.mark.parametrize("when", ["waiting", "prefilling"])
def test_aborting_a_groups_leader_leaves_the_others_their_answers(model: Gemma2ForCausalLM, when: str) -> None:
    ids = prompt(9)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    engine = Engine(model, max_batch=3, prefill_chunk=3)
    if when == "waiting":
        engine.add(prompt(6, 2), SamplingParams(max_new_tokens=2, ignore_eos=True), request_id="busy")
        engine.add(prompt(6, 2), SamplingParams(max_new_tokens=2, ignore_eos=True), request_id="busy2")
    engine.add_group(ids, [params] * 3, ["lead", "f1", "f2"])
    engine.step()  # prefilling: the first chunk of 3 is read
    assert engine.abort("lead")
    events = run(engine)
    expected = tokens(alone(model, ids, params))
    assert tokens(events["f1"]) == tokens(events["f2"]) == expected
    assert events["lead"][-1].finish_reason == "abort"
    assert engine.rows_in_use == 0


@pytest.mark.parametrize("chunk", [2, 5, 512])
def test_prompt_logprobs_are_the_full_forward_log_softmax(model: Gemma2ForCausalLM, chunk: int) -> None:
    ids = prompt(13, 4)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=4)
    first = alone(model, ids, params, chunk)[0]
    with torch.no_grad():
        table = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(ids) - 1
    for i, (value, top) in enumerate(first.prompt_logprobs):
        assert value == pytest.approx(float(table[i, ids[i + 1]]), abs=1e-5)
        best = torch.topk(table[i], 4)
        assert [t for t, _ in top] == best.indices.tolist()
    # The first token is the one a request without prompt_logprobs picks.
    assert first.token_id == tokens(alone(model, ids, SamplingParams(max_new_tokens=2, ignore_eos=True), chunk))[0]


def test_max_new_tokens_0_scores_the_prompt_only(model: Gemma2ForCausalLM) -> None:
    ids = prompt(7)
    events = alone(model, ids, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    assert len(events) == 1 and events[0].token_id is None and events[0].finish_reason == "length"
    assert events[0].prompt_logprobs is not None and len(events[0].prompt_logprobs) == 6
    with pytest.raises(InputError, match="prompt_logprobs"):
        SamplingParams(max_new_tokens=0).validate()


def test_min_tokens_bars_the_stop_tokens_until_then(model: Gemma2ForCausalLM) -> None:
    ids = prompt(5)
    forced = {9: 100.0}  # token 9 would win every step
    stop = SamplingParams(max_new_tokens=8, stop_token_ids=[9], ignore_eos=True, logit_bias=forced)
    assert tokens(alone(model, ids, stop)) == [9]
    held = SamplingParams(max_new_tokens=8, stop_token_ids=[9], ignore_eos=True, logit_bias=forced, min_tokens=3)
    events = alone(model, ids, held)
    assert len(tokens(events)) == 4 and 9 not in tokens(events)[:3] and tokens(events)[3] == 9
    assert events[-1].finish_reason == "stop"
    with pytest.raises(InputError, match="min_tokens"):
        SamplingParams(max_new_tokens=2, min_tokens=3).validate()


def test_logit_bias_moves_the_choice_and_is_checked_against_the_vocabulary(model: Gemma2ForCausalLM) -> None:
    ids = prompt(5)
    plain = tokens(alone(model, ids, SamplingParams(max_new_tokens=3, ignore_eos=True)))
    banned = tokens(alone(model, ids, SamplingParams(max_new_tokens=3, ignore_eos=True, logit_bias={plain[0]: -100})))
    assert banned[0] != plain[0]
    engine = Engine(model, max_batch=1)
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.add(ids, SamplingParams(logit_bias={97: 1.0}))
    with pytest.raises(InputError, match="logit_bias"):
        engine.add(ids, SamplingParams(logit_bias={3: 500.0}))


def test_presence_and_frequency_penalties_follow_openais_formula() -> None:
    logits = torch.zeros(1, 6)
    generated = torch.tensor([[2, 2, 2, 5]])
    out = output_penalties(logits, generated, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, 0.0, -(3 * 0.25 + 0.5), 0.0, 0.0, -(0.25 + 0.5)]]


def test_penalties_change_what_greedy_repeats(model: Gemma2ForCausalLM) -> None:
    ids = prompt(4)
    plain = tokens(alone(model, ids, SamplingParams(max_new_tokens=20, ignore_eos=True)))
    penalised = tokens(alone(model, ids, SamplingParams(max_new_tokens=20, ignore_eos=True, frequency_penalty=2.0)))
    assert len(set(penalised)) >= len(set(plain))
    assert max(penalised.count(t) for t in penalised) <= max(plain.count(t) for t in plain)
    with pytest.raises(InputError, match="presence_penalty"):
        SamplingParams(presence_penalty=3.0).validate()
