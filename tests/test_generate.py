"""Generation: greedy parity with transformers' generate, batching, sampling, cache, streaming."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import hf_model, tiny_config

import gemma2.engine as engine_module
import gemma2.generation as gen
from gemma2 import Gemma2Cache, Gemma2Config, Gemma2ForCausalLM, IncrementalDecoder, InputError
from gemma2.cache import cache_memory_bytes


def pair(seed: int = 0, std: float = 0.1, **overrides: Any) -> tuple[Any, Gemma2ForCausalLM]:
    config = tiny_config(**overrides)
    hf = hf_model(config, "causal", seed=seed, std=std)
    ours = Gemma2ForCausalLM(config)
    ours.load_state_dict(hf.state_dict())
    return hf, ours.eval()


def prompts(config: Gemma2Config, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of random prompts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(2, config.vocab_size, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


CASES: dict[str, dict[str, Any]] = {
    "prompt_shorter_than_window": dict(overrides=dict(sliding_window=16), lengths=[5], new=8),
    "prompt_longer_than_window": dict(overrides=dict(sliding_window=4), lengths=[13], new=6),
    "more_new_tokens_than_window": dict(overrides=dict(sliding_window=3), lengths=[4], new=14),
    "left_padded_batch": dict(overrides=dict(sliding_window=4), lengths=[9, 3, 6], new=10),
    "multi_query_odd_layers": dict(
        overrides=dict(num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=5, sliding_window=2),
        lengths=[7, 7],
        new=9,
    ),
    "no_softcaps": dict(
        overrides=dict(final_logit_softcapping=None, attn_logit_softcapping=None), lengths=[6, 2], new=7
    ),
    "scalar_27b_style": dict(overrides=dict(head_dim=8, query_pre_attn_scalar=144), lengths=[5, 8], new=8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_equals_transformers_generate(case: str) -> None:
    spec = CASES[case]
    hf, ours = pair(seed=len(case), **spec["overrides"])
    ids, mask = prompts(ours.config, spec["lengths"], seed=len(case))
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=spec["new"], do_sample=False)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=spec["new"])
    assert got.dtype == torch.long
    assert torch.equal(got, expected)


def test_greedy_with_repetition_penalty_equals_transformers() -> None:
    hf, ours = pair(seed=3, sliding_window=4)
    ids, mask = prompts(ours.config, [6, 4], seed=3)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, repetition_penalty=1.3)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, repetition_penalty=1.3)
    assert torch.equal(got, expected)


def test_stop_tokens_finish_rows_and_pad_them_like_transformers() -> None:
    hf, ours = pair(seed=5, sliding_window=4)
    ids, mask = prompts(ours.config, [6, 5, 4], seed=5)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    stop = int(free[0, ids.shape[1] + 2])  # a token row 0 produces: make it a stop token
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=stop)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=stop)
    assert torch.equal(got, expected)
    row = got[0, ids.shape[1] :].tolist()
    first = row.index(stop)
    assert all(t == ours.config.pad_token_id for t in row[first + 1 :])


def test_generation_stops_when_every_row_is_done() -> None:
    _, ours = pair(seed=6)
    ids, mask = prompts(ours.config, [5, 5], seed=6)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    stops = sorted({int(free[0, 5]), int(free[1, 5])})  # each row's first new token
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=stops)
    assert got.shape == (2, 6)


@pytest.mark.parametrize("window", [2, 5])
def test_batch_gives_the_same_greedy_tokens_as_each_prompt_alone(window: int) -> None:
    _, ours = pair(seed=window, sliding_window=window, num_hidden_layers=4)
    lengths = [3, 11, 7, 1]
    ids, mask = prompts(ours.config, lengths, seed=window)
    batched = ours.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=[])
    for row, n in enumerate(lengths):
        alone = ours.generate(ids[row : row + 1, ids.shape[1] - n :], max_new_tokens=9, eos_token_id=[])
        assert torch.equal(batched[row, -9:], alone[0, -9:]), row


def test_sampling_with_a_seed_is_reproducible() -> None:
    _, ours = pair(seed=7, std=0.05)
    ids, mask = prompts(ours.config, [4, 6], seed=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=[])
    a = ours.generate(ids, seed=11, **kwargs)
    b = ours.generate(ids, seed=11, **kwargs)
    c = ours.generate(ids, seed=12, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_filters_that_keep_one_token_are_greedy() -> None:
    _, ours = pair(seed=8)
    ids, mask = prompts(ours.config, [5, 3], seed=8)
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for filters in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        sampled = ours.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=True, seed=0, eos_token_id=[], **filters
        )
        assert torch.equal(sampled, greedy), filters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_settings_fail_before_any_work(kwargs: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, ours = pair()
    calls: list[int] = []
    monkeypatch.setattr(ours, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(InputError, match=message):
        ours.generate(torch.tensor([[2, 5, 6]]), **kwargs)
    assert calls == []


def test_a_prompt_longer_than_the_context_is_refused() -> None:
    _, ours = pair(max_position_embeddings=16)
    with pytest.raises(InputError, match="17 tokens, more than max_position_embeddings"):
        ours.generate(torch.randint(2, 97, (1, 17)), max_new_tokens=1)
    # Generation stops at the context length instead of running past it.
    out = ours.generate(torch.randint(2, 97, (1, 12)), max_new_tokens=50, eos_token_id=[])
    assert out.shape == (1, 16)


def test_the_cache_is_allocated_once_and_logits_are_last_position_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _, ours = pair(sliding_window=4, num_hidden_layers=2)
    caches: list[Gemma2Cache] = []
    original = engine_module.Gemma2Cache

    def spy(config: Gemma2Config, max_length: int | None = None, max_batch: int | None = None) -> Gemma2Cache:
        caches.append(original(config, max_length=max_length, max_batch=max_batch))
        return caches[-1]

    monkeypatch.setattr(engine_module, "Gemma2Cache", spy)
    head_rows: list[int] = []
    ours.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[1]))
    buffers: list[tuple[int, int]] = []

    def record(*_: Any) -> None:
        sliding, full = caches[0].keys
        buffers.append((id(full), id(sliding)))

    ours.model.layers[-1].register_forward_hook(record)
    ids = torch.randint(2, 97, (2, 10))
    ours.generate(ids, max_new_tokens=7, eos_token_id=[])
    assert len(caches) == 1
    sliding, full = caches[0].keys
    assert full is not None and full.shape[2] == 17  # prompt + max_new_tokens
    assert sliding is not None and sliding.shape[2] == 4  # the window
    assert len(set(buffers)) == 1  # the same buffers at every step: nothing reallocated
    assert head_rows == [1] * 7  # the LM head only ever sees one position per row


def test_cache_memory_of_the_2b_model_at_8192_tokens() -> None:
    config = Gemma2Config.from_preset("gemma-2-2b")
    ours = cache_memory_bytes(config, 8192)
    every_position = cache_memory_bytes(config.replace(layer_types=["full_attention"] * 26), 8192)
    per_layer = 2 * 4 * 256 * 2  # k and v, 4 kv heads, head_dim 256, bf16
    assert every_position == 26 * 8192 * per_layer  # 832 MiB
    assert ours == 13 * 8192 * per_layer + 13 * 4096 * per_layer  # 624 MiB: 25 % less
    cache = Gemma2Cache(config.replace(num_hidden_layers=2, layer_types=None), max_length=8192)
    k = torch.zeros(1, 4, 1, 256, dtype=torch.bfloat16)
    step = cache.begin(1, 1, k.device)
    for layer in range(len(cache)):
        cache.update(layer, k, k, step)
    assert cache.memory_bytes() == 8192 * per_layer + 4096 * per_layer


def test_generate_function_and_method_agree() -> None:
    _, ours = pair()
    ids = torch.randint(2, 97, (1, 5))
    assert torch.equal(gen.generate(ours, ids, max_new_tokens=4), ours.generate(ids, max_new_tokens=4))


def test_prompt_pad_tokens_are_treated_as_padding_without_a_mask() -> None:
    _, ours = pair(seed=9)
    ids, mask = prompts(ours.config, [6, 3], seed=9)
    assert torch.equal(
        ours.generate(ids, max_new_tokens=5, eos_token_id=[]),
        ours.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[]),
    )


class ByteTokenizer:
    """A stand-in tokenizer whose ids are UTF-8 bytes: every multi-byte character is split."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🎉👩‍👩‍👧 mix’d"])
def test_incremental_decoding_never_emits_broken_utf8(text: str) -> None:
    decoder = IncrementalDecoder(ByteTokenizer())  # type: ignore[arg-type]
    pieces = [decoder.push(b) for b in text.encode("utf-8")]
    pieces.append(decoder.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_streaming_real_byte_fallback_pieces_never_emits_broken_utf8(tmp_path) -> None:
    import shutil

    from gemma2 import Gemma2Tokenizer
    from gemma2.io.assets import gemma_tokenizer_model

    shutil.copyfile(gemma_tokenizer_model(), tmp_path / "tokenizer.model")
    tok = Gemma2Tokenizer.from_pretrained(tmp_path)
    text = "rare: \U0001f9ff\U000e0041 \ue000 𓀀𓀁 and ‱ done"
    ids = tok.encode(text, add_special_tokens=False)
    assert any(217 <= i <= 472 for i in ids)  # the string really uses byte-fallback pieces
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
