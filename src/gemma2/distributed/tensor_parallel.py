"""Tensor parallelism over a built Gemma 2 model: keep this rank's slices (plan.py), join the partial sums.

    import torch.distributed as dist
    dist.init_process_group("gloo")            # or under torchrun: gemma2.distributed.launch.init_from_env()
    model = Gemma2ForCausalLM.from_pretrained(path, tp_plan="auto")   # reads only this rank's slices
    model = shard_model(Gemma2ForCausalLM.from_pretrained(path))       # or: split a model already built

A sharded model is still a model: the same forward, the same cache (sized from its own key/value
heads), the same engine. What changes is inside: each attention and MLP block's output is
all-reduced (a forward hook, as gpt-fast's tp.py does it), the embedding looks up only its own
vocabulary rows, and the LM head gives this rank its shard of the logits, which `forward` gathers
(`vocab_shard=True` skips that, and `greedy_tokens_of_shard` takes the argmax across ranks from
a value and an index per rank). The final soft-cap is elementwise, so capping each shard is
capping the whole, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gemma2.distributed.collectives import Collectives
from gemma2.distributed.plan import ROWWISE, VOCAB, Layout, check_size, style_of, tensor_slice
from gemma2.errors import InputError


@dataclass
class TensorParallel:
    """What a sharded model records about its split (model.tensor_parallel)."""

    layout: Layout
    collectives: Collectives

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def rank(self) -> int:
        return self.layout.rank


class VocabParallel:
    """The LM head's side: gather the shards of the logits, or take the argmax across them."""

    def __init__(self, collectives: Collectives, start: int) -> None:
        self.collectives, self.start = collectives, start

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        return self.collectives.all_gather(logits, dim=-1)

    def greedy_tokens(self, local: torch.Tensor) -> torch.Tensor:
        return self.collectives.argmax(local, self.start)


class _ShardedLookup:
    """Hooks that make an embedding holding vocabulary rows [start, stop) answer for every id."""

    def __init__(self, collectives: Collectives, start: int, stop: int) -> None:
        self.collectives, self.start, self.stop = collectives, start, stop
        self.outside: torch.Tensor | None = None

    def before(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids = args[0]
        self.outside = (ids < self.start) | (ids >= self.stop)
        return ((ids - self.start).masked_fill(self.outside, 0), *args[1:])

    def after(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        assert self.outside is not None
        rows = out.masked_fill(self.outside[..., None], 0)
        self.outside = None
        return self.collectives.all_reduce(rows)


def backbone_of(model: Any) -> Any:
    """The Gemma2Model inside a head model (or the model itself)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "layers") else model


def layout_for(model: Any, collectives: Collectives, int4_group: int | None = None) -> Layout:
    check_size(model.config, collectives.size, int4_group)
    return Layout.of(model.config, collectives.rank, collectives.size)


def keep_local_slices(model: Any, layout: Layout) -> None:
    """Replace every split weight by this rank's slice and resize its module to match.

    Works on a meta skeleton (before loading: the loader then reads only these slices) and on a
    model with its weights (the rest of each weight is freed).
    """
    backbone = backbone_of(model)
    for name, module in backbone.named_modules():
        style = style_of(name)
        if style is None:
            continue
        for store in (module._parameters, module._buffers):
            for key, tensor in list(store.items()):
                spec = None if tensor is None else tensor_slice(name, key, tuple(tensor.shape), layout)
                if spec is None:
                    continue
                dim, start, stop = spec
                local = tensor.detach().narrow(dim, start, stop - start).clone()
                if key in module._parameters:
                    local = nn.Parameter(local, requires_grad=tensor.requires_grad)
                store[key] = local
        _resize(module, style, layout)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # the head is the embedding: its shard of the vocabulary too


def _resize(module: Any, style: str, layout: Layout) -> None:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if style == VOCAB:
        start, stop = layout.vocab_range
        module.num_embeddings = stop - start
        padding = getattr(module, "padding_idx", None)
        module.padding_idx = padding - start if padding is not None and start <= padding < stop else None
        return
    if style == ROWWISE:
        module.in_features //= layout.size
    else:
        module.out_features = weight.shape[0]
    if hasattr(module, "_torch_layout"):
        module._torch_layout = None  # an int4 layer's PyTorch layout was built from the whole weight


def row_absmax(model: Any, collectives: Collectives) -> dict[nn.Module, torch.Tensor]:
    """Each row-split linear's whole rows' largest |w| (from every rank's columns): int8 quantizes
    with it, so that a sharded model's int8 weights are those of the model on one process."""
    found: dict[nn.Module, torch.Tensor] = {}
    for name, module in backbone_of(model).named_modules():
        if style_of(name) == ROWWISE and isinstance(module, nn.Linear):
            peak = module.weight.detach().float().abs().amax(dim=1)
            found[module] = collectives.all_reduce(peak, op="max")
    return found


def _all_reduce_output(collectives: Collectives) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return collectives.all_reduce(out)

    return hook


def install(model: Any, collectives: Collectives, layout: Layout) -> Any:
    """Add the communication to a model whose weights are already this rank's slices; returns it."""
    if getattr(model, "tensor_parallel", None) is not None:
        raise InputError("the model is already sharded for tensor parallelism")
    backbone = backbone_of(model)
    for layer in backbone.layers:
        for block, down in ((layer.self_attn, layer.self_attn.o_proj), (layer.mlp, layer.mlp.down_proj)):
            bias = getattr(down, "bias", None)
            if bias is not None and layout.rank != 0:
                with torch.no_grad():
                    bias.zero_()  # a row-split layer's bias is added once, by rank 0, before the sum
            block.register_forward_hook(_all_reduce_output(collectives))
    start, stop = layout.vocab_range
    lookup = _ShardedLookup(collectives, start, stop)
    backbone.embed_tokens.register_forward_pre_hook(lookup.before)
    backbone.embed_tokens.register_forward_hook(lookup.after)
    if hasattr(model, "lm_head"):
        if not model.config.tie_word_embeddings:
            raise InputError("tensor parallelism splits the LM head with the embedding: the config must tie them")
        model.vocab_parallel = VocabParallel(collectives, start)
    model.tensor_parallel = TensorParallel(layout, collectives)
    return model


def shard_model(model: Any, group: Any = None) -> Any:
    """Split an already-built model (full weights on every rank) over `group` (default: the world)."""
    collectives = Collectives(group)
    int4 = next((m.group_size for m in model.modules() if hasattr(m, "group_size")), None)
    layout = layout_for(model, collectives, int4)
    with torch.no_grad():
        keep_local_slices(model, layout)
    install(model, collectives, layout)
    backend = getattr(model, "backend", None)
    if backend is not None:
        from gemma2.backends import apply_backend

        apply_backend(model, backend)  # kernels see the new shapes (and the fused decode is re-planned)
    return model
