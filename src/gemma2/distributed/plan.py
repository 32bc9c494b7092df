"""The tensor-parallel plan: how each weight of a Gemma 2 model splits across processes, as data.

The split is Megatron-LM's (Shoeybi et al. 2019, arXiv:1909.08053), as gpt-fast's tp.py and
transformers' `base_model_tp_plan` write it for a Llama-style layer:

- q, k, v, gate, up ("colwise"): split by output rows. Each process computes its own heads and
  its slice of the MLP's inner size; no communication.
- o, down ("rowwise"): split by input columns. Each process holds a partial sum, and one
  all-reduce per block joins them, before Gemma's post-norms (a norm of a partial sum is wrong).
- the embedding and the tied LM head ("vocab"): one matrix, split by vocabulary rows, so the head
  stays tied to the embedding. A lookup zeroes the ids outside the shard and all-reduces (exact:
  one process contributes each row); the head gives each process its shard of the logits.
- norms: replicated.

Fewer key/value heads than processes: each process holds the one key/value head its query heads
read, replicated size / K times (vLLM's QKVParallelLinear does the same), so the 2B's 4 key/value
heads run at TP 8. `check_size` refuses, before any weight is read, sizes that cannot split and
names those that can.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from gemma2.config import Gemma2Config
from gemma2.errors import InputError

COLWISE, COLWISE_KV, ROWWISE, VOCAB = "colwise", "colwise_kv", "rowwise", "vocab"

# Module names inside the backbone (Gemma2Model) -> how their weights split.
TP_PLAN: dict[str, str] = {
    "layers.*.self_attn.q_proj": COLWISE,
    "layers.*.self_attn.k_proj": COLWISE_KV,
    "layers.*.self_attn.v_proj": COLWISE_KV,
    "layers.*.self_attn.o_proj": ROWWISE,
    "layers.*.mlp.gate_proj": COLWISE,
    "layers.*.mlp.up_proj": COLWISE,
    "layers.*.mlp.down_proj": ROWWISE,
    "embed_tokens": VOCAB,
}
# Parameter and buffer names of the split modules (plain, int8 and int4 layers alike).
SPLIT_TENSORS = ("weight", "weight_scale", "bias")


def style_of(module_name: str) -> str | None:
    """The plan's split of a backbone module ("layers.3.mlp.up_proj"), None for replicated ones."""
    for pattern, style in TP_PLAN.items():
        if fnmatch.fnmatchcase(module_name, pattern):
            return style
    return None


