"""The KV cache: cached decoding and chunked prefill equal one full forward pass, past the window."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, randomize_, tiny_config

from gemma2 import Gemma2Cache, Gemma2ForCausalLM

TOL = 2e-5


def model_for(window: int, layers: int = 3, seed: int = 0, **overrides: object) -> Gemma2ForCausalLM:
    config = tiny_config(sliding_window=window, num_hidden_layers=layers, **overrides)
    return randomize_(Gemma2ForCausalLM(config), seed=seed).eval()


def run_in_chunks(model: Gemma2ForCausalLM, ids: torch.Tensor, sizes: list[int], mask: torch.Tensor | None = None):
    cache = Gemma2Cache(model.config)
    outputs = []
    start = 0
    for size in sizes:
        stop = start + size
        chunk_mask = None if mask is None else mask[:, :stop]
        out = model(ids[:, start:stop], attention_mask=chunk_mask, past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        outputs.append(out.logits)
        start = stop
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize("window", [1, 2, 4, 7])
@pytest.mark.parametrize("offset", [-1, 0, 1, "2W", "3W+2"])
def test_prefill_then_token_by_token_equals_full_forward(window: int, offset: int | str) -> None:
    """Lengths W-1, W, W+1, 2W, 3W+2 around the window: the off-by-one cases other stacks get wrong."""
    length = {"2W": 2 * window, "3W+2": 3 * window + 2}.get(
        str(offset), window + (offset if isinstance(offset, int) else 0)
    )
    length = max(length, 2)
    model = model_for(window)
    ids = torch.randint(1, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        full = model(ids).logits
        prompt = max(1, length // 3)
        cached, _ = run_in_chunks(model, ids, [prompt] + [1] * (length - prompt))
    assert (cached - full).abs().max() <= TOL


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 6, 11, 40])
def test_chunked_prefill_equals_full_forward(chunk: int) -> None:
    model = model_for(window=4, layers=4)
    length = 23
    ids = torch.randint(1, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(chunk))
    sizes = [min(chunk, length - s) for s in range(0, length, chunk)]
    with torch.no_grad():
        full = model(ids).logits
        chunked, _ = run_in_chunks(model, ids, sizes)
    assert (chunked - full).abs().max() <= TOL


@pytest.mark.parametrize("sizes", [[9, 1, 1, 1, 1, 1, 1], [3, 5, 1, 7, 1], [1] * 16])
def test_cached_decoding_with_left_padding_equals_full_forward(sizes: list[int]) -> None:
    model = model_for(window=3, layers=3, num_attention_heads=4, num_key_value_heads=1)
    length = sum(sizes)
    ids = torch.randint(1, model.config.vocab_size, (3, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cached, _ = run_in_chunks(model, ids, sizes, mask)
    real = mask.bool()
    assert (cached - full)[real].abs().max() <= TOL


def test_cached_decoding_matches_the_reference_full_forward() -> None:
    config = tiny_config(sliding_window=3, num_hidden_layers=4)
    hf = hf_model(config, "causal")
    ours = Gemma2ForCausalLM(config)
    ours.load_state_dict(hf.state_dict())
    ours.eval()
    ids = torch.randint(1, config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        cached, _ = run_in_chunks(ours, ids, [5] + [1] * 9)
    assert (cached - expected).abs().max() <= TOL


def test_sliding_layers_keep_only_the_window() -> None:
    window, length = 4, 30
    model = model_for(window=window, layers=2)
    ids = torch.randint(1, model.config.vocab_size, (1, length))
    with torch.no_grad():
        _, cache = run_in_chunks(model, ids, [10] + [1] * (length - 10))
    assert cache.sliding == [True, False]
    sliding_keys, full_keys = cache.keys
    assert sliding_keys is not None and sliding_keys.shape[2] == window
    assert cache.ring_positions is not None
    assert sorted(cache.ring_positions[0].tolist()) == list(range(length - window, length))
    assert cache.row_length(0) == length and full_keys is not None and full_keys.shape[2] >= length
    D, K = model.config.head_dim, model.config.num_key_value_heads
    assert sliding_keys.numel() * sliding_keys.element_size() == K * window * D * 4


def test_preallocated_full_cache_does_not_grow() -> None:
    model = model_for(window=4, layers=2)
    cache = Gemma2Cache(model.config, max_length=20)
    ids = torch.randint(1, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        model(ids[:, :8], past_key_values=cache)
        buffer = cache.keys[1]
        assert buffer is not None
        for t in range(8, 20):
            model(ids[:, t : t + 1], past_key_values=cache)
    assert cache.keys[1] is buffer and buffer.shape[2] == 20


def test_cache_rejects_a_different_batch_size() -> None:
    model = model_for(window=4, layers=2)
    cache = Gemma2Cache(model.config)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), past_key_values=cache)
        with pytest.raises(ValueError, match="batch size 1"):
            model(torch.tensor([[7]]), past_key_values=cache)


def test_attention_mask_must_cover_cached_and_new_tokens() -> None:
    model = model_for(window=4, layers=2)
    cache = Gemma2Cache(model.config)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), past_key_values=cache)
        with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch=1, cached \+ new tokens=4\]"):
            model(torch.tensor([[7]]), attention_mask=torch.ones(1, 1), past_key_values=cache)


def test_use_cache_creates_and_returns_a_cache() -> None:
    model = model_for(window=2, layers=3)
    ids = torch.randint(1, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        out = model(ids[:, :6], use_cache=True)
        assert isinstance(out.past_key_values, Gemma2Cache)
        nxt = model(ids[:, 6:], past_key_values=out.past_key_values)
        full = model(ids).logits
    assert (nxt.logits - full[:, 6:]).abs().max() <= TOL
    assert model(ids).past_key_values is None
