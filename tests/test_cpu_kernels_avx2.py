"""The AVX2 + FMA + F16C variant of the native kernels (kernels_avx2.c, which includes kernels_scalar.c).

The reference tests of tests/test_cpu_kernel_variants.py run on it wherever the CPU has AVX2; here it
is compared with the scalar variant: int8 bit for bit (the same exact integer dot product), int4 and
bf16 within the float32 summation order, decode attention within one bf16 step (its q . k sums in
another order), every other entry point bit for bit (the scalar code); then a whole model's fused
decode step against its op path and PyTorch's ops, and "auto" choosing it on an AVX2-only CPU.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator

import pytest
import torch
from conftest import quantizable_model
from test_cpu_kernel_variants import (
    COMPILER,
    EVERY_BF16,
    X86_64,
    argmax,
    assert_bf16_close,
    attention_case,
    decode_attention,
    dequantize,
    generator,
    int4_case,
    int8_case,
    linear,
    rms_norm,
    rotary,
    same_bits,
    soft_cap,
)

from gemma2.backends import apply_backend
from gemma2.backends.cpu import library as cpu_kernels

BF16 = torch.bfloat16
HAS_AVX2 = cpu_kernels._cpu_supports_kernels(cpu_kernels.AVX2_CPU_FEATURES)
pytestmark = pytest.mark.skipif(COMPILER is None, reason="the kernels need a C compiler (set CC)")


@pytest.fixture(scope="module")
def avx2() -> ctypes.CDLL:
    if not HAS_AVX2:
        pytest.skip("this CPU has no AVX2/FMA/F16C (x86-64-v3)")
    return cpu_kernels.load_variant("avx2")


@pytest.fixture(scope="module")
def scalar() -> ctypes.CDLL:
    return cpu_kernels.load_variant("scalar")


# ------------------------------------------------------------------------------------------------
# The bf16 linear layer


@pytest.mark.parametrize("M", range(1, cpu_kernels.MAX_ROWS + 1))
def test_linear_bf16_matches_float64(avx2: ctypes.CDLL, M: int) -> None:
    g = generator(100 + M)
    for N in (1, 7, 33, 1000):
        for K in (32, 96, 2304):
            if N * K > 1000 * 96 and M not in (1, 5, 8):
                continue  # the largest matrices for a few row counts only
            x = torch.randn(M, K, generator=g).bfloat16()
            w = (torch.randn(N, K, generator=g) * (1 + 20 * (torch.rand(N, K, generator=g) > 0.99))).bfloat16()
            assert_bf16_close(linear(avx2, "bf16", x, w), x, w)


def test_linear_bf16_inputs_that_are_not_contiguous_rows_of_one_tensor(avx2: ctypes.CDLL) -> None:
    """Rows of x read where the caller's data is, any alignment (a slice starts mid cache line)."""
    g = generator(3)
    base = torch.randn(3 * 64 + 1, generator=g).bfloat16()
    x = base[1:].view(3, 64)
    w = torch.randn(5, 64, generator=g).bfloat16()
    assert_bf16_close(linear(avx2, "bf16", x, w), x, w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_linear_bf16_non_finite_values_propagate_like_f_linear(avx2: ctypes.CDLL, bad: float) -> None:
    g = generator(11)
    x = torch.randn(4, 96, generator=g).bfloat16()
    w = torch.randn(9, 96, generator=g).bfloat16()
    x[1, 5] = bad
    w[3, 70] = bad
    w[6, 10] = 0.0
    x[2, 10] = float("inf")  # inf * 0 in row 2, column 6: NaN
    got, want = linear(avx2, "bf16", x, w), torch.nn.functional.linear(x, w)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])
    finite = want.isfinite()
    x64, w64 = x.double(), w.double()
    ref = torch.where(finite, x64.nan_to_num(posinf=0, neginf=0) @ w64.nan_to_num(posinf=0, neginf=0).T, 0)
    tolerance = 2**-7 * ref.abs() + 2**-16 * (x64.abs().nan_to_num(0, 0) @ w64.abs().nan_to_num(0, 0).T) + 1e-30
    assert ((got.double() - ref).abs()[finite] <= tolerance[finite]).all()


