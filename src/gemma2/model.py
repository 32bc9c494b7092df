"""The Gemma 2 backbone, top to bottom: RMSNorm, rotary embedding, attention, MLP, layer, model.

Numerics follow transformers' Gemma2 with eager attention (GEMMA2.md section 2); each place where
a detail matters says why. Shape letters: B batch, T new tokens, S keys, H query heads, K key/value
heads, D head_dim, d hidden_size, F intermediate_size, V vocab_size, W sliding window.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from gemma2.attention import ATTENTION_FUNCTIONS, AttentionFunction, MaskSpec
from gemma2.cache import CacheStep, Gemma2Cache
from gemma2.config import Gemma2Config
from gemma2.errors import InputError
from gemma2.outputs import BaseModelOutput
from gemma2.pretrained import Gemma2PreTrainedModel


@functools.lru_cache(maxsize=16)
def embedding_scale(hidden_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """sqrt(hidden_size) in float32, then rounded to the activation dtype (see Gemma2Model.embed)."""
    with torch.inference_mode(False):  # autograd saves it for backward: never an inference tensor
        return torch.tensor(hidden_size**0.5, dtype=torch.float32).to(dtype).to(device)


class Gemma2RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), all in float32, cast back once.

    The stored weight is an offset from one (initialised to zeros). Multiplying before the cast,
    not after, is what the reference does (transformers PR 29402).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


@functools.lru_cache(maxsize=16)
def inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """theta^(-2j / D) for j < D/2 in float32, as the reference computes them (kept: every decode step uses them)."""
    with torch.inference_mode(False):  # kept across calls: a normal tensor, whatever mode made it first
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim
        return 1.0 / (theta**exponents)  # [D/2]


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, D] for position_ids [B, T]: float32 math, cast to the activation dtype."""
    freqs = position_ids[..., None].float() * inverse_frequencies(head_dim, theta, position_ids.device)  # [B, T, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # half-split pairing: j goes with j + D/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, D] by cos/sin [B, T, D] ("rotate_half" convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activations transformers' ACT2FN gives for these names."""
    if name == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_new":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if name == "gelu_fast":
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    if name in ("silu", "swish"):
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    raise InputError(f"unsupported activation {name!r}")


@dataclass
class AttentionInputs:
    """What every layer's attention needs beyond its hidden states; built once per forward.

    The masks are built once per kind of layer (full, sliding), not in every layer.
    """

    cos: torch.Tensor  # [B or 1, T, D]
    sin: torch.Tensor
    full_mask: MaskSpec
    sliding_mask: MaskSpec | None
    step: CacheStep | None  # where the new tokens go in the cache (None: no cache)
    padding: torch.Tensor | None  # [B, slots] bool, True for real tokens (attention_mask)

    def mask(self, window: int | None) -> MaskSpec:
        if window is None:
            return self.full_mask
        assert self.sliding_mask is not None
        return self.sliding_mask


def layer_masks(
    query_positions: torch.Tensor,
    full_keys: torch.Tensor,
    sliding_keys: torch.Tensor | None,
    window: int | None,
    padding: torch.Tensor | None,
    segments: torch.Tensor | None,
) -> tuple[MaskSpec, MaskSpec | None]:
    """The full-attention and sliding-window masks of one forward, from query and key positions per row."""

    def spec(key_positions: torch.Tensor, layer_window: int | None) -> MaskSpec:
        key_padding = None
        if padding is not None:
            index = key_positions.clamp(min=0).expand(padding.shape[0], -1)
            key_padding = padding.gather(1, index)
        return MaskSpec(query_positions, key_positions, layer_window, key_padding, segments, segments)

    full = spec(full_keys, None)
    sliding = None if window is None else spec(full_keys if sliding_keys is None else sliding_keys, window)
    return full, sliding


