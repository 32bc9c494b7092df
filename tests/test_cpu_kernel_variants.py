"""Every kernel variant this CPU runs, against PyTorch references, and variant selection.

Each variant's library (the portable scalar one everywhere, avx2 / neon / avx512 where the CPU has
the instructions) is loaded next to whichever one the process uses (cpu_kernels.load_variant) and its
entry points are called directly with ctypes, against PyTorch references: the same tolerances as
tests/test_cpu_kernels.py where the kernels sum in float32, bit for bit where the kernels are exact.
Where this CPU runs the AVX-512 variant too, it is compared with the scalar one. The variants a CPU
cannot run are compiled (tests/test_cpu_kernels_avx2.py, tests/test_cpu_kernels_neon.py). The
scalar variant's tests run on any CPU with a C compiler.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gemma2 import quant as qz
from gemma2.attention import MaskSpec, eager_attention
from gemma2.backends.cpu import library as cpu_kernels

BF16 = torch.bfloat16
COMPILER = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="the scalar kernels need a C compiler (set CC)")
X86_64 = platform.machine() in ("x86_64", "AMD64")
EVERY_BF16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(BF16)


RUNNABLE = [
    name for name, variant in cpu_kernels.VARIANTS.items() if cpu_kernels._cpu_supports_kernels(variant.cpu_features)
]


@pytest.fixture(scope="module", params=RUNNABLE)
def lib(request: pytest.FixtureRequest) -> ctypes.CDLL:
    """Each variant this CPU can run, in turn (the scalar one on every CPU)."""
    return cpu_kernels.load_variant(request.param)


@pytest.fixture(scope="module")
def scalar() -> ctypes.CDLL:
    return cpu_kernels.load_variant("scalar")


@pytest.fixture(scope="module")
def avx() -> ctypes.CDLL:
    if not cpu_kernels._cpu_supports_kernels(cpu_kernels.CPU_FEATURES):
        pytest.skip("this CPU cannot run the AVX-512 variant to compare with")
    return cpu_kernels.load_variant("avx512")  # where the CPU has it, it must build


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal bf16 tensors, any NaN matching any NaN."""
    return bool(((a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())).all())


def within_one_step(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-30).all())


# ------------------------------------------------------------------------------------------------
# ctypes calls, as cpu_kernels.py makes them (contiguous tensors, torch's thread count)


def linear(lib: ctypes.CDLL, kind: str, x: torch.Tensor, *weight: torch.Tensor, G: int = 0) -> torch.Tensor | None:
    """bf16, int8 (q, scale) or int4 (packed, scale, group G) linear; None where the kernel refused."""
    M, K = x.shape
    N = weight[0].shape[0]
    y = torch.empty(M, N, dtype=BF16)
    pointers = [t.data_ptr() for t in (x, *weight, y)]
    threads = torch.get_num_threads()
    if kind == "bf16":
        lib.gemma2_linear_bf16(*pointers, M, N, K, threads)
        return y
    if kind == "int8":
        return None if lib.gemma2_linear_int8(*pointers, M, N, K, threads) else y
    return None if lib.gemma2_linear_int4(*pointers, M, N, K, G, threads) else y


