"""Attention kernels: soft-cap before mask, exact window edges, and the tiled long-input path."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_config

import gemma2.attention as attn
from gemma2 import Gemma2Config, Gemma2ForCausalLM
from gemma2.attention import MaskSpec, attention, eager_attention


def reference_attention(q, k, v, allowed, scaling, softcap):
    """The textbook computation with repeated kv heads, for comparison."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    s = q @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    return (torch.softmax(s.float(), -1).to(q.dtype) @ v).transpose(1, 2)


def random_qkv(B=2, H=4, K=2, T=9, S=9, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype) * 3
    k = torch.randn(B, K, S, D, generator=g).to(dtype) * 3
    v = torch.randn(B, K, S, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("window", [None, 1, 3, 8])
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (3, 3)])
def test_eager_attention_equals_textbook(window: int | None, heads: tuple[int, int]) -> None:
    H, K = heads
    q, k, v = random_qkv(H=H, K=K, T=11, S=11)
    positions = torch.arange(11)
    padding = torch.ones(2, 11, dtype=torch.bool)
    padding[1, :3] = False
    mask = MaskSpec(positions, positions, window=window, key_padding=padding)
    got = eager_attention(q, k, v, mask, scaling=0.3, softcap=5.0)
    expected = reference_attention(q, k, v, mask.allowed(), 0.3, 5.0)
    real = padding[:, :, None, None].expand_as(got)
    assert (got - expected)[real].abs().max() <= 1e-5


def test_window_sees_exactly_w_keys_including_itself() -> None:
    positions = torch.arange(10)
    allowed = MaskSpec(positions, positions, window=4).allowed()[0, 0]
    assert allowed.sum(-1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert allowed[9].nonzero().flatten().tolist() == [6, 7, 8, 9]


def test_softcap_is_applied_before_the_mask() -> None:
    """Capping after the mask would turn masked scores into -cap and leak attention to them."""
    q, k, v = random_qkv(B=1, H=1, K=1, T=2, S=2, D=4)
    v[0, 0, 1] = 1000.0  # a masked future value: any leak shows up
    positions = torch.arange(2)
    out = eager_attention(q, k, v, MaskSpec(positions, positions), scaling=1.0, softcap=1.0)
    assert torch.allclose(out[0, 0, 0], v[0, 0, 0])


@pytest.mark.parametrize("budget_rows", [1, 3, 7])
@pytest.mark.parametrize("window", [None, 5])
def test_tiled_attention_equals_one_shot(budget_rows: int, window: int | None) -> None:
    B, H, K, T, D = 2, 4, 2, 29, 8
    q, k, v = random_qkv(B=B, H=H, K=K, T=T, S=T, D=D, seed=budget_rows)
    positions = torch.arange(T)
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[0, :4] = False
    segments = torch.zeros(B, T, dtype=torch.long)
    segments[1, 15:] = 1
    mask = MaskSpec(positions, positions, window, padding, segments, segments)
    one_shot = eager_attention(q, k, v, mask, 0.25, 50.0)
    tiled = attention(q, k, v, mask, 0.25, 50.0, score_budget_bytes=budget_rows * B * H * T * 8)
    assert (tiled - one_shot).abs().max() <= 1e-5


def test_long_prefill_of_the_2b_shape_never_holds_all_scores() -> None:
    """An 8192-token prefill with gemma-2-2b's attention shape is computed in query blocks."""
    config = Gemma2Config.from_preset("gemma-2-2b")
    H, K, D, T = config.num_attention_heads, config.num_key_value_heads, config.head_dim, 8192
    blocks: list[int] = []
    original = attn.eager_attention

    def spy(query, key, value, mask, scaling, softcap, dropout=0.0, query_start=0, matmul=torch.matmul):
        blocks.append(query.shape[2])
        # Only the bookkeeping is checked here; the numerics are checked by the tests above.
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])

    attn.eager_attention = spy
    try:
        q = torch.empty(1, H, T, D, dtype=torch.bfloat16)
        k = torch.empty(1, K, T, D, dtype=torch.bfloat16)
        positions = torch.arange(T)
        out = attention(q, k, k, MaskSpec(positions, positions, window=4096), 1 / 16, 50.0)
    finally:
        attn.eager_attention = original
    assert out.shape == (1, T, H, D)
    assert sum(blocks) == T and max(blocks) < T
    peak_scores = max(blocks) * H * T * 8
    assert peak_scores <= attn.DEFAULT_SCORE_BUDGET_BYTES < H * T * T * 4


def test_model_forward_with_tiling_equals_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(sliding_window=6, num_hidden_layers=3)
    model = randomize_(Gemma2ForCausalLM(config)).eval()
    ids = torch.randint(1, config.vocab_size, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0
    with torch.no_grad():
        one_shot = model(ids, attention_mask=mask).logits
        monkeypatch.setattr(attn, "DEFAULT_SCORE_BUDGET_BYTES", 2 * 4 * 40 * 8 * 5)
        tiled = model(ids, attention_mask=mask).logits
    assert (tiled - one_shot).abs().max() <= 1e-5
