"""An 8192-token prefill with gemma-2-2b's attention shape: bounded memory, same result (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gemma2 import Gemma2Config
from gemma2.attention import MaskSpec, attention, eager_attention

MEASURE = r"""
import json, torch
from gemma2 import Gemma2Config
from gemma2.attention import MaskSpec, attention
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
c = Gemma2Config.from_preset("gemma-2-2b")
T = 8192
g = torch.Generator().manual_seed(0)
q = torch.randn(1, c.num_attention_heads, T, c.head_dim, generator=g).to(torch.bfloat16)
k = torch.randn(1, c.num_key_value_heads, T, c.head_dim, generator=g).to(torch.bfloat16)
before = hwm()
positions = torch.arange(T)
for window in (c.sliding_window, None):
    out = attention(q, k, k, MaskSpec(positions, positions, window=window), c.query_pre_attn_scalar**-0.5, 50.0)
print(json.dumps({"extra_bytes": hwm() - before, "finite": bool(torch.isfinite(out).all())}))
"""


@pytest.mark.slow
def test_8192_token_attention_of_the_2b_shape_stays_small() -> None:
    result = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    config = Gemma2Config.from_preset("gemma-2-2b")
    all_scores_fp32 = config.num_attention_heads * 8192 * 8192 * 4  # 2 GiB: what must not be held
    assert report["finite"]
    assert report["extra_bytes"] < all_scores_fp32 / 4


@pytest.mark.slow
@pytest.mark.parametrize("window", [4096, None])
def test_8192_token_tiled_attention_equals_the_exact_path(window: int | None) -> None:
    config = Gemma2Config.from_preset("gemma-2-2b")
    T = 8192
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, config.num_attention_heads, T, config.head_dim, generator=g).to(torch.bfloat16)
    k = torch.randn(1, config.num_key_value_heads, T, config.head_dim, generator=g).to(torch.bfloat16)
    v = torch.randn(1, config.num_key_value_heads, T, config.head_dim, generator=g).to(torch.bfloat16)
    positions = torch.arange(T)
    mask = MaskSpec(positions, positions, window=window)
    scale = config.query_pre_attn_scalar**-0.5
    tiled = attention(q, k, v, mask, scale, 50.0)
    exact = eager_attention(q, k, v, mask, scale, 50.0)
    assert torch.equal(tiled, exact) or (tiled.float() - exact.float()).abs().max() <= 1e-2
