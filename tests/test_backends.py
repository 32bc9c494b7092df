"""Backends applied to a built model, switched in one process, over every kernel variant this machine runs.

The fused native decode step must equal the op-by-op path (with the same backend's per-op kernels)
bit for bit, also with rows of one batch at different positions and in non-consecutive cache rows;
both must agree with PyTorch's ops to bf16 rounding.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import quantizable_model

from gemma2 import Gemma2Cache, InputError
from gemma2 import quant as qz
from gemma2.attention import ATTENTION_FUNCTIONS, register_attention
from gemma2.backends import apply_backend, describe, reset
from gemma2.backends.cpu import decode, library, prefill
from gemma2.backends.cpu.layers import NativeLinear, NativeRMSNorm

COMPILER = shutil.which("cc") or shutil.which("gcc")
VARIANTS = [
    pytest.param(
        "avx512",
        marks=pytest.mark.skipif(
            not library._cpu_supports_kernels(library.CPU_FEATURES), reason="this CPU has no AVX-512 BF16/VNNI"
        ),
    ),
    pytest.param(
        "avx2",
        marks=pytest.mark.skipif(
            not library._cpu_supports_kernels(library.AVX2_CPU_FEATURES), reason="this CPU has no AVX2/FMA/F16C"
        ),
    ),
    pytest.param(
        "neon",
        marks=pytest.mark.skipif(
            not library._cpu_supports_kernels(library.NEON_CPU_FEATURES), reason="this CPU has no NEON dot products"
        ),
    ),
    pytest.param("scalar", marks=pytest.mark.skipif(COMPILER is None, reason="no C compiler")),
]


@pytest.fixture
def variant(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test on one kernel variant, then give the process back its own choice."""
    library.use_variant(request.param)
    try:
        assert library.variant() == request.param, f"the {request.param} kernels must build and load here"
        yield request.param
    finally:
        library.use_variant(None)


def model_of(width: str, seed: int = 0) -> Any:
    model = quantizable_model(seed=seed, num_hidden_layers=3)
    return model if width == "bf16" else qz.quantize(model, width, group_size=64)