def assert_bf16_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, quantized: str = "") -> None:
    """y against x @ w^T in float64: bf16 rounding plus float32 sums or the activations' int step."""
    x64, w64 = x.double(), w.double()
    ref = x64 @ w64.T
    tolerance = 2**-7 * ref.abs() + 2**-16 * (x64.abs() @ w64.abs().T) + 1e-30
    if quantized == "int8":  # one int16 step of the row's largest per element
        tolerance += x64.abs().amax(dim=1, keepdim=True) / 32767 * w64.abs().sum(dim=1)
    if quantized == "int4":  # one int8 step of the block's largest per element
        M, K = x64.shape
        step = x64.abs().view(M, K // 64, 64).amax(dim=-1) / 127
        tolerance += step @ w64.abs().view(-1, K // 64, 64).sum(dim=-1).T
    excess = ((y.double() - ref).abs() / tolerance).max().item()
    assert excess <= 1, f"error is {excess:.2f} times the bf16 tolerance"


def int8_case(N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(seed)
    return torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8), torch.rand(N, generator=g) * 0.01 + 1e-4


def int4_case(N: int, K: int, G: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed nibbles (byte j of each 64-block: weight j low, j + 32 high), scales, float64 weights."""
    g = generator(seed)
    nibbles = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scale = torch.rand(N, K // G, generator=g) * 0.1 + 0.001
    blocks = nibbles.view(N, K // 64, 64)
    packed = (blocks[..., :32] | (blocks[..., 32:] << 4)).reshape(N, K // 2).contiguous()
    weight = ((nibbles.double().view(N, K // G, G) - 8) * scale.double()[..., None]).view(N, K)
    return packed, scale, weight


def dequantize(lib: ctypes.CDLL, q: torch.Tensor, scale: torch.Tensor, G: int = 0) -> torch.Tensor:
    N, K = q.shape[0], q.shape[1] * (2 if G else 1)
    out = torch.empty(N, K, dtype=BF16)
    if G:
        lib.gemma2_dequantize_int4(q.data_ptr(), scale.data_ptr(), out.data_ptr(), N, K, G, 2)
    else:
        lib.gemma2_dequantize_int8(q.data_ptr(), scale.data_ptr(), out.data_ptr(), N, K, 2)
    return out


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.empty_like(x)
    lib.gemma2_rms_norm(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def rotary(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, D] contiguous, cos/sin [B or 1, D]."""
    B, heads, D = x.shape
    out = torch.empty_like(x)
    stride = D if cos.shape[0] == B and B > 1 else 0
    lib.gemma2_rotary(x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, heads, D, stride)
    return out


def soft_cap(lib: ctypes.CDLL, x: torch.Tensor, cap: float) -> torch.Tensor:
    out = torch.empty_like(x)
    lib.gemma2_soft_cap(x.data_ptr(), out.data_ptr(), x.numel(), cap, 2)
    return out


def argmax(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.gemma2_argmax_bf16(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


# ------------------------------------------------------------------------------------------------
# Linear layers


LINEAR_SHAPES = [(1, 32), (7, 96), (33, 256)]  # (N, K): odd N, K a multiple of 32
INT4_SHAPES = [(1, 64), (7, 192), (33, 256), (5, 512)]  # K a multiple of 64, some of 128 and 256


@pytest.mark.parametrize("M", range(1, cpu_kernels.MAX_ROWS + 1))
def test_linears_match_float64(lib: ctypes.CDLL, M: int) -> None:
    g = generator(M)
    for N, K in LINEAR_SHAPES:
        x = torch.randn(M, K, generator=g).bfloat16()
        w = torch.randn(N, K, generator=g).bfloat16()
        assert_bf16_close(linear(lib, "bf16", x, w), x, w)
        q, scale = int8_case(N, K, seed=M * N)
        assert_bf16_close(linear(lib, "int8", x, q, scale), x, q.double() * scale.double()[:, None], "int8")
    for N, K in INT4_SHAPES:
        x = torch.randn(M, K, generator=g).bfloat16()
        for G in (64, 128, 256):
            if K % G == 0:
                packed, scale, weight = int4_case(N, K, G, seed=M + N + G)
                assert_bf16_close(linear(lib, "int4", x, packed, scale, G=G), x, weight, "int4")


def test_integer_linears_handle_zero_tiny_and_subnormal_activations(lib: ctypes.CDLL) -> None:
    """A zero row or block quantizes to zeros; a subnormal one (levels / max overflows float32)
    and one 1e30 times smaller than its neighbours still keep their share of the dot product."""
    g = generator(7)
    x = torch.randn(4, 320, generator=g)
    x[0] = 0
    x[1] *= 1e-39  # subnormal in bf16
    x[2, :64] = 0
    x[2, 64:128] *= 1e-39
    x[3, 128:192] *= 1e-30
    x = x.bfloat16()
    q, scale = int8_case(5, 320, seed=1)
    y = linear(lib, "int8", x, q, scale)
    assert y is not None
    assert_bf16_close(y, x, q.double() * scale.double()[:, None], "int8")
    assert (y[0] == 0).all() and (y[1] != 0).all()
    packed, scale4, weight = int4_case(9, 320, 64, seed=3)
    y = linear(lib, "int4", x, packed, scale4, G=64)
    assert y is not None
    assert_bf16_close(y, x, weight, "int4")
    assert (y[0] == 0).all() and (y[1] != 0).all()


def quantized_levels(x: torch.Tensor, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization of rows x: round(x * (levels / max|x|)) to nearest even
    in float32 (float64 where levels / max overflows), and the scale max / levels (zero rows: 0)."""
    x32 = x.float()
    largest = x32.abs().amax(dim=1, keepdim=True)
    inverse = torch.where(largest > 0, levels / largest, 0.0)  # float32, as in C
    wide = (x.double() * levels / largest.double()).round()
    q = torch.where(inverse.isinf(), wide, (x32 * inverse).round().double()).long()
    return q, torch.where(largest > 0, largest / levels, 0.0)


def test_integer_linears_are_exactly_the_quantized_integer_products(lib: ctypes.CDLL) -> None:
    """Bit for bit on any CPU: int16 rows for int8 weights (one float64 scaling of the exact dot);
    for int4 weights a single block of 64 (float32 dot * (weight scale * activation scale))."""
    g = generator(4)
    x = torch.randn(6, 256, generator=g)
    x[1] = 0
    x[2] *= 1e-39  # subnormal: the float64 path
    x[3, ::3] *= 1e-4
    x = x.bfloat16()
    q, scale = int8_case(33, 256, seed=4)
    levels, x_scale = quantized_levels(x, 32767.0)
    x_scale[1] = 1.0  # a zero row's int16 scale
    dot = levels @ q.long().T
    want = (dot.double() * x_scale.double() * scale.double()[None]).float().bfloat16()
    assert torch.equal(linear(lib, "int8", x, q, scale), want)
    x = x[:, :64].contiguous()
    packed, scale4, _ = int4_case(33, 64, 64, seed=4)
    levels, x_scale = quantized_levels(x, 127.0)
    nibbles = qz.unpack_int4(packed).long() - 8
    dot = (levels @ nibbles.T).float()  # exact: at most 64 * 8 * 127
    want = (dot * (scale4[:, 0][None] * x_scale)).bfloat16()
    assert torch.equal(linear(lib, "int4", x, packed, scale4, G=64), want)


@pytest.mark.parametrize("M", [1, 8])
def test_integer_linears_do_not_overflow_at_the_largest_values(lib: ctypes.CDLL, M: int) -> None:
    K = 3 * 4096 + 64
    x = torch.full((M, K), -3.0, dtype=BF16)  # quantizes to -32767 (int8 weights) or -127 (int4)
    q = torch.full((5, K), 127, dtype=torch.int8)
    y = linear(lib, "int8", x, q, torch.full((5,), 0.25))
    assert torch.equal(y, torch.full((M, 5), -3.0 * 127 * K * 0.25).bfloat16())
    packed = torch.zeros(5, K // 2, dtype=torch.uint8)  # every nibble 0: weight -8 * scale
    y = linear(lib, "int4", x, packed, torch.full((5, K // 64), 0.5), G=64)
    assert torch.equal(y, torch.full((M, 5), 3.0 * 8 * K * 0.5).bfloat16())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_integer_linears_refuse_non_finite_activations(lib: ctypes.CDLL, bad: float) -> None:
    x = torch.randn(3, 128, generator=generator(9)).bfloat16()
    x[2, 100] = bad
    q, scale = int8_case(16, 128, seed=2)
    packed, scale4, _ = int4_case(16, 128, 64, seed=2)
    assert linear(lib, "int8", x, q, scale) is None
    assert linear(lib, "int4", x, packed, scale4, G=64) is None


def test_results_do_not_depend_on_the_thread_count(lib: ctypes.CDLL) -> None:
    g = generator(8)
    x = torch.randn(3, 256, generator=g).bfloat16()
    w = torch.randn(77, 256, generator=g).bfloat16()
    packed, scale, _ = int4_case(77, 256, 64, seed=8)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append((linear(lib, "bf16", x, w), linear(lib, "int4", x, packed, scale, G=64)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_rows_result_does_not_depend_on_the_rows_batched_with_it(lib: ctypes.CDLL) -> None:
    """Batch invariance: each activation row gives the same bits alone as among 1..8 rows, for every
    weight format (the engine batches requests that must decode as they would alone)."""
    g = generator(9)
    x = torch.randn(8, 576, generator=g).bfloat16()
    w = torch.randn(45, 576, generator=g).bfloat16()
    q, scale8 = int8_case(45, 576, seed=9)
    packed, scale4, _ = int4_case(45, 576, 64, seed=9)
    cases = {
        "bf16": lambda rows: linear(lib, "bf16", rows, w),
        "int8": lambda rows: linear(lib, "int8", rows, q, scale8),
        "int4": lambda rows: linear(lib, "int4", rows, packed, scale4, G=64),
    }
    for kind, run in cases.items():
        every = run(x)
        for M in (1, 2, 3, 5, 8):
            for start in range(0, 8 - M + 1, 3):
                assert torch.equal(run(x[start : start + M].contiguous()), every[start : start + M]), (kind, M, start)


@pytest.mark.parametrize("G", [64, 128, 256])
def test_dequantize_is_exactly_the_python_expansion(lib: ctypes.CDLL, G: int) -> None:
    packed, scale, weight = int4_case(13, 512, G, seed=G)
    assert torch.equal(dequantize(lib, packed, scale, G), qz.dequantize_int4(packed, scale))
    assert torch.equal(dequantize(lib, packed, scale, G), weight.float().bfloat16())
    q, row_scale = int8_case(13, 512, seed=G)
    assert torch.equal(dequantize(lib, q, row_scale), qz.dequantize_int8(q, row_scale).bfloat16())


# ------------------------------------------------------------------------------------------------
# The small per-layer and logits operations


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma2RMSNorm's PyTorch path (gemma2/model.py)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).type_as(x)


def reference_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary's PyTorch path (gemma2/model.py) for x [B, heads, D], cos/sin [B or 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@pytest.mark.parametrize("D", [16, 40, 2304])
def test_rms_norm_within_one_bf16_step(lib: ctypes.CDLL, D: int) -> None:
    g = generator(D)
    weight = torch.randn(D, generator=g).bfloat16()
    for scale in (1e-4, 1.0, 300.0):
        x = (torch.randn(5, D, generator=g) * scale * (1 + 20 * (torch.rand(D, generator=g) > 0.98))).bfloat16()
        got, want = rms_norm(lib, x, weight), reference_rms_norm(x, weight, 1e-6)
        assert within_one_step(got, want)
        assert (got == want).float().mean() >= 0.99


@pytest.mark.parametrize("B", [1, 3])
def test_rotary_is_bit_identical_to_the_reference(lib: ctypes.CDLL, B: int) -> None:
    from gemma2.model import rotary_cos_sin

    g = generator(B)
    for D, theta in ((256, 10000.0), (32, 500.0)):
        positions = torch.randint(0, 8192, (B, 1), generator=g)
        for cos, sin in (rotary_cos_sin(positions, D, theta, BF16), rotary_cos_sin(positions[:1], D, theta, BF16)):
            cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # [B or 1, D]
            x = torch.randn(B, 6, D, generator=g).bfloat16()
            assert torch.equal(rotary(lib, x, cos, sin), reference_rotary(x, cos, sin))


@pytest.mark.parametrize("cap", [30.0, 7.3, 1e-3])
def test_soft_cap_is_bit_identical_for_every_bf16_value(lib: ctypes.CDLL, cap: float) -> None:
    assert same_bits(soft_cap(lib, EVERY_BF16, cap), torch.tanh(EVERY_BF16 / cap) * cap)


@pytest.mark.parametrize("n", [1, 5, 17, 1000])
def test_argmax_equals_torch_argmax_with_ties_nan_and_signed_zeros(lib: ctypes.CDLL, n: int) -> None:
    g = generator(n)
    for trial in range(12):
        logits = (torch.randn(3, n, generator=g) * 3).round().bfloat16()  # many ties
        if trial % 4 == 1:
            logits[1, int(torch.randint(0, n, (1,), generator=g))] = float("nan")
            logits[2, -1] = float("nan")
        elif trial % 4 == 2:
            logits[:] = float("-inf")
        elif trial % 4 == 3:
            logits[0] = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, -0.0)
        assert torch.equal(argmax(lib, logits), logits.argmax(-1))


# ------------------------------------------------------------------------------------------------
# Attention of one new token per row over the cache


def attention_case(B: int, H: int, K: int, S: int, D: int, seed: int, shared_positions: bool = False) -> dict:
    """A cache of B + 2 rows, row b of the batch reading cache row rows[b], each at its own position,
    with ring-buffer-like slot positions (out of order, some -1) and padding; the last batch row
    (when B > 1) sees nothing."""
    g = generator(seed)
    R = B + 2
    rows = torch.randperm(R, generator=g)[:B].contiguous()
    queries = torch.randint(S, 2 * S, (B,), generator=g)
    positions = torch.stack([torch.randperm(S, generator=g) + int(q) - S + 1 for q in queries])  # [B, S] <= q
    positions[torch.rand(B, S, generator=g) < 0.1] = -1
    if shared_positions:
        queries[:] = queries[0]
        positions[:] = positions[0]
    padding = torch.rand(B, S, generator=g) > 0.3
    if B > 1:
        padding[-1] = False
    return dict(
        q=(torch.randn(B, H, D, generator=g) * 3).bfloat16(),
        keys=(torch.randn(R, K, S, D, generator=g) * 3).bfloat16(),
        values=torch.randn(R, K, S, D, generator=g).bfloat16(),
        rows=rows,
        positions=positions.contiguous(),
        padding=padding.to(torch.uint8).contiguous(),
        queries=queries.contiguous(),
        shared=shared_positions,
    )


def decode_attention(lib: ctypes.CDLL, case: dict, window: int, scaling: float, softcap: float) -> torch.Tensor:
    q, keys, values = case["q"], case["keys"], case["values"]
    B, H, D = q.shape
    K, S = keys.shape[1], keys.shape[2]
    out = torch.empty(B, H, D, dtype=BF16)
    lib.gemma2_decode_attention(
        q.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        case["rows"].data_ptr(),
        case["positions"].data_ptr(),
        0 if case["shared"] else S,
        case["padding"].data_ptr(),
        S,
        case["queries"].data_ptr(),
        window,
        out.data_ptr(),
        B,
        H,
        K,
        S,
        D,
        keys.stride(0),
        keys.stride(1),
        scaling,
        softcap,
        torch.get_num_threads(),
    )
    return out


def eager_reference(case: dict, window: int, scaling: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """eager_attention row by row ([B, H, D]), and which rows see at least one key."""
    outputs, sees = [], []
    for b, row in enumerate(case["rows"].tolist()):
        mask = MaskSpec(
            case["queries"][b : b + 1], case["positions"][b], window or None, case["padding"][b : b + 1].bool()
        )
        sees.append(bool(mask.allowed().any()))
        keys, values = case["keys"][row : row + 1], case["values"][row : row + 1]
        outputs.append(eager_attention(case["q"][b : b + 1, :, None], keys, values, mask, scaling, softcap or None))
    return torch.cat(outputs)[:, 0], torch.tensor(sees)


ATTENTION_CASES = [
    # B, H, K, S, D, softcap, window, shared positions
    (1, 8, 4, 129, 64, 50.0, 0, False),
    (3, 4, 4, 37, 32, 50.0, 20, False),
    (4, 6, 2, 100, 96, 0.0, 0, False),
    (2, 12, 1, 60, 64, 30.0, 25, True),
    (2, 8, 2, 5, 32, 30.0, 0, False),  # fewer keys than a vector of scores
]


@pytest.mark.parametrize(("B", "H", "K", "S", "D", "softcap", "window", "shared"), ATTENTION_CASES)
def test_decode_attention_equals_eager_attention(
    lib: ctypes.CDLL, B: int, H: int, K: int, S: int, D: int, softcap: float, window: int, shared: bool
) -> None:
    case = attention_case(B, H, K, S, D, seed=S + D, shared_positions=shared)
    got = decode_attention(lib, case, window, 0.0625, softcap)
    want, sees = eager_reference(case, window, 0.0625, softcap)
    assert (got[~sees] == 0).all()  # a row that sees no key: zeros
    got, want = got[sees].float(), want[sees].float()
    assert ((got - want).abs() <= want.abs() * 2**-7 + 1e-6).all()
    assert (got == want).float().mean() >= 0.95
    if window:  # the window is applied
        assert not torch.equal(decode_attention(lib, case, 0, 0.0625, softcap)[sees].float(), got)


# ------------------------------------------------------------------------------------------------
# Whole decoder layers: the scalar call against its own kernels composed in Python


def layer_case(seed: int) -> dict:
    """One layer (d 64, 4 heads of 32 over 2 key heads, 96 features) with every kind of projection,
    a cache of 4 rows x 12 slots read by 3 batch rows, each at its own position and slot."""
    from gemma2.backends.cpu.decode import _Layer, _Linear, activation_table

    g = generator(seed)
    d, H, KV, D, F = 64, 4, 2, 32, 96
    tensors: dict = {}

    def projection(name: str, kind: int, N: int, K: int, bias: bool = False) -> _Linear:
        if kind == 0:
            weight, scale = (torch.randn(N, K, generator=g) * K**-0.5).bfloat16(), None
        elif kind == 1:
            weight, scale = int8_case(N, K, seed + N)
        else:
            weight, scale, _ = int4_case(N, K, 64, seed + N)
        b = torch.randn(N, generator=g).bfloat16() if bias else None
        tensors[name] = (kind, weight, scale, b)
        pointers = [None if t is None else t.data_ptr() for t in (scale, b)]
        return _Linear(kind, weight.data_ptr(), *pointers, N, K, 64 if kind == 2 else 0)

    linears = [
        projection("q", 0, H * D, d, bias=True),
        projection("k", 1, KV * D, d),
        projection("v", 2, KV * D, d),
        projection("o", 0, d, H * D),
        projection("gate", 1, F, d),
        projection("up", 2, F, d),
        projection("down", 0, d, F),
    ]
    norms = [(torch.randn(d, generator=g) * 0.3).bfloat16() for _ in range(4)]
    table = activation_table("gelu_pytorch_tanh")
    layer = _Layer(*linears, *(n.data_ptr() for n in norms), table.data_ptr(), 1e-6, D**-0.5, 50.0, H, KV, D, 8)
    return dict(layer=layer, tensors=tensors, norms=norms, table=table, d=d, H=H, KV=KV, D=D, g=g)


def test_decode_layers_equal_their_kernels_composed(lib: ctypes.CDLL) -> None:
    from gemma2.backends.cpu.decode import _Cache, _Step

    c = layer_case(seed=5)
    g, d, H, KV, D = c["g"], c["d"], c["H"], c["KV"], c["D"]
    B, R, S = 3, 4, 12
    rows = torch.tensor([2, 0, 3])
    queries = torch.tensor([15, 11, 20])
    slots = queries % S  # a ring buffer: slot of each row's new token
    ring = torch.full((R, S), -1, dtype=torch.int64)
    for b in range(B):
        for p in range(max(0, int(queries[b]) - S + 1), int(queries[b])):
            ring[rows[b], p % S] = p
    padding = (torch.rand(B, 32, generator=g) > 0.2).to(torch.uint8)
    cos, sin = (torch.randn(B, D, generator=g).bfloat16() for _ in range(2))
    keys0, values0 = (torch.randn(R, KV, S, D, generator=g).bfloat16() for _ in range(2))
    h = torch.randn(B, d, generator=g).bfloat16()
    step = _Step(cos.data_ptr(), sin.data_ptr(), D, padding.data_ptr(), 32, queries.data_ptr())

    def run(library: ctypes.CDLL, h: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        keys, values, out = keys0.clone(), values0.clone(), torch.empty_like(h)
        cache = _Cache(keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), rows.data_ptr())
        cache.positions, cache.positions_stride, cache.slots, cache.slot = ring.data_ptr(), S, S, slots.data_ptr()
        pointers = (ctypes.c_void_p * 1)(ctypes.addressof(c["layer"])), (ctypes.c_void_p * 1)(ctypes.addressof(cache))
        done = library.gemma2_decode_layers(1, *pointers, ctypes.byref(step), h.data_ptr(), out.data_ptr(), B, 2)
        return done, out, keys, values

    done, out, keys, values = run(lib, h)
    assert done == 1

    # The same step from the scalar library's own entry points.
    def project(name: str, x: torch.Tensor) -> torch.Tensor:
        kind, weight, scale, bias = c["tensors"][name]
        y = linear(lib, ("bf16", "int8", "int4")[kind], x, *((weight,) if kind == 0 else (weight, scale)), G=64)
        assert y is not None
        return y if bias is None else y + bias

    input_norm, post_attention, pre_feedforward, post_feedforward = c["norms"]
    x = rms_norm(lib, h, input_norm)
    q = rotary(lib, project("q", x).view(B, H, D), cos, sin)
    k = rotary(lib, project("k", x).view(B, KV, D), cos, sin)
    v = project("v", x).view(B, KV, D)
    expected_keys, expected_values = keys0.clone(), values0.clone()
    positions = ring[rows].clone()
    for b in range(B):
        expected_keys[rows[b], :, slots[b]], expected_values[rows[b], :, slots[b]] = k[b], v[b]
        positions[b, slots[b]] = queries[b]
    seen_padding = padding.gather(1, positions.clamp(min=0)).contiguous()  # the step's padding is by position
    case = dict(q=q, keys=expected_keys, values=expected_values, rows=rows, positions=positions, shared=False)
    case.update(padding=seen_padding, queries=queries)
    attention = decode_attention(lib, case, 8, D**-0.5, 50.0).view(B, H * D)
    h1 = h + rms_norm(lib, project("o", attention), post_attention)
    x2 = rms_norm(lib, h1, pre_feedforward)
    act = c["table"][project("gate", x2).view(torch.int16).long() & 0xFFFF] * project("up", x2)
    expected = h1 + rms_norm(lib, project("down", act), post_feedforward)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert torch.equal(out, expected)

    # Non-finite activations reaching a quantized projection: nothing runs, out is h.
    bad = h.clone()
    bad[1, 3] = float("inf")
    done, out, _, _ = run(lib, bad)
    assert done == 0 and same_bits(out, bad)

    if cpu_kernels._cpu_supports_kernels(cpu_kernels.CPU_FEATURES):  # the AVX-512 layer: the same math
        done, avx_out, avx_keys, _ = run(cpu_kernels.load_variant("avx512"), h)
        assert done == 1 and within_one_step(avx_keys, keys)
        assert (avx_out.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()


# ------------------------------------------------------------------------------------------------
# Scalar against AVX-512, where this CPU runs both


def test_scalar_and_avx512_agree(scalar: ctypes.CDLL, avx: ctypes.CDLL) -> None:
    lib = scalar
    g = generator(3)
    for M in (1, 3, 8):
        for N, K in LINEAR_SHAPES:
            x = torch.randn(M, K, generator=g).bfloat16()
            w = torch.randn(N, K, generator=g).bfloat16()
            assert_bf16_close(linear(lib, "bf16", x, w), x, w)
            assert_bf16_close(linear(avx, "bf16", x, w), x, w)
            q, scale = int8_case(N, K, seed=M + N)
            # The same int16 activations and one exact integer dot product: bit for bit.
            assert torch.equal(linear(lib, "int8", x, q, scale), linear(avx, "int8", x, q, scale))
        for N, K in INT4_SHAPES:
            x = torch.randn(M, K, generator=g).bfloat16()
            packed, scale, weight = int4_case(N, K, 64, seed=M + N)
            got, want = linear(lib, "int4", x, packed, scale, G=64), linear(avx, "int4", x, packed, scale, G=64)
            assert_bf16_close(got, x, weight, "int4")
            assert within_one_step(got, want)  # the same blocks, summed in another order
    for G in (64, 256):
        packed, scale, _ = int4_case(33, 512, G, seed=G)
        assert torch.equal(dequantize(lib, packed, scale, G), dequantize(avx, packed, scale, G))
    q, scale = int8_case(33, 512, seed=4)
    assert torch.equal(dequantize(lib, q, scale), dequantize(avx, q, scale))
    x = (torch.randn(5, 2304, generator=g) * 30).bfloat16()
    weight = torch.randn(2304, generator=g).bfloat16()
    assert within_one_step(rms_norm(lib, x, weight), rms_norm(avx, x, weight))
    x, cos, sin = torch.randn(3, 8, 256, generator=g).bfloat16(), *torch.randn(2, 3, 256, generator=g).bfloat16()
    assert torch.equal(rotary(lib, x, cos.contiguous(), sin.contiguous()), rotary(avx, x, cos, sin))
    for cap in (30.0, 1e-3):
        assert same_bits(soft_cap(lib, EVERY_BF16, cap), soft_cap(avx, EVERY_BF16, cap))
    logits = (torch.randn(4, 1001, generator=g) * 3).round().bfloat16()
    logits[1, 500] = float("nan")
    logits[2] = -0.0
    assert torch.equal(argmax(lib, logits), argmax(avx, logits))
    case = attention_case(3, 8, 2, 77, 64, seed=1)
    got, want = decode_attention(lib, case, 30, 0.0625, 50.0), decode_attention(avx, case, 30, 0.0625, 50.0)
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()


# ------------------------------------------------------------------------------------------------
# Building, and choosing a variant


def test_avx512_source_compiles_with_its_flags() -> None:
    """Without running it: any x86-64 compiler must take kernels_avx512*.c with its flags."""
    if not X86_64:
        pytest.skip("the AVX-512 variant is x86-64 only")
    assert COMPILER is not None
    flags = [f for f in cpu_kernels.FLAGS if f != "-shared"]
    for source in cpu_kernels.AVX512_SOURCES:  # each compiled to an object file, not only parsed
        done = subprocess.run(
            [COMPILER, *flags, "-c", str(source), "-o", os.devnull], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("openmp", [True, False])
def test_scalar_source_is_portable_c99(openmp: bool) -> None:
    source = cpu_kernels.SCALAR_SOURCE
    assert "immintrin" not in source.read_text()
    flags = ["-std=c99", "-pedantic-errors", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-fPIC"]
    done = subprocess.run(
        [COMPILER, *flags, *(["-fopenmp"] if openmp else []), "-c", str(source), "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    if openmp and done.returncode != 0 and "openmp" in done.stderr.lower():
        pytest.skip(f"{COMPILER} has no OpenMP")
    assert done.returncode == 0, done.stderr


SELECTION = """
    import json, logging, os
    from gemma2.backends.cpu import library as cpu_kernels
    logging.basicConfig()
    results = {}
    for setting in ["bogus", "scalar", "SCALAR", "off", "scalar+disabled", "avx512-missing", "auto-missing", "auto"]:
        cpu_kernels._library.cache_clear()
        os.environ["GEMMA2_CPU_KERNELS"] = setting.split("+")[0].split("-")[0]
        os.environ["GEMMA2_NATIVE_KERNELS"] = "0" if setting.endswith("+disabled") else "1"
        supports = cpu_kernels._cpu_supports_kernels
        if setting.endswith("-missing"):  # a CPU without the features: PyTorch's kernels
            cpu_kernels._cpu_supports_kernels = lambda features=(): not features
        try:
            results[setting] = [cpu_kernels.variant(), cpu_kernels.available()]
        except ValueError as error:
            results[setting] = str(error)
        cpu_kernels._cpu_supports_kernels = supports
    print(json.dumps(results))
"""


def test_gemma2_cpu_kernels_selects_the_variant() -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SELECTION)],
        env={**os.environ, "GEMMA2_NATIVE_KERNELS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    error = results["bogus"]
    assert "GEMMA2_CPU_KERNELS" in error and "'bogus'" in error and ", ".join(cpu_kernels.VARIANT_CHOICES) in error
    assert results["scalar"] == results["SCALAR"] == ["scalar", True]
    assert results["off"] == results["scalar+disabled"] == [None, False]
    assert results["avx512-missing"] == [None, False]
    # A CPU with none of the variants' features: PyTorch's ops, said once.
    assert results["auto-missing"] == [None, False]
    assert "native CPU kernels unavailable" in done.stderr and "avx512" in done.stderr
    fastest = next((name for name in cpu_kernels.AUTO_ORDER if name in RUNNABLE), None)
    assert results["auto"] == [fastest, fastest is not None]
    assert done.stderr.count("no native CPU kernels for this CPU") == (1 if fastest else 2)


def test_each_variant_has_its_own_cached_library(scalar: ctypes.CDLL) -> None:
    lib = scalar
    path = Path(lib._name)
    assert path.name == "libgemma2_cpu.so" and path.parent.parent.name == "kernels"
    assert cpu_kernels.load_variant("scalar") is lib
    if cpu_kernels._cpu_supports_kernels(cpu_kernels.CPU_FEATURES):
        assert Path(cpu_kernels.load_variant("avx512")._name).parent != path.parent
    with pytest.raises(ValueError, match="unknown CPU kernel variant"):
        cpu_kernels.load_variant("sse2")


def test_auto_takes_the_next_variant_when_a_build_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An x86-64 CPU with every feature, and a compiler too old for the AVX-512 BF16 flags: avx2."""
    tried: list[str] = []
    built = object()

    def load(name: str) -> object:
        tried.append(name)
        if name == "avx512":
            raise OSError("cc: error: unrecognized command-line option '-mavx512bf16'")
        return built

    monkeypatch.setattr(cpu_kernels, "load_variant", load)
    monkeypatch.setattr(
        cpu_kernels, "_cpu_supports_kernels", lambda features=(): not features or features[0] != "asimd"
    )
    cpu_kernels.use_variant("auto")
    try:
        assert cpu_kernels._library() is built
        assert tried == ["avx512", "avx2"]
        assert "native CPU kernels unavailable (avx512: cc: error" in caplog.text
    finally:
        cpu_kernels.use_variant(None)
