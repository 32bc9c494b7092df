"""Prompts in float32 on CPUs without bf16 matrix instructions (gemma2.backends.cpu.prefill).

The float32 products must equal the bf16 path's within bf16 rounding (the same float32 sums in
another order, one rounding), widen the weights a chunk of rows at a time, leave decode-sized calls
and autograd alone, and give a whole model's prompt logits and generated tokens those of PyTorch's
bf16 ops within bf16 rounding. GEMMA2_FLOAT32_PREFILL forces it on or off, so this runs on any CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model, quantizable_model

from gemma2 import quant as qz
from gemma2.backends import apply_backend
from gemma2.backends.cpu import library, prefill

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(not library.available(), reason="the cpu backend needs the native kernels")


@pytest.fixture
def float32_prefill(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(prefill.SETTING_ENV, "1")
    yield


def within_bf16_rounding(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> bool:
    """Two bf16 roundings of the same float32 sums: one bf16 step apart, or float32 cancellation."""
    error = (got.double() - want.double()).abs()
    return bool((error <= 2**-7 * want.double().abs() + 2**-16 * scale).all())


def test_the_setting_and_the_cpu_features_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in (("1", True), ("on", True), ("0", False), ("off", False)):
        monkeypatch.setenv(prefill.SETTING_ENV, value)
        assert prefill.enabled() is expected
    monkeypatch.setenv(prefill.SETTING_ENV, "auto")
    has_bf16 = any(name in library.cpu_features() for name in ("avx512_bf16", "amx_bf16", "bf16"))
    assert prefill.enabled() is (not has_bf16 and library.cpu_architecture() in ("x86_64", "aarch64"))
    monkeypatch.setenv(prefill.SETTING_ENV, "sometimes")
    with pytest.raises(ValueError, match="GEMMA2_FLOAT32_PREFILL='sometimes' is not one of auto, 1, 0"):
        prefill.enabled()


@pytest.mark.parametrize("rows", [9, 64, 300])
def test_linear_equals_the_bf16_product_within_rounding(float32_prefill: None, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 192, generator=g).to(BF16)
    w = (torch.randn(1000, 192, generator=g) * (1 + 30 * (torch.rand(1000, 192, generator=g) > 0.99))).to(BF16)
    got = prefill.linear(x, w.shape[0], lambda lo, hi: w[lo:hi])
    assert got.dtype == BF16 and got.shape == (rows, 1000)
    assert within_bf16_rounding(got, F.linear(x, w), x.double().abs() @ w.double().abs().T)
    exact = (x.double() @ w.double().T).to(BF16)  # one rounding of the true sums: most outputs identical
    assert (got == exact).float().mean() > 0.99


def test_weights_are_widened_a_chunk_at_a_time(float32_prefill: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefill, "CHUNK_BYTES", 64 * 4 * 128)  # 64 rows of 128 float32 weights
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(20, 128, generator=g).to(BF16), torch.randn(333, 128, generator=g).to(BF16)
    asked: list[tuple[int, int]] = []

    def rows_of(lo: int, hi: int) -> torch.Tensor:
        asked.append((lo, hi))
        return w[lo:hi]

    got = prefill.linear(x.view(4, 5, 128), 333, rows_of)
    assert asked == [(lo, min(lo + 64, 333)) for lo in range(0, 333, 64)]
    assert torch.equal(got.view(20, 333), prefill.linear(x, 333, lambda lo, hi: w[lo:hi]))


def test_decode_sized_calls_and_autograd_are_left_alone(float32_prefill: None) -> None:
    x = torch.randn(8, 64).to(BF16)
    assert not prefill.applies(x)  # the native kernels' size
    assert prefill.applies(torch.randn(9, 64).to(BF16))
    assert not prefill.applies(torch.randn(9, 64))  # float32 models multiply in float32 anyway
    w = torch.randn(4, 64).to(BF16).requires_grad_()
    assert not prefill.applies(torch.randn(9, 64).to(BF16), w)
    with torch.no_grad():
        assert prefill.applies(torch.randn(9, 64).to(BF16), w)


def prompt_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("width", ["bf16", "int8", "int4"])
def test_a_models_prompt_logits_equal_pytorchs_bf16_ops_within_rounding(
    width: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = quantizable_model(seed=3, num_hidden_layers=3)
    if width != "bf16":
        model = qz.quantize(model, width, group_size=64)
    ids = torch.randint(3, 203, (2, 40), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv(prefill.SETTING_ENV, "1")
    products = []
    float32_linear = prefill.linear
    monkeypatch.setattr(prefill, "linear", lambda *a: products.append(a[1]) or float32_linear(*a))
    assert apply_backend(model, "cpu") == "cpu"
    fast = prompt_logits(model, ids)
    # It did run in float32. (Its logits may still equal PyTorch's: on a CPU without bf16 instructions
    # PyTorch's bf16 products also sum in float32.)
    assert len(products) >= 3 * 7
    apply_backend(model, "torch")
    reference = prompt_logits(model, ids)
    # Three layers of bf16 rounding differences: small against the logits' scale, and the same argmax
    # nearly everywhere.
    assert (fast - reference).abs().max() <= 0.05 * reference.abs().max()
    assert (fast.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95


def test_prompt_logits_against_transformers_bf16(float32_prefill: None) -> None:
    """The float32 prefill against the reference (transformers' eager bf16) on the same weights, with
    left padding, a window shorter than the prompt and the soft-caps."""
    pytest.importorskip("transformers")
    from gemma2 import Gemma2ForCausalLM

    model = quantizable_model(seed=4, num_hidden_layers=3)
    hf = hf_model(model.config, "causal", std=0.1).to(BF16)
    model.load_state_dict(hf.state_dict(), strict=True)
    assert isinstance(model, Gemma2ForCausalLM) and apply_backend(model, "cpu") == "cpu"
    ids = torch.randint(3, 203, (2, 33), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits.float()
        want = hf(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (got - want)[real].abs().max() <= 0.05 * want[real].abs().max()
    assert (got.argmax(-1) == want.argmax(-1))[real].float().mean() >= 0.95