@dataclass(frozen=True)
class Layout:
    """Which slice of each split size this rank holds, for one config at one TP size."""

    rank: int
    size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: Gemma2Config, rank: int, size: int) -> Layout:
        c = config
        return cls(
            rank, size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.vocab_size
        )

    @property
    def local_heads(self) -> int:
        return self.heads // self.size

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.kv_heads // self.size)

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold each key/value head (1 unless there are fewer heads than ranks)."""
        return max(1, self.size // self.kv_heads)

    @property
    def vocab_range(self) -> tuple[int, int]:
        share = self.vocab // self.size
        return self.rank * share, (self.rank + 1) * share

    def rows(self, style: str) -> tuple[int, int]:
        """The output rows [start, stop) of a colwise or vocab-split matrix this rank keeps."""
        D = self.head_dim
        if style == COLWISE_KV:
            first = (self.rank // self.kv_replicas) * self.local_kv_heads
            return first * D, (first + self.local_kv_heads) * D
        if style == VOCAB:
            return self.vocab_range
        raise AssertionError(style)

    def share(self, full: int) -> tuple[int, int]:
        """An even split of `full` (q rows, the MLP's inner size, the o / down inputs): this rank's range."""
        part = full // self.size
        return self.rank * part, (self.rank + 1) * part


def tensor_slice(module_name: str, tensor: str, shape: tuple[int, ...], layout: Layout) -> tuple[int, int, int] | None:
    """(dim, start, stop) of a backbone tensor this rank keeps ("layers.0.mlp.down_proj", "weight"), or None
    for one it keeps whole. Works on stored shapes: int4 weights hold two columns per byte, int4 scales
    one column per group, so column ranges scale with the tensor's own width."""
    style = style_of(module_name)
    if style is None or tensor not in SPLIT_TENSORS or layout.size == 1:
        return None
    if style == ROWWISE:
        # Columns: the weight, and int4's scales per group. int8's scales [N] (one per output row,
        # from the whole row) and the bias stay whole.
        if tensor == "bias" or len(shape) < 2:
            return None
        start, stop = layout.share(shape[1])
        return 1, start, stop
    if style in (COLWISE_KV, VOCAB):
        start, stop = layout.rows(style)
    else:
        start, stop = layout.share(shape[0])
    return 0, start, stop


def parameter_slice(name: str, shape: tuple[int, ...], layout: Layout) -> tuple[int, int, int] | None:
    """tensor_slice for a model's state-dict name ("model.layers.0.mlp.up_proj.weight", or the
    backbone's own "layers.0..."), given the tensor's whole shape."""
    module, _, tensor = name.rpartition(".")
    return tensor_slice(module.removeprefix("model."), tensor, shape, layout)


def problems(config: Gemma2Config, size: int, int4_group: int | None = None) -> list[str]:
    """Why a TP size cannot split this config (empty when it can)."""
    c = config
    found = []
    if size < 1:
        return [f"the TP size must be >= 1, got {size}"]
    if c.num_attention_heads % size:
        found.append(f"the {c.num_attention_heads} query heads")
    K = c.num_key_value_heads
    if K % size and size % K:
        found.append(f"the {K} key/value heads (a size must divide them or be a multiple of them)")
    if c.intermediate_size % size:
        found.append(f"the MLP's inner size {c.intermediate_size}")
    if c.vocab_size % size:
        found.append(f"the vocabulary of {c.vocab_size}")
    if int4_group is not None:
        for what, width in (("o_proj", c.num_attention_heads * c.head_dim), ("down_proj", c.intermediate_size)):
            if width % size or (width // size) % int4_group:
                found.append(f"{what}'s {width} inputs into int4 groups of {int4_group} per rank")
    return found


def valid_sizes(config: Gemma2Config, int4_group: int | None = None, limit: int = 64) -> list[int]:
    return [n for n in range(1, limit + 1) if not problems(config, n, int4_group)]


def check_size(config: Gemma2Config, size: int, int4_group: int | None = None) -> None:
    """Raise InputError when this config cannot run at TP `size`, naming the sizes that work."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InputError(f"the TP size must be an integer, got {size!r}")
    found = problems(config, size, int4_group)
    if found:
        sizes = ", ".join(map(str, valid_sizes(config, int4_group, max(64, size))))
        raise InputError(f"tensor parallel size {size} cannot split {'; '.join(found)}; sizes that work here: {sizes}")


def bytes_per_rank(tensors: dict[str, tuple[tuple[int, ...], int]], layout: Layout) -> int:
    """Bytes of a state dict {name: (whole shape, bytes per element)} that one rank holds."""
    total = 0
    for name, (shape, itemsize) in tensors.items():
        count = math.prod(shape)
        part = parameter_slice(name, shape, layout)
        if part is not None:
            dim, start, stop = part
            count = count // shape[dim] * (stop - start)
        total += count * itemsize
    return total


def describe(config: Gemma2Config, size: int, tensors: dict[str, tuple[tuple[int, ...], int]], length: int) -> str:
    """What one rank holds at TP `size`: weights, and the KV cache of one `length`-token sequence in bf16."""
    from gemma2.cache import cache_memory_bytes

    check_size(config, size)
    layout = Layout.of(config, 0, size)
    weights = bytes_per_rank(tensors, layout)
    kv = cache_memory_bytes(config.replace(num_key_value_heads=layout.local_kv_heads), length)
    heads = f"{layout.local_heads} query and {layout.local_kv_heads} key/value heads per rank"
    if layout.kv_replicas > 1:
        heads += f" (each key/value head on {layout.kv_replicas} ranks)"
    return (
        f"tensor parallel {size}: weights {weights / 2**20:,.1f} MiB per rank, KV cache at {length} tokens "
        f"{kv / 2**20:,.1f} MiB per rank; {heads}"
    )
