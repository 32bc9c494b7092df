"""Decoder layers in one native call, for decode steps on the CPU.

A decode step of gemma-2-2b runs about 30 small PyTorch ops per layer around its seven matrix-vector
products: norms, rotary, cache writes, masks, residual adds, the activation. Each costs microseconds
of dispatch, and between layers that Python runs with caches the weight streams just flushed: a
whole step of it takes 1.2 ms warm and 8 ms interleaved with the layers. kernels_avx512.c's
gemma2_decode_layers runs the layers one after another in one call, with the same kernels and the
same roundings, so its output is bit for bit what Gemma2DecoderLayer's op-by-op path gives
(tests/test_decode_layer.py).

It takes the leading layers whose every piece it knows: Linear (bf16), Int8Linear or Int4Linear
projections, bf16 norms, no hooks, no autograd, no dropout, one new token per row, at most
cpu_kernels.MAX_ROWS rows. The model runs the remaining layers op by op (LoRA-wrapped projections,
hooks, or a layer whose quantized projections meet NaN or infinite activations).
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.modules.module as torch_modules

from gemma2.backends.cpu import kernels as cpu_kernels
from gemma2.backends.cpu.layers import NativeLinear
from gemma2.cache import Gemma2Cache
from gemma2.quant import Int4Linear, Int8Linear

if TYPE_CHECKING:
    from gemma2.cache import CacheStep
    from gemma2.model import AttentionInputs, Gemma2DecoderLayer, Gemma2Model

logger = logging.getLogger(__name__)

_ptr, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [
        ("kind", _i64),
        ("weight", _ptr),
        ("scale", _ptr),
        ("bias", _ptr),
        ("N", _i64),
        ("K", _i64),
        ("group", _i64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _Linear) for name in ("q", "k", "v", "o", "gate", "up", "down")),
        *((name, _ptr) for name in ("input_norm", "post_attention_norm", "pre_feedforward_norm")),
        ("post_feedforward_norm", _ptr),
        ("activation", _ptr),
        ("eps", _f32),
        ("scaling", _f32),
        ("softcap", _f32),
        ("heads", _i64),
        ("kv_heads", _i64),
        ("head_dim", _i64),
        ("window", _i64),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("cos", _ptr),
        ("sin", _ptr),
        ("cos_stride", _i64),
        ("padding", _ptr),
        ("padding_stride", _i64),
        ("query", _ptr),
    ]


class _Cache(ctypes.Structure):
    _fields_ = [
        ("keys", _ptr),
        ("values", _ptr),
        ("batch_stride", _i64),
        ("head_stride", _i64),
        ("rows", _ptr),
        ("positions", _ptr),
        ("positions_stride", _i64),
        ("slots", _i64),
        ("slot", _ptr),
    ]


# What the native path keeps between steps, outside the layers and caches themselves (ctypes
# structures would stop them from being copied or pickled): each layer's C description with the key
# it was built for, and each cache's C views of its layers.
_descriptions: weakref.WeakKeyDictionary[Any, _Described] = weakref.WeakKeyDictionary()
_cache_views: weakref.WeakKeyDictionary[Any, dict[int, _Cache]] = weakref.WeakKeyDictionary()


@lru_cache(maxsize=8)
def activation_table(name: str) -> torch.Tensor:
    """The activation of every bf16 value, indexed by its bits: exactly what the op-by-op path computes."""
    from gemma2.model import activation

    every_value = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return activation(name, every_value).contiguous()


def _linear(module: Any) -> _Linear | None:
    """The C description of a projection, or None when the native kernels cannot run it."""
    kind = type(module)
    if kind not in (NativeLinear, Int8Linear, Int4Linear):
        # e.g. a LoRA wrapper, or a plain nn.Linear put in after the backend (its F.linear rounds otherwise)
        return None
    bias = module.bias
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        return None
    bias_ptr = None if bias is None else bias.data_ptr()
    if kind is NativeLinear:
        weight = module.weight
        if weight.dtype != torch.bfloat16 or not weight.is_contiguous() or weight.shape[1] % 32:
            return None
        return _Linear(0, weight.data_ptr(), None, bias_ptr, *weight.shape, 0)
    if kind is Int8Linear or kind is Int4Linear:
        scale = module.weight_scale
        if scale.dtype != torch.float32 or not scale.is_contiguous() or not module.weight.is_contiguous():
            return None
        if module.in_features % 32:
            return None
        group = module.group_size if kind is Int4Linear else 0
        return _Linear(
            1 if kind is Int8Linear else 2,
            module.weight.data_ptr(),
            scale.data_ptr(),
            bias_ptr,
            module.out_features,
            module.in_features,
            group,
        )
    return None


def _parts(layer: Gemma2DecoderLayer) -> list[Any]:
    """The seven projections, then the four norms, read from the module dicts."""
    attn, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules  # type: ignore[union-attr]
    norms = layer._modules
    return [
        attn["q_proj"],
        attn["k_proj"],
        attn["v_proj"],
        attn["o_proj"],
        mlp["gate_proj"],
        mlp["up_proj"],
        mlp["down_proj"],
        norms["input_layernorm"],
        norms["post_attention_layernorm"],
        norms["pre_feedforward_layernorm"],
        norms["post_feedforward_layernorm"],
    ]


def _describe(layer: Gemma2DecoderLayer, parts: list[Any]) -> _Layer | None:
    linears = [_linear(module) for module in parts[:7]]
    norms = [module.weight for module in parts[7:]]
    if any(linear is None for linear in linears):
        return None
    if any(w.dtype != torch.bfloat16 or not w.is_contiguous() or w.device.type != "cpu" for w in norms):
        return None
    if len({module.eps for module in parts[7:]}) != 1:  # the C layer takes one epsilon
        return None
    attn = layer.self_attn
    if attn.head_dim % 32:
        return None
    table = activation_table(layer.mlp.activation)
    description = _Layer(
        *linears,
        *(w.data_ptr() for w in norms),
        table.data_ptr(),
        layer.input_layernorm.eps,
        attn.scaling,
        attn.softcap or 0.0,
        # From the projections' sizes, as the op-by-op forward takes them (not the config's).
        parts[0].out_features // attn.head_dim,
        parts[1].out_features // attn.head_dim,
        attn.head_dim,
        attn.window or 0,
    )
    return description


class _Described:
    """A layer's C description and what it was built from, to tell cheaply whether it still holds."""

    def __init__(self, layer: Gemma2DecoderLayer, parts: list[Any]) -> None:
        self.description = _describe(layer, parts)
        attn, mlp = layer._modules["self_attn"], layer._modules["mlp"]
        assert attn is not None and mlp is not None
        owners = [attn._modules] * 4 + [mlp._modules] * 3 + [layer._modules] * 4
        names = [*_PART_NAMES]
        # (dict, key, object): each part must still be the module it was, in the dict that holds it.
        self.modules = [(layer._modules, "self_attn", attn), (layer._modules, "mlp", mlp)]
        self.modules += [(owner, name, part) for owner, name, part in zip(owners, names, parts, strict=True)]
        # (dict, key, tensor, address): each parameter and buffer still that tensor, at that address
        # (module.to() keeps a Parameter object but gives it new storage).
        self.tensors = [
            (store, key, tensor, tensor.data_ptr())
            for part in parts
            for store in (part._parameters, part._buffers)
            for key, tensor in store.items()
            if tensor is not None
        ]
        # A hook on any of them (e.g. tensor parallelism's all-reduce on the blocks) must run: op by op.
        self.hooked = [layer, attn, mlp, *parts]

    def holds(self) -> bool:
        for owner, name, module in self.modules:
            if owner.get(name) is not module:
                return False
        for store, key, tensor, address in self.tensors:
            now = store.get(key)
            if now is not tensor or now.data_ptr() != address:
                return False
        return True


