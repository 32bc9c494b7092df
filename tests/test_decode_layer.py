"""The native decode layer (gemma2.backends.cpu.decode) against the op-by-op path it replaces.

Both use the same kernels and roundings, so decode logits, caches and generated tokens must be bit
for bit equal, over every cache kind (full, sliding ring that wraps, short ring that grows),
padding, batches, attention bias, activations and weight widths. They run on the variant "auto"
picks for this CPU (avx512, avx2 or neon) and on the portable scalar variant where there is none
(GEMMA2_TEST_KERNELS=scalar forces one), so every machine with a C compiler checks the fused path.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import quantizable_model

from gemma2 import quant as qz
from gemma2.backends.cpu import decode as decode_layer
from gemma2.backends.cpu import library
from gemma2.cache import Gemma2Cache


def _variant() -> str | None:
    if os.environ.get("GEMMA2_TEST_KERNELS"):
        return os.environ["GEMMA2_TEST_KERNELS"]
    for name in library.AUTO_ORDER:
        if library._cpu_supports_kernels(library.VARIANTS[name].cpu_features):
            return name
    return "scalar" if shutil.which("cc") or shutil.which("gcc") else None


VARIANT = _variant()
pytestmark = pytest.mark.skipif(VARIANT is None, reason="needs a C compiler for the native kernels")


@pytest.fixture(autouse=True)
def kernels() -> Iterator[None]:
    library.use_variant(VARIANT)
    assert library.variant() == VARIANT
    yield
    library.use_variant(None)


@pytest.fixture
def native_layer_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many layers the native call ran, for each decode step."""
    calls: list[int] = []
    real = decode_layer.decode_layers

    def spy(*args: Any) -> tuple[torch.Tensor, int]:
        h, done = real(*args)
        calls.append(done)
        return h, done

    monkeypatch.setattr("gemma2.backends.cpu.decode.decode_layers", spy)
    return calls


def op_by_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gemma2.backends.cpu.decode.decode_layers", lambda layers, h, *args: (h, 0))


@torch.no_grad()
def decode_run(
    model: Any, ids: torch.Tensor, prompt: int, mask: torch.Tensor | None = None, max_length: int | None = None
) -> tuple[torch.Tensor, Gemma2Cache]:
    """Logits of every decode step (the prompt in one call, then one token per call) and the cache."""
    cache = Gemma2Cache(model.config, max_length=max_length)
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs["attention_mask"] = mask[:, :prompt]
    steps = [model(ids[:, :prompt], past_key_values=cache, use_cache=True, **kwargs).logits[:, -1:]]
    for t in range(prompt, ids.shape[1]):
        if mask is not None:
            kwargs["attention_mask"] = mask[:, : t + 1]
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, **kwargs).logits)
    return torch.cat(steps, dim=1), cache


def model_of(width: str, seed: int = 0, **overrides: Any) -> Any:
    model = quantizable_model(seed=seed, **overrides)
    return model if width == "bf16" else qz.quantize(model, width, group_size=64)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def assert_same_caches(a: Gemma2Cache, b: Gemma2Cache) -> None:
    assert a.lengths is not None and b.lengths is not None
    assert torch.equal(a.lengths, b.lengths)
    assert a.ring_positions is not None and b.ring_positions is not None
    assert torch.equal(a.ring_positions, b.ring_positions)
    for x, y in zip([*a.keys, *a.values], [*b.keys, *b.values], strict=True):
        assert x is not None and y is not None and x.shape == y.shape
        assert same(x, y)


CASES = [
    # width, batch, prompt, total, max_length, extra config
    ("bf16", 1, 3, 16, None, {}),  # the ring of 6 slots wraps twice
    ("bf16", 3, 5, 14, 14, {}),  # a short ring (max_length) sized to the whole run
    ("bf16", 2, 2, 12, 4, {}),  # a ring shorter than the window that has to grow
    ("int8", 2, 4, 13, None, {}),
    ("int4", 1, 4, 13, None, {}),
    ("bf16", 2, 4, 12, None, {"attention_bias": True}),
    ("int8", 1, 4, 12, None, {"attention_bias": True}),
    ("bf16", 1, 4, 12, None, {"hidden_activation": "gelu"}),
    ("bf16", 2, 4, 12, None, {"attn_logit_softcapping": None}),
    ("bf16", 8, 3, 9, None, {"num_key_value_heads": 4, "head_dim": 64}),
    ("bf16", 1, 4, 12, None, {"sliding_window": 100, "num_hidden_layers": 3}),
]


@pytest.mark.parametrize(("width", "B", "prompt", "total", "max_length", "extra"), CASES)
def test_native_layer_equals_the_op_by_op_path(
    width: str,
    B: int,
    prompt: int,
    total: int,
    max_length: int | None,
    extra: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    native_layer_calls: list[int],
) -> None:
    model = model_of(width, **extra)
    if extra.get("attention_bias"):
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.copy_(torch.randn(proj.bias.shape) * 0.5)
    ids = torch.randint(2, 200, (B, total), generator=torch.Generator().manual_seed(B + total))
    fast, fast_cache = decode_run(model, ids, prompt, max_length=max_length)
    layers = model.config.num_hidden_layers
    assert native_layer_calls == [layers] * (total - prompt)
    op_by_op(monkeypatch)
    slow, slow_cache = decode_run(model, ids, prompt, max_length=max_length)
    assert torch.equal(fast, slow)
    assert_same_caches(fast_cache, slow_cache)