def test_linear_bf16_keeps_subnormal_inputs_and_results(avx2: ctypes.CDLL) -> None:
    """No flush to zero: subnormal activations (normal and subnormal products) and subnormal sums."""
    g = generator(12)
    x = torch.randn(3, 256, generator=g)
    x[0] *= 1e-39  # subnormal bf16 activations, weights of 1e3: normal products
    x[1] *= 1e-39  # ... and of order 1: subnormal products and sums
    x[2, ::2] *= 1e-39
    x = x.bfloat16()
    assert (x[:2].float().abs() < 2**-126).all() and (x[:2] != 0).float().mean() > 0.9
    w = torch.randn(2, 7, 256, generator=g)
    w[0] *= 1e3
    for weight in w.bfloat16():
        y = linear(avx2, "bf16", x, weight)
        x64, w64 = x.double(), weight.double()
        ref = x64 @ w64.T
        # bf16 rounding (half a subnormal step where the sum is subnormal) plus float32 sums, with
        # float32's subnormal step per product where the products are subnormal.
        tolerance = 2**-7 * ref.abs() + 2**-16 * (x64.abs() @ w64.abs().T) + 2**-133 + 256 * 2**-149
        assert ((y.double() - ref).abs() <= tolerance).all()
        assert (y[:2] != 0).all()


def test_linear_bf16_does_not_depend_on_the_thread_count(avx2: ctypes.CDLL) -> None:
    g = generator(13)
    x = torch.randn(8, 2304, generator=g).bfloat16()
    w = torch.randn(333, 2304, generator=g).bfloat16()
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            runs.append(linear(avx2, "bf16", x, w))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], run) for run in runs[1:])
    for m in range(8):  # and each row the same whatever rows come with it (batch invariant)
        assert torch.equal(linear(avx2, "bf16", x[m : m + 1].contiguous(), w), runs[0][m : m + 1])


# ------------------------------------------------------------------------------------------------
# Every other entry point is the scalar code: bit for bit


def test_int8_is_the_scalar_variant_bit_for_bit_and_int4_within_float32_order(
    avx2: ctypes.CDLL, scalar: ctypes.CDLL
) -> None:
    g = generator(21)
    for M in (1, 3, 8):
        for N, K in ((1, 64), (7, 192), (33, 256), (5, 512), (130, 2304)):
            x = torch.randn(M, K, generator=g).bfloat16()
            x[0, ::5] *= 1e-3
            q, scale = int8_case(N, K, seed=M + N)
            assert torch.equal(linear(avx2, "int8", x, q, scale), linear(scalar, "int8", x, q, scale))
            for G in (64, 128, 256):
                if K % G == 0:
                    packed, scale4, weight = int4_case(N, K, G, seed=M + N + G)
                    got = linear(avx2, "int4", x, packed, scale4, G=G)
                    want = linear(scalar, "int4", x, packed, scale4, G=G)
                    # One bf16 step of each other, or float32 cancellation where the sum is near zero.
                    scale_of_terms = x.double().abs() @ weight.double().abs().T
                    assert (
                        (got.double() - want.double()).abs() <= 2**-7 * want.double().abs() + 2**-16 * scale_of_terms
                    ).all()
                    assert_bf16_close(got, x, weight, "int4")
    x = torch.randn(2, 128, generator=g).bfloat16()
    x[1, 7] = float("nan")
    assert linear(avx2, "int8", x, *int8_case(4, 128, seed=1)) is None
    assert linear(avx2, "int4", x, *int4_case(4, 128, 64, seed=1)[:2], G=64) is None


def test_decode_attention_within_one_step_of_the_scalar_variant(avx2: ctypes.CDLL, scalar: ctypes.CDLL) -> None:
    for B, H, K, S, D in ((3, 8, 2, 77, 64), (1, 8, 4, 129, 256), (2, 6, 1, 5, 32), (2, 16, 2, 300, 128)):
        case = attention_case(B, H, K, S, D, seed=S)
        for window, softcap in ((30, 50.0), (0, 0.0)):
            got = decode_attention(avx2, case, window, 0.0625, softcap)
            want = decode_attention(scalar, case, window, 0.0625, softcap)
            assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()
            assert (got == want).float().mean() > 0.95  # the same roundings: most outputs identical