class Gemma2Attention(nn.Module):
    def __init__(self, config: Gemma2Config, layer_idx: int) -> None:
        super().__init__()
        d, H, K, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, K, D
        self.layer_idx = layer_idx
        # The scale is query_pre_attn_scalar**-0.5, not head_dim**-0.5: they differ for 27B (144).
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        self.dropout = config.attention_dropout
        self.window = config.sliding_window if config.is_sliding(layer_idx) else None
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, H * D, bias=bias)
        self.k_proj = nn.Linear(d, K * D, bias=bias)
        self.v_proj = nn.Linear(d, K * D, bias=bias)
        self.o_proj = nn.Linear(H * D, d, bias=bias)
        # Chosen once, by name from the registry (attention.py) or by a backend (gemma2.backends),
        # never looked up per call. Both keep the eager signatures.
        self.attention_function: AttentionFunction = ATTENTION_FUNCTIONS["eager"]
        self.rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = apply_rotary

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: Gemma2Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts come from the projections' sizes, not the config: a tensor-parallel rank
        # (gemma2.distributed) holds some of the heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q = self.rotary(q, inputs.cos, inputs.sin)
        k = self.rotary(k, inputs.cos, inputs.sin)
        if cache is not None:
            assert inputs.step is not None
            k, v = cache.update(self.layer_idx, k, v, inputs.step)
        mask = inputs.mask(self.window)
        dropout = self.dropout if self.training else 0.0
        out = self.attention_function(q, k, v, mask, self.scaling, self.softcap, dropout)  # [B, T, H, D]
        return self.o_proj(out.reshape(B, T, -1))


class Gemma2MLP(nn.Module):
    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        d, F_ = config.hidden_size, config.intermediate_size
        self.activation = config.hidden_activation
        self.gate_proj = nn.Linear(d, F_, bias=False)
        self.up_proj = nn.Linear(d, F_, bias=False)
        self.down_proj = nn.Linear(F_, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(activation(self.activation, self.gate_proj(x)) * self.up_proj(x))


class Gemma2DecoderLayer(nn.Module):
    """A "sandwich" layer: every sub-block is normed on the way in and on the way out."""

    def __init__(self, config: Gemma2Config, layer_idx: int) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma2Attention(config, layer_idx)
        self.mlp = Gemma2MLP(config)
        self.input_layernorm = Gemma2RMSNorm(d, eps)
        self.post_attention_layernorm = Gemma2RMSNorm(d, eps)
        self.pre_feedforward_layernorm = Gemma2RMSNorm(d, eps)
        self.post_feedforward_layernorm = Gemma2RMSNorm(d, eps)

    def forward(self, h: torch.Tensor, inputs: AttentionInputs, cache: Gemma2Cache | None) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), inputs, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


DecodeStep = Callable[["Gemma2Model", torch.Tensor, AttentionInputs, Gemma2Cache], tuple[torch.Tensor, int]]