_PART_NAMES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


def _layer_description(layer: Gemma2DecoderLayer) -> _Layer | None:
    """The layer's C description: built once, rebuilt only when a part or a tensor's storage changed.

    Hooks and autograd send the layer op by op (they must see its modules run).
    """
    if torch_modules._global_forward_hooks or torch_modules._global_forward_pre_hooks:
        return None
    described = _descriptions.get(layer)
    if described is None or not described.holds():
        described = _Described(layer, _parts(layer))
        _descriptions[layer] = described
    for module in described.hooked:
        if module._forward_hooks or module._forward_pre_hooks:
            return None
    if torch.is_grad_enabled() and any(tensor.requires_grad for _, _, tensor, _ in described.tensors):
        return None
    return described.description


class _StepArrays:
    """The per-row int64 arrays one decode step hands to C (kept alive for the call)."""

    def __init__(self, cache: Gemma2Cache, step: CacheStep) -> None:
        self.rows = step.rows.to(torch.int64).contiguous()
        self.queries = step.query_positions[:, 0].contiguous()
        self.ring_slots = None if step.ring_slots is None else step.ring_slots[:, 0].contiguous()
        self.ring_positions = cache.ring_positions


def _cache_view(
    cache: Gemma2Cache, layer: int, like: torch.Tensor, step: CacheStep, arrays: _StepArrays, kv_heads: int
) -> _Cache:
    """The C view of one layer's buffers for this step (rebuilt when the buffers are reallocated)."""
    keys, values = cache.buffers(layer, like, kv_heads)
    views = _cache_views.setdefault(cache, {})
    view = views.get(layer)
    if view is None or view.keys != keys.data_ptr():
        view = _Cache(keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), None, None, 0, 0, None)
        views[layer] = view
    view.rows = arrays.rows.data_ptr()
    if cache.sliding[layer]:
        assert arrays.ring_slots is not None and arrays.ring_positions is not None
        view.positions = arrays.ring_positions.data_ptr()
        view.positions_stride = arrays.ring_positions.shape[1]
        view.slots = cache.ring
        view.slot = arrays.ring_slots.data_ptr()
    else:
        view.positions = None
        view.slots = step.full_slots
        view.slot = arrays.queries.data_ptr()  # a full layer's slot is the position
    return view