def test_other_entry_points_are_the_scalar_code(avx2: ctypes.CDLL, scalar: ctypes.CDLL) -> None:
    g = generator(22)
    for G in (64, 256):
        packed, scale4, _ = int4_case(33, 512, G, seed=G)
        assert torch.equal(dequantize(avx2, packed, scale4, G), dequantize(scalar, packed, scale4, G))
    q, scale = int8_case(33, 512, seed=4)
    assert torch.equal(dequantize(avx2, q, scale), dequantize(scalar, q, scale))
    for D in (40, 2304):
        x = (torch.randn(5, D, generator=g) * 30).bfloat16()
        weight = torch.randn(D, generator=g).bfloat16()
        assert torch.equal(rms_norm(avx2, x, weight), rms_norm(scalar, x, weight))
    x, cos, sin = torch.randn(3, 8, 256, generator=g).bfloat16(), *torch.randn(2, 3, 256, generator=g).bfloat16()
    cos, sin = cos.contiguous(), sin.contiguous()
    assert torch.equal(rotary(avx2, x, cos, sin), rotary(scalar, x, cos, sin))
    for cap in (30.0, 1e-3):
        assert same_bits(soft_cap(avx2, EVERY_BF16, cap), soft_cap(scalar, EVERY_BF16, cap))
    logits = (torch.randn(4, 1001, generator=g) * 3).round().bfloat16()
    logits[1, 500] = float("nan")
    logits[2] = -0.0
    assert torch.equal(argmax(avx2, logits), argmax(scalar, logits))


# ------------------------------------------------------------------------------------------------
# A whole model on the avx2 variant


@pytest.fixture
def on_avx2() -> Iterator[None]:
    if not HAS_AVX2:
        pytest.skip("this CPU has no AVX2/FMA/F16C (x86-64-v3)")
    cpu_kernels.use_variant("avx2")
    try:
        assert cpu_kernels.variant() == "avx2"
        yield
    finally:
        cpu_kernels.use_variant(None)


@torch.no_grad()
def decode(model: torch.nn.Module, steps: int = 5) -> torch.Tensor:
    """Prefill two prompts, then greedy decode both rows together; the logits of each step."""
    from gemma2 import Gemma2Cache

    g = torch.Generator().manual_seed(5)
    cache = Gemma2Cache(model.config, max_length=32, max_batch=2)
    prompts = torch.randint(2, 200, (2, 7), generator=g)
    tokens = model(prompts, past_key_values=cache, logits_to_keep=1).logits[:, -1:].float().argmax(-1)
    logits = []
    for _ in range(steps):
        out = model(tokens, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        logits.append(out)
        tokens = out.float().argmax(-1, keepdim=True)
    return torch.stack(logits, dim=1)


def test_a_model_decodes_on_the_avx2_variant(on_avx2: None) -> None:
    model = quantizable_model(seed=2)
    assert apply_backend(model, "cpu") == "cpu" and model.model.decode_step is not None
    fused = decode(model)
    step = model.model.decode_step
    model.model.decode_step = None  # op by op, with the avx2 kernels per op
    ops = decode(model)
    assert torch.equal(fused, ops)
    model.model.decode_step = step
    apply_backend(model, "torch")
    reference = decode(model)
    assert (fused.float() - reference.float()).abs().max() <= 0.02 * reference.float().abs().max()


def test_auto_chooses_avx2_where_the_cpu_has_it_and_not_avx512() -> None:
    cpu_kernels.use_variant("auto")
    try:
        if cpu_kernels._cpu_supports_kernels(cpu_kernels.CPU_FEATURES):
            assert cpu_kernels.variant() == "avx512"
        elif HAS_AVX2:
            assert cpu_kernels.variant() == "avx2"
        else:
            assert cpu_kernels.variant() != "avx2"
    finally:
        cpu_kernels.use_variant(None)


# ------------------------------------------------------------------------------------------------
# Building


def test_avx2_sources_compile_with_their_flags() -> None:
    """Without running it: any x86-64 compiler must take the avx2 sources with their flags."""
    if not X86_64:
        pytest.skip("the avx2 variant is x86-64 only")
    assert COMPILER is not None
    flags = [f for f in cpu_kernels.AVX2_FLAGS if f != "-shared"]
    for source in cpu_kernels.AVX2_SOURCES:
        done = subprocess.run(
            [COMPILER, *flags, "-Wall", "-Werror", "-c", str(source), "-o", os.devnull],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr


def test_the_avx2_library_runs_its_own_kernels(avx2: ctypes.CDLL, scalar: ctypes.CDLL) -> None:
    """Its own bf16 and int4 kernels, not the scalar file's: another order of float32 sums, so (over
    this many outputs) not the scalar variant's bits everywhere."""
    g = generator(1)
    x = torch.randn(8, 4096, generator=g).bfloat16()
    w = torch.randn(2000, 4096, generator=g).bfloat16()
    got = linear(avx2, "bf16", x, w)
    assert_bf16_close(got, x, w)
    assert not torch.equal(got, linear(scalar, "bf16", x, w))
    packed, scale, _ = int4_case(2000, 4096, 64, seed=1)
    assert not torch.equal(linear(avx2, "int4", x, packed, scale, G=64), linear(scalar, "int4", x, packed, scale, G=64))