class Gemma2Model(Gemma2PreTrainedModel):
    """Embedding, the decoder layers and the final norm; returns hidden states [B, T, d]."""

    base_model_prefix = ""

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(Gemma2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Gemma2RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The window of the sliding layers (None when there are none): their masks are built per forward.
        sliding = [i for i in range(config.num_hidden_layers) if config.is_sliding(i)]
        self.sliding_window: int | None = config.sliding_window if sliding else None
        self.gradient_checkpointing = False
        # A backend's fused decode step (gemma2.backends): runs the leading layers of a one-token
        # forward and returns (hidden states, how many layers ran); None runs every layer here.
        self.decode_step: DecodeStep | None = None
        self.init_weights()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(d), the scale rounded to the weight dtype first.

        In bf16 sqrt(2304) = 48 exactly but sqrt(3584) = 59.87 rounds to 59.75: the reference
        rounds (float32 then the weight dtype) before multiplying, and so must we.
        """
        # The activation dtype is the norms' (an int8 embedding returns float32 rows).
        dtype = self.norm.weight.dtype
        embeds = self.embed_tokens(input_ids).to(dtype)
        return embeds * embedding_scale(self.config.hidden_size, dtype, embeds.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Gemma2Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        cache: Gemma2Cache | None = None,
        cache_rows: torch.Tensor | list[int] | None = None,
    ) -> BaseModelOutput:
        """Hidden states [B, T, d] of B rows of T new tokens.

        With a cache, row b continues cache row cache_rows[b] (default b) at that row's own length:
        rows of one batch may sit at different positions.
        """
        if past_key_values is None:
            past_key_values = cache  # transformers 5.x renamed the argument to `cache`
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            self._check_input_ids(input_ids)
            # transformers >= 5.4 scales only the embeddings it looks up, not user inputs_embeds.
            inputs_embeds = self.embed(input_ids)
        assert inputs_embeds is not None
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise InputError(
                f"inputs_embeds must have shape [batch, length, {self.config.hidden_size}], "
                f"got {list(inputs_embeds.shape)}"
            )
        B, T, _ = inputs_embeds.shape
        if past_key_values is None and use_cache:
            past_key_values = Gemma2Cache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, Gemma2Cache):
            raise InputError(f"past_key_values must be a gemma2.Gemma2Cache, got {type(past_key_values).__name__}")
        device = inputs_embeds.device
        step = None
        if past_key_values is not None:
            step = past_key_values.begin(B, T, device, cache_rows)
            query_positions = step.query_positions  # [B, T]
            slots = step.full_slots
        else:
            query_positions = torch.arange(T, device=device)[None]  # [1, T]
            slots = T
        segments = None
        if position_ids is None:
            position_ids = query_positions
        else:
            position_ids = self._check_position_ids(position_ids, B, T).to(device)
            if attention_mask is None and past_key_values is None:
                # Several documents packed in one row: position_ids restart at each document, and
                # attention stays inside it (the reference's packed-sequence rule).
                segments = packed_segments(position_ids.expand(B, T))
        padding = None
        if attention_mask is not None:
            padding = self._check_attention_mask(attention_mask, B, slots).to(device)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        window = self.sliding_window
        if step is not None:
            full, sliding = layer_masks(
                query_positions, step.full_key_positions, step.sliding_key_positions, window, padding, segments
            )
        else:
            full, sliding = layer_masks(query_positions, query_positions, None, window, padding, segments)
        inputs = AttentionInputs(cos, sin, full, sliding, step, padding)

        h = inputs_embeds
        first = 0
        if self.decode_step is not None and past_key_values is not None and T == 1 and not output_hidden_states:
            h, first = self.decode_step(self, h, inputs, past_key_values)
        all_hidden: list[torch.Tensor] = []
        for i in range(first, len(self.layers)):
            layer = self.layers[i]
            if output_hidden_states:
                all_hidden.append(h)
            if self.gradient_checkpointing and self.training and past_key_values is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, inputs, None, use_reentrant=False)
            else:
                h = layer(h, inputs, past_key_values)
        h = self.norm(h)
        if past_key_values is not None and step is not None:
            past_key_values.commit(step)
        hidden_states = None
        if output_hidden_states:
            # The reference reports the embeddings, the outputs of layers 0..N-2, and the final
            # normed output (equal to last_hidden_state) in place of layer N-1's raw output.
            hidden_states = (*all_hidden, h)
        return BaseModelOutput(last_hidden_state=h, past_key_values=past_key_values, hidden_states=hidden_states)

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must have shape [batch, length], got {list(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise InputError(f"input_ids is empty (shape {list(input_ids.shape)})")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise InputError(f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")

    @staticmethod
    def _check_attention_mask(mask: torch.Tensor, batch: int, slots: int) -> torch.Tensor:
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != slots:
            raise InputError(
                f"attention_mask must have shape [batch={batch}, cached + new tokens={slots}], got {list(mask.shape)}"
            )
        return mask.bool()

    @staticmethod
    def _check_position_ids(position_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
            raise InputError(
                f"position_ids must have shape [batch={batch} or 1, length={length}], got {list(position_ids.shape)}"
            )
        return position_ids


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index [B, T] of each token when position_ids restart inside a row, else None.

    A new document starts wherever a position is not its predecessor plus one.
    """
    first = position_ids[:, :1] - 1
    steps = torch.diff(position_ids, prepend=first, dim=-1)
    segments = (steps != 1).cumsum(-1)
    if bool((segments[:, -1] == 0).all()):
        return None
    return segments