def decode_layers(
    layers: Iterable[Any], h: torch.Tensor, inputs: AttentionInputs, cache: Gemma2Cache
) -> tuple[torch.Tensor, int]:
    """Run the longest leading run of layers the native call can take, for h [B, 1, d].

    Each row sits at its own position (inputs.step). Returns the hidden states after them and how
    many ran (0: h unchanged). Their cache buffers hold the new token (the model commits the step
    after all layers); the caller runs the rest op by op.
    """
    B, T, _ = h.shape
    cos, sin, step = inputs.cos, inputs.sin, inputs.step
    if (
        T != 1
        or step is None
        or not 0 < B <= cpu_kernels.MAX_ROWS
        or inputs.full_mask.query_segments is not None
        or not cpu_kernels.small_op_applies(h, cos, sin)
        or cos.shape[0] not in (1, B)
        or not (cos.is_contiguous() and sin.is_contiguous())
        or not isinstance(cache, Gemma2Cache)
    ):
        return h, 0
    arrays = _StepArrays(cache, step)
    descriptions: list[_Layer] = []
    views: list[_Cache] = []
    for index, layer in enumerate(layers):
        if layer.training and layer.self_attn.dropout > 0:
            break
        description = _layer_description(layer)
        if description is None:
            break
        descriptions.append(description)
        views.append(_cache_view(cache, index, h, step, arrays, description.kv_heads))
    if not descriptions:
        return h, 0
    count = len(descriptions)
    padding = None if inputs.padding is None else inputs.padding.to(torch.uint8).contiguous()
    c_step = _Step(
        cos.data_ptr(),
        sin.data_ptr(),
        descriptions[0].head_dim if cos.shape[0] == B and B > 1 else 0,
        None if padding is None else padding.data_ptr(),
        0 if padding is None or padding.shape[0] == 1 else padding.shape[1],
        arrays.queries.data_ptr(),
    )
    h = h.contiguous()
    out = torch.empty_like(h)
    library = cpu_kernels._library()
    assert library is not None
    done = library.gemma2_decode_layers(
        count,
        (ctypes.c_void_p * count)(*(ctypes.addressof(d) for d in descriptions)),
        (ctypes.c_void_p * count)(*(ctypes.addressof(v) for v in views)),
        ctypes.byref(c_step),
        h.data_ptr(),
        out.data_ptr(),
        B,
        torch.get_num_threads(),
    )
    return (out if done else h), done


def decode_step(
    model: Gemma2Model, h: torch.Tensor, inputs: AttentionInputs, cache: Gemma2Cache
) -> tuple[torch.Tensor, int]:
    """The model's decode-step hook (Gemma2Model.decode_step): its leading layers in one native call."""
    return decode_layers(model.layers, h, inputs, cache)


def plan(model: Gemma2Model) -> list[int]:
    """Describe every layer once for the native call; returns the layers it cannot take (logged once).

    The descriptions are kept (keyed by the modules and tensors they point into) and rebuilt only
    when one of those changes, e.g. after quantizing or merging LoRA weights.
    """
    falling_back = []
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            if _layer_description(layer) is None:  # type: ignore[arg-type]
                falling_back.append(index)
    if falling_back:
        first, total = falling_back[0], len(model.layers)
        logger.info(
            "gemma2: the native decode step takes %d of %d layers; from layer %d on they run op by op "
            "(it cannot take layers %s: a projection or norm it does not know, e.g. LoRA, float32 or an odd size)",
            first,
            total,
            first,
            ", ".join(map(str, falling_back)),
        )
    return falling_back