def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Layers each fused decode call ran."""
    calls: list[int] = []
    real = decode.decode_layers

    def spy(*args: Any) -> tuple[torch.Tensor, int]:
        out, done = real(*args)
        calls.append(done)
        return out, done

    monkeypatch.setattr(decode, "decode_layers", spy)
    return calls


@torch.no_grad()
def staggered_decode(model: Any, rows: list[int], steps: int = 4) -> tuple[torch.Tensor, Gemma2Cache]:
    """Prefill 8 prompts of lengths 3..10 into the given cache rows, then decode all rows together."""
    g = torch.Generator().manual_seed(7)
    cache = Gemma2Cache(model.config, max_length=32, max_batch=8)
    last = []
    for i, row in enumerate(rows):
        prompt = torch.randint(2, 200, (1, 3 + i), generator=g)
        out = model(prompt, past_key_values=cache, cache_rows=torch.tensor([row]), logits_to_keep=1)
        last.append(out.logits[0, -1].argmax())
    logits = []
    tokens = torch.stack(last)[:, None]
    index = torch.tensor(rows)
    for _ in range(steps):
        out = model(tokens, past_key_values=cache, cache_rows=index, logits_to_keep=1).logits[:, -1]
        logits.append(out)
        tokens = out.float().argmax(-1, keepdim=True)
    return torch.stack(logits, dim=1), cache


ROW_ORDERS = {"consecutive": list(range(8)), "scattered": [5, 2, 7, 0, 3, 6, 1, 4]}


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("width", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("order", sorted(ROW_ORDERS))
def test_fused_decode_of_rows_at_different_positions_equals_the_op_path(
    variant: str, width: str, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_of(width)
    assert model.backend == "cpu"
    calls = fused_calls(monkeypatch)
    fused, fused_cache = staggered_decode(model, ROW_ORDERS[order])
    assert calls == [3] * 4  # every layer of every decode step in the one native call
    model.model.decode_step = None  # op by op, with the same backend's kernels per op
    ops, ops_cache = staggered_decode(model, ROW_ORDERS[order])
    assert torch.equal(fused, ops)
    assert ops_cache.lengths is not None and fused_cache.lengths is not None
    assert torch.equal(fused_cache.lengths, ops_cache.lengths)
    for a, b in zip([*fused_cache.keys, *fused_cache.values], [*ops_cache.keys, *ops_cache.values], strict=True):
        assert a is not None and b is not None and torch.equal(a, b)
    # And PyTorch's ops agree to bf16 rounding (plus activation rounding for quantized weights).
    apply_backend(model, "torch")
    reference, _ = staggered_decode(model, ROW_ORDERS[order])
    scale = reference.float().abs().max()
    tolerance = 0.02 if width == "bf16" else 0.08
    assert (fused.float() - reference.float()).abs().max() <= tolerance * scale
    assert (fused.float().argmax(-1) == reference.float().argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
def test_backends_switch_back_and_forth_in_one_process(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prompts in bf16 products under both backends (not in float32: tests/test_prefill_float32.py).
    monkeypatch.setenv(prefill.SETTING_ENV, "0")
    model = model_of("bf16")
    ids = torch.randint(2, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    apply_backend(model, "torch")
    assert model.backend == "torch" and describe(model).startswith("torch")
    assert not any(isinstance(m, (NativeLinear, NativeRMSNorm)) for m in model.modules())
    assert model.model.decode_step is None
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=5, eos_token_id=[])
        plain_logits = model(ids).logits
    assert apply_backend(model, "cpu") == "cpu"
    assert describe(model) == f"cpu (native {variant} kernels)"
    assert isinstance(model.lm_head, NativeLinear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.decode_step is not None
    with torch.no_grad():
        native = model.generate(ids, max_new_tokens=5, eos_token_id=[])
        native_logits = model(ids).logits
    assert (native[:, :9] == ids).all() and native.shape == plain.shape
    # Prompts run PyTorch's matmul under both backends: the same logits.
    assert torch.equal(native_logits, plain_logits)
    apply_backend(model, "torch")
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=5, eos_token_id=[]), plain)


def test_state_dict_and_tied_weights_survive_the_backends() -> None:
    model = model_of("bf16")
    keys = list(model.state_dict())
    for name in ("cpu", "torch", "auto"):
        if name == "cpu" and not library.available():
            continue
        apply_backend(model, name)
        assert list(model.state_dict()) == keys
        assert model.lm_head.weight is model.model.embed_tokens.weight
    twin = copy.deepcopy(model)
    assert twin.backend == model.backend


def test_quantize_keeps_the_backend_and_gives_the_new_layers_its_kernels() -> None:
    if not library.available():
        pytest.skip("no native kernels on this machine")
    model = quantizable_model()
    apply_backend(model, "cpu")
    qz.quantize(model, "int8")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, qz.Int8Linear) and layer.decode_kernel is not None and layer.expand_kernel is not None
    reset(model)
    assert layer.decode_kernel is None and layer.expand_kernel is None


def test_unknown_backends_and_variants_are_refused() -> None:
    model = model_of("bf16")
    with pytest.raises(InputError, match="backend must be one of auto, cpu, torch, got 'gpu'"):
        apply_backend(model, "gpu")
    with pytest.raises(ValueError, match="kernel variant must be one of"):
        library.use_variant("sse2")


def test_the_cpu_backend_without_kernels_is_a_clear_error() -> None:
    library.use_variant("off")
    try:
        model = model_of("bf16")
        assert model.backend == "torch"  # "auto" fell back to PyTorch's ops
        with pytest.raises(InputError, match="cpu backend needs the native kernels"):
            apply_backend(model, "cpu")
    finally:
        library.use_variant(None)


def test_attention_kernels_that_cannot_soft_cap_do_not_register() -> None:
    with pytest.raises(ValueError, match="cannot soft-cap"):
        register_attention("flash-without-cap", ATTENTION_FUNCTIONS["eager"], soft_caps=False)
    assert "flash-without-cap" not in ATTENTION_FUNCTIONS


def test_layers_the_fused_decode_cannot_take_are_logged_once_when_the_backend_is_applied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not library.available():
        pytest.skip("no native kernels on this machine")
    from gemma2.train.lora import apply_lora

    model = model_of("bf16")
    model.model.layers[1].self_attn.q_proj = torch.nn.Linear(128, 128, bias=False).bfloat16()  # not the backend's
    with caplog.at_level("INFO", logger="gemma2.backends.cpu.decode"):
        apply_backend(model, "cpu")  # the fresh Linear becomes the backend's: every layer runs natively
        assert not [r for r in caplog.records if "op by op" in r.getMessage()]
        apply_lora(model, rank=2, alpha=4.0, targets=("v_proj",))
        apply_backend(model, "cpu")
    messages = [r.getMessage() for r in caplog.records if "op by op" in r.getMessage()]
    assert len(messages) == 1  # once per apply, not per step
    ids = torch.randint(2, 200, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # LoRA-wrapped layers decode op by op (the wrapper has no bias attribute to read)
        assert model.generate(ids, max_new_tokens=3, eos_token_id=[]).shape == (2, 8)
    assert "takes 0 of 3 layers; from layer 0 on they run op by op (it cannot take layers 0, 1, 2" in messages[0]