def test_left_padded_rows_see_only_their_tokens(monkeypatch: pytest.MonkeyPatch, native_layer_calls: list[int]) -> None:
    model = model_of("bf16")
    ids = torch.randint(2, 200, (3, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    fast, _ = decode_run(model, ids, 6, mask)
    assert native_layer_calls == [2] * 8
    op_by_op(monkeypatch)
    slow, _ = decode_run(model, ids, 6, mask)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("width", ["bf16", "int8", "int4"])
def test_generate_uses_the_native_layer_and_gives_the_same_tokens(
    width: str, monkeypatch: pytest.MonkeyPatch, native_layer_calls: list[int]
) -> None:
    model = model_of(width)
    prompt = torch.randint(2, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    fast = model.generate(prompt, max_new_tokens=12, eos_token_id=[])
    assert native_layer_calls == [2] * 11
    op_by_op(monkeypatch)
    assert torch.equal(fast, model.generate(prompt, max_new_tokens=12, eos_token_id=[]))


def test_generate_with_left_padding_matches_the_op_by_op_path(
    monkeypatch: pytest.MonkeyPatch, native_layer_calls: list[int]
) -> None:
    """Padded rows get their own positions (rotary per row) and mask their padding slots."""
    model = model_of("int4")
    prompt = torch.randint(2, 200, (3, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    mask[2, :1] = 0
    fast = model.generate(prompt, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert native_layer_calls == [2] * 9
    op_by_op(monkeypatch)
    assert torch.equal(fast, model.generate(prompt, attention_mask=mask, max_new_tokens=10, eos_token_id=[]))


def test_non_finite_activations_fall_back_without_touching_the_cache(
    monkeypatch: pytest.MonkeyPatch, native_layer_calls: list[int]
) -> None:
    """int8 layers cannot carry inf: the native call stops there and the op-by-op path goes on."""
    model = model_of("int8", num_hidden_layers=3)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("inf")
    ids = torch.randint(2, 200, (1, 8), generator=torch.Generator().manual_seed(2))
    fast, fast_cache = decode_run(model, ids, 4)
    assert native_layer_calls == [1] * 4  # layer 1 sees inf after its norm in every step
    op_by_op(monkeypatch)
    slow, slow_cache = decode_run(model, ids, 4)
    assert same(fast, slow)
    assert_same_caches(fast_cache, slow_cache)


def test_layers_with_hooks_grad_or_other_projections_use_the_op_by_op_path(native_layer_calls: list[int]) -> None:
    model = model_of("bf16", num_hidden_layers=3)
    ids = torch.randint(2, 200, (1, 6), generator=torch.Generator().manual_seed(4))
    seen: list[torch.Size] = []
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    want, _ = decode_run(model, ids, 4)
    assert native_layer_calls == [1, 1]  # layer 0 natively, then op by op from the hooked layer 1
    assert len(seen) == 3  # the prompt and both decode steps ran the hooked module
    handle.remove()
    native_layer_calls.clear()
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, a: None)
    got, _ = decode_run(model, ids, 4)
    assert native_layer_calls == [0, 0] and torch.equal(got, want)
    handle.remove()
    native_layer_calls.clear()
    model.model.layers[2].self_attn.o_proj = torch.nn.Linear(128, 128, bias=False).bfloat16()
    decode_run(model, ids, 4)
    assert native_layer_calls == [2, 2]
    native_layer_calls.clear()
    with torch.enable_grad():
        model.requires_grad_(True)
        cache = Gemma2Cache(model.config)
        model(ids[:, :4], past_key_values=cache, use_cache=True)
        model(ids[:, 4:5], past_key_values=cache, use_cache=True).logits.sum().backward()
    assert native_layer_calls == [0]
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_hidden_states_output_runs_every_layer_op_by_op(native_layer_calls: list[int]) -> None:
    model = model_of("bf16")
    ids = torch.randint(2, 200, (1, 6), generator=torch.Generator().manual_seed(4))
    cache = Gemma2Cache(model.config)
    with torch.no_grad():
        model(ids[:, :5], past_key_values=cache, use_cache=True)
        out = model(ids[:, 5:], past_key_values=cache, use_cache=True, output_hidden_states=True)
    assert native_layer_calls == [] and len(out.hidden_states) == 3


def test_replacing_weights_rebuilds_the_layer_description() -> None:
    """The layer's pointers are cached; a new weight tensor (to(), load_state_dict(assign=True)) must be seen."""
    model = model_of("bf16")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05)
    ids = torch.randint(2, 200, (1, 7), generator=torch.Generator().manual_seed(6))
    decode_run(model, ids, 4)  # builds the descriptions
    model.load_state_dict(other.state_dict(), assign=True)
    got, _ = decode_run(model, ids, 4)
    want, _ = decode_run(other, ids, 4)
    assert torch.equal(got, want)


def test_activation_table_is_the_activation_of_every_bf16_value() -> None:
    from gemma2.model import activation

    table = decode_layer.activation_table("gelu_pytorch_tanh")
    values = torch.randn(4096).bfloat16()
    bits = values.view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(table[bits], activation("gelu_pytorch_tanh", values))


def test_models_and_caches_stay_copyable_and_picklable_after_native_steps() -> None:
    import io

    model = model_of("int8")
    ids = torch.randint(2, 200, (1, 7), generator=torch.Generator().manual_seed(8))
    _, cache = decode_run(model, ids, 4)
    twin, twin_cache = copy.deepcopy(model), copy.deepcopy(cache)
    torch.save(model, io.BytesIO())
    # The copies decode on their own buffers: the same next logits as the originals.
    with torch.no_grad():
        a = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
        b = twin(ids[:, -1:], past_key_values=twin_cache, use_cache=True).logits
    assert torch.equal(a, b)
    assert cache.keys[0].data_ptr() != twin_cache.keys[0].data_ptr()
