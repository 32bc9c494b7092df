"""Native CPU kernels (gemma2.cpu_kernels): exact math against float64, dispatch, fallbacks, build cache.

Every native kernel rounds its result to bf16 once, so each output may differ from the float64
value by half a bf16 ulp (2^-9 relative, bounded here by 2^-7) plus the error of the way there:
float32 accumulation for bf16 weights (a tiny multiple of sum_k |x_k * w_k|); exact integer dot
products for quantized weights, against activations quantized per row to int16 for int8 weights
(at most one step, max_k |x_k| / 32767, per element) and per block of 64 to int8 for int4 weights
(at most one step, the block's max |x_k| / 127).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import quantizable_model, randomize_

from gemma2 import Gemma2Cache, Gemma2ForCausalLM
from gemma2 import quant as qz
from gemma2.backends import apply_backend
from gemma2.backends.cpu import kernels as cpu_kernels
from gemma2.backends.cpu import library
from gemma2.backends.cpu.layers import NativeLinear

TESTS = Path(__file__).parent


# Whichever variant "auto" picks on this CPU (avx512, avx2 or neon) runs these tests.
CPU_CAN_RUN_KERNELS = any(
    library._cpu_supports_kernels(library.VARIANTS[name].cpu_features) for name in library.AUTO_ORDER
)
DISABLED_BY_ENV = os.environ.get("GEMMA2_NATIVE_KERNELS") == "0"
# Only a CPU without the features the kernels need (or an explicit opt-out) skips: where the CPU has
# them, a failed build fails the tests.
native = pytest.mark.skipif(
    not CPU_CAN_RUN_KERNELS or DISABLED_BY_ENV,
    reason="no native kernel variant for this CPU (AVX-512 BF16/VNNI, AVX2/FMA/F16C or NEON dot products), "
    "or GEMMA2_NATIVE_KERNELS=0",
)

SHAPES = [(1, 64), (7, 128), (13, 192), (37, 256), (100, 2304), (41, 6144)]  # (N, K); N = 1, 7, 13, 37, 100, 41 leave
# tail rows; K = 6144 puts two or more activation rows past the bf16 kernels' L1 budget (they go in blocks)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_bf16_close(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, int16_activations: bool = False, int8_blocks: bool = False
) -> None:
    """y (bf16) against x @ w^T in float64: bf16 rounding of the output plus the way there."""
    assert y.dtype == torch.bfloat16
    x64, w64 = x.double(), w.double()
    ref = x64 @ w64.T
    tolerance = 2**-7 * ref.abs() + 2**-16 * (x64.abs() @ w64.abs().T) + 1e-30
    if int16_activations:
        tolerance += x64.abs().amax(dim=1, keepdim=True) / 32767 * w64.abs().sum(dim=1)
    if int8_blocks:
        M, K = x64.shape
        step = x64.abs().view(M, K // 64, 64).amax(dim=-1) / 127  # [M, blocks]
        tolerance += step @ w64.abs().view(-1, K // 64, 64).sum(dim=-1).T
    excess = ((y.double() - ref).abs() / tolerance).max().item()
    assert excess <= 1, f"error is {excess:.2f} times the bf16 tolerance"


def int4_case(N: int, K: int, G: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed nibbles and group scales, plus the float64 weights they stand for."""
    g = generator(seed)
    nibbles = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scale = torch.rand(N, K // G, generator=g) * 0.1 + 0.001
    # Layout written out independently of quantization.pack_int4: in each block of 64 weights,
    # byte j holds weight j (low nibble) and weight j + 32 (high nibble).
    blocks = nibbles.view(N, K // 64, 64)
    packed = (blocks[..., :32] | (blocks[..., 32:] << 4)).reshape(N, K // 2)
    levels = nibbles.double().view(N, K // G, G) - 8
    weight = (levels * scale.double()[..., None]).view(N, K)
    return packed.contiguous(), scale, weight


# ------------------------------------------------------------------------------------------------
# The kernels against float64


@native
def test_native_kernels_are_available_on_this_cpu() -> None:
    assert cpu_kernels.available(), "the CPU has every feature the kernels need, so they must build and load"


@native
@pytest.mark.parametrize("M", range(1, cpu_kernels.MAX_ROWS + 1))
def test_linear_bf16_matches_float64(M: int) -> None:
    g = generator(M)
    for N, K in SHAPES:
        x = torch.randn(M, K, generator=g).bfloat16()
        w = torch.randn(N, K, generator=g).bfloat16()
        y = cpu_kernels.linear_bf16(x, w)
        assert y.shape == (M, N)
        assert_bf16_close(y, x, w)


@native
@pytest.mark.parametrize("M", range(1, cpu_kernels.MAX_ROWS + 1))
def test_linear_int8_matches_float64(M: int) -> None:
    g = generator(100 + M)
    for N, K in SHAPES:
        x = torch.randn(M, K, generator=g).bfloat16()
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        scale = torch.rand(N, generator=g) * 0.01 + 1e-4
        y = cpu_kernels.linear_int8(x, q, scale)
        assert y.shape == (M, N)
        assert_bf16_close(y, x, q.double() * scale.double()[:, None], int16_activations=True)


@native
@pytest.mark.parametrize("M", range(1, cpu_kernels.MAX_ROWS + 1))
def test_linear_int4_matches_float64(M: int) -> None:
    g = generator(200 + M)
    for N, K in SHAPES:
        x = torch.randn(M, K, generator=g).bfloat16()
        for G in (64, 128, 256):
            if K % G:
                continue
            packed, scale, weight = int4_case(N, K, G, seed=M * N + G)
            y = cpu_kernels.linear_int4(x, packed, scale, G)
            assert y.shape == (M, N)
            assert_bf16_close(y, x, weight, int8_blocks=True)


@native
def test_linear_int4_handles_zero_tiny_and_subnormal_activation_blocks() -> None:
    """Each block of 64 activations has its own int8 step: zero blocks, subnormal blocks (whose
    127 / max overflows float32) and blocks 1e30 times smaller than their neighbours all keep
    their share of the dot product."""
    g = generator(7)
    x = torch.randn(3, 320, generator=g)
    x[0, :64] = 0
    x[0, 64:128] *= 1e-39  # subnormal in bf16
    x[1, 128:192] *= 1e-30
    x[2] *= 1e-39
    x = x.bfloat16()
    packed, scale, weight = int4_case(9, 320, 64, seed=3)
    y = cpu_kernels.linear_int4(x, packed, scale, 64)
    assert y is not None
    assert_bf16_close(y, x, weight, int8_blocks=True)
    assert (y[2] != 0).all()  # a row of subnormals still gives (tiny) results


@native
def test_linear_int8_handles_zero_and_subnormal_activation_rows() -> None:
    """One int16 step per row: a zero row and a row of subnormals (whose 32767 / max overflows
    float32) still quantize to the right integers."""
    g = generator(11)
    x = torch.randn(3, 96, generator=g)
    x[0] = 0
    x[1] *= 1e-39  # subnormal in bf16
    x = x.bfloat16()
    q = torch.randint(-127, 128, (5, 96), generator=g, dtype=torch.int8)
    scale = torch.rand(5, generator=g) + 0.5
    y = cpu_kernels.linear_int8(x, q, scale)
    assert y is not None
    assert_bf16_close(y, x, q.double() * scale.double()[:, None], int16_activations=True)
    assert (y[0] == 0).all() and (y[1] != 0).any()


@native
@pytest.mark.parametrize("M", [1, 8])
def test_integer_kernels_do_not_overflow_at_the_largest_values(M: int) -> None:
    """Every product at its largest and of one sign, over a K long enough to need several flushes."""
    K = 3 * 4096 + 64
    x = torch.full((M, K), -3.0, dtype=torch.bfloat16)  # quantizes to -32767 everywhere
    q = torch.full((5, K), 127, dtype=torch.int8)
    q[1] = -127
    scale = torch.full((5,), 0.25)
    y = cpu_kernels.linear_int8(x, q, scale)
    assert_bf16_close(y, x, q.double() * 0.25, int16_activations=True)
    assert torch.equal(y[:, 0], torch.full((M,), -3.0 * 127 * K * 0.25).bfloat16())
    packed = torch.zeros(5, K // 2, dtype=torch.uint8)  # every nibble 0: weight -8 * scale
    group_scale = torch.full((5, K // 64), 0.5)
    y = cpu_kernels.linear_int4(x, packed, group_scale, 64)
    assert torch.equal(y, torch.full((M, 5), 3.0 * 8 * K * 0.5).bfloat16())


@native
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_propagate_like_f_linear(bad: float) -> None:
    """A NaN or inf in a row must not come out as a finite (or wrongly signed) number.

    The integer kernels refuse such rows (None) and the quantized layers then compute in floats."""
    g = generator(9)
    w = torch.randn(16, 128, generator=g).bfloat16()
    x = torch.randn(2, 128, generator=g).bfloat16()
    x[0, 5] = bad
    q, scale = qz.quantize_int8(w)
    packed, group_scale = qz.quantize_int4(w, 64)
    assert cpu_kernels.linear_int8(x, q, scale) is None
    assert cpu_kernels.linear_int4(x, packed, group_scale, 64) is None
    linear = torch.nn.Linear(128, 16, bias=False).bfloat16()
    with torch.no_grad():
        linear.weight.copy_(w)
    int8, int4 = qz.Int8Linear.from_linear(linear), qz.Int4Linear.from_linear(linear, 64)
    with torch.no_grad():
        for name, y, weight in [
            ("bf16", cpu_kernels.linear_bf16(x, w), w),
            ("int8", int8(x), int8.dequantize()),
            ("int4", int4(x), int4.dequantize()),
        ]:
            expected = F.linear(x.double(), weight.double())
            assert torch.equal(y[0].isnan(), expected[0].isnan()), name
            assert torch.equal(y[0][expected[0].isinf()].double(), expected[0][expected[0].isinf()]), name
            assert torch.isfinite(y[1]).all(), name


@native
@pytest.mark.parametrize("G", [64, 128, 256])
def test_dequantize_int4_is_exactly_the_python_expansion(G: int) -> None:
    for N, K in SHAPES:
        if K % G:
            continue
        packed, scale, weight = int4_case(N, K, G, seed=G + N)
        native_weight = cpu_kernels.dequantize_int4(packed, scale, G)
        assert native_weight.dtype == torch.bfloat16
        assert torch.equal(native_weight, qz.dequantize_int4(packed, scale))
        assert torch.equal(native_weight, weight.float().bfloat16())  # the float32 product, rounded


@native
def test_leading_dimensions_and_non_contiguous_inputs() -> None:
    g = generator(7)
    w = torch.randn(40, 128, generator=g).bfloat16()
    wide = torch.randn(2, 3, 256, generator=g).bfloat16()
    x = wide[..., ::2]  # [2, 3, 128], not contiguous
    y = cpu_kernels.linear_bf16(x, w)
    assert y.shape == (2, 3, 40)
    assert_bf16_close(y.reshape(6, 40), x.reshape(6, 128), w)


@native
def test_results_do_not_depend_on_the_thread_count() -> None:
    g = generator(8)
    x = torch.randn(3, 256, generator=g).bfloat16()
    w = torch.randn(77, 256, generator=g).bfloat16()
    packed, scale, _ = int4_case(77, 256, 64, seed=8)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append((cpu_kernels.linear_bf16(x, w), cpu_kernels.linear_int4(x, packed, scale, 64)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# NativeLinear: native for decode-sized bf16 inputs, exactly F.linear otherwise


@pytest.fixture
def native_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Records the shape of every input that reaches the native bf16 kernel."""
    calls: list[tuple[int, ...]] = []
    kernel = cpu_kernels.linear_bf16

    def spy(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return kernel(x, weight)

    monkeypatch.setattr(cpu_kernels, "linear_bf16", spy)
    return calls


def bf16_linear(K: int, N: int, bias: bool = False, seed: int = 0) -> NativeLinear:
    layer = NativeLinear(K, N, bias=bias)
    randomize_(layer, seed=seed, std=0.5)
    return layer.to(torch.bfloat16)


@native
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (8,), (1, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_runs_natively_for_decode_sized_inputs(
    shape: tuple[int, ...], bias: bool, native_calls: list[tuple[int, ...]]
) -> None:
    layer = bf16_linear(96, 53, bias=bias)
    x = torch.randn(*shape, 96, generator=generator(1)).bfloat16()
    with torch.no_grad():
        y = layer(x)
    assert native_calls == [(*shape, 96)]
    assert y.shape == (*shape, 53) and y.dtype == torch.bfloat16
    rows = x.reshape(-1, 96)
    # The bias is added to the rounded product (one more bf16 rounding than F.linear's fused add).
    expected = F.linear(rows.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    tolerance = 2**-6 * expected.abs() + 2**-16 * (rows.double().abs() @ layer.weight.double().abs().T) + 2**-8
    assert ((y.reshape(-1, 53).double() - expected).abs() <= tolerance).all()


FALLBACKS: dict[str, Callable[[], tuple[NativeLinear, torch.Tensor]]] = {
    "float32": lambda: (bf16_linear(64, 24).float(), torch.randn(1, 64)),
    "more_than_max_rows": lambda: (bf16_linear(64, 24), torch.randn(1, cpu_kernels.MAX_ROWS + 1, 64).bfloat16()),
    "k_not_multiple_of_32": lambda: (bf16_linear(48, 24), torch.randn(2, 48).bfloat16()),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_linear_falls_back_to_f_linear_exactly(case: str, native_calls: list[tuple[int, ...]]) -> None:
    layer, x = FALLBACKS[case]()
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert native_calls == []


def test_native_path_needs_bf16_activations() -> None:
    weight = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert not cpu_kernels.applies(torch.zeros(1, 64), weight)
    assert not cpu_kernels.applies(torch.zeros(1, 64, dtype=torch.float16), weight)
    assert not cpu_kernels.applies(torch.zeros(0, 64, dtype=torch.bfloat16), weight)


@pytest.mark.parametrize("needs_grad", ["input", "weight"])
def test_linear_under_autograd_falls_back_and_gradients_flow(
    needs_grad: str, native_calls: list[tuple[int, ...]]
) -> None:
    layer = bf16_linear(64, 24, bias=True)
    layer.weight.requires_grad_(needs_grad == "weight")
    x = torch.randn(1, 64, generator=generator(2)).bfloat16().requires_grad_(needs_grad == "input")
    y = layer(x)
    expected = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(y, expected)
    assert native_calls == []
    grad = torch.randn(y.shape, generator=generator(3)).bfloat16()
    (got,) = torch.autograd.grad(y, x if needs_grad == "input" else layer.weight, grad)
    (want,) = torch.autograd.grad(expected, x if needs_grad == "input" else layer.weight, grad)
    assert torch.equal(got, want) and got.abs().sum() > 0


@native
def test_linear_without_autograd_runs_natively(native_calls: list[tuple[int, ...]]) -> None:
    """A model in training mode still decodes natively under no_grad, and when nothing needs grad."""
    layer = bf16_linear(64, 24)
    x = torch.randn(1, 64).bfloat16()
    with torch.no_grad():
        layer(x.requires_grad_())
    layer.weight.requires_grad_(False)
    layer(x.detach())
    assert len(native_calls) == 2


# ------------------------------------------------------------------------------------------------
# A quantized tiny model, with and without native kernels (GEMMA2_NATIVE_KERNELS=0 in a subprocess)


@torch.no_grad()
def decode_logits(model: Gemma2ForCausalLM, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of ids[:, prompt - 1:], the prompt in one call then one token per call (decode path)."""
    cache = Gemma2Cache(model.config)
    steps = [model(ids[:, :prompt], past_key_values=cache, use_cache=True).logits[:, -1:]]
    for t in range(prompt, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(steps, dim=1).float()


IDS = torch.randint(2, 211, (2, 12), generator=generator(5))
ODD_LAYERS = [(37, 128, 64), (24, 128, 128), (8, 256, 256)]  # (N, K, G): N not a multiple of 8 or 16


def model_outputs() -> dict[str, Any]:
    """What the fallback comparison needs; runs in the test process and in the subprocess."""
    base = quantizable_model(vocab_size=211)
    out: dict[str, Any] = {"available": cpu_kernels.available()}
    for mode in ("bf16", "int8", "int4"):
        model = copy.deepcopy(base) if mode == "bf16" else qz.quantize(copy.deepcopy(base), mode, group_size=64)
        out[f"{mode}_logits"] = decode_logits(model, IDS, prompt=4)
        out[f"{mode}_tokens"] = model.generate(IDS[:1, :5], max_new_tokens=8, eos_token_id=[])
    for N, K, G in ODD_LAYERS:
        linear = torch.nn.Linear(K, N, bias=True)
        randomize_(linear, seed=N, std=0.2)
        x = torch.randn(3, K, generator=generator(N)).bfloat16()
        for layer in (qz.Int8Linear.from_linear(linear.bfloat16()), qz.Int4Linear.from_linear(linear.bfloat16(), G)):
            apply_backend(layer, "auto")  # the native kernels where they run, PyTorch's in the subprocess
            key = f"{type(layer).__name__}_{N}x{K}"
            try:
                with torch.no_grad():
                    out[key] = layer(x)
            except Exception as error:  # reported by the test that reads it
                out[key] = f"{type(error).__name__}: {error}"
            dequantized = layer.dequantize().float()
            out[f"{key}_ref"] = F.linear(x.double(), dequantized.double(), layer.bias.double())
            out[f"{key}_bound"] = x.double().abs() @ dequantized.double().abs().T
    return out


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=TESTS,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def without_native(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("fallback") / "outputs.pt"
    code = f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        import test_cpu_kernels
        torch.save(test_cpu_kernels.model_outputs(), {str(path)!r})
    """
    run_python(code, {"GEMMA2_NATIVE_KERNELS": "0"})
    return torch.load(path)


@pytest.fixture(scope="module")
def with_native() -> dict[str, Any]:
    return model_outputs()


def test_disabling_native_kernels(without_native: dict[str, Any]) -> None:
    assert without_native["available"] is False


@native
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_fallback_model_matches_native(mode: str, without_native: dict[str, Any], with_native: dict[str, Any]) -> None:
    assert with_native["available"] is True
    assert torch.equal(without_native[f"{mode}_tokens"], with_native[f"{mode}_tokens"])
    a, b = without_native[f"{mode}_logits"], with_native[f"{mode}_logits"]
    # Two bf16 computations of the same math (the native int kernels quantize activations,
    # PyTorch's round the scales to bf16): measured 0.8 % (max) and 1.1 % (mean) apart for int8
    # and int4, 0.2 % and 0.05 % for bf16.
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert (a - b).abs().mean() <= 0.025 * b.abs().mean()


@pytest.mark.parametrize("name", ["Int8Linear", "Int4Linear"])
@pytest.mark.parametrize(("N", "K", "G"), ODD_LAYERS)
def test_fallback_layers_handle_any_output_size(
    name: str, N: int, K: int, G: int, without_native: dict[str, Any]
) -> None:
    """PyTorch's own int8/int4 kernels (used without native ones) on row counts they may not like."""
    key = f"{name}_{N}x{K}"
    y = without_native[key]
    assert isinstance(y, torch.Tensor), y
    ref, bound = without_native[f"{key}_ref"], without_native[f"{key}_bound"]
    # Weights may be rounded to bf16 too (2^-9 each), and the bias is added in bf16.
    assert ((y.double() - ref).abs() <= 2**-7 * ref.abs() + 2**-8 * bound + 2**-7).all()


# ------------------------------------------------------------------------------------------------
# Building the library: cached by source digest, and a broken compiler only costs speed

PRINT_LIBRARY = """
    import json, os
    from gemma2.backends.cpu import library as kernels
    library = kernels._library()
    path = library._name if library is not None else None
    print(json.dumps({"available": kernels.available(), "path": path,
                      "mtime": os.stat(path).st_mtime_ns if path else None}))
"""


@native
def test_library_is_built_once_into_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = json.loads(run_python(PRINT_LIBRARY, {"GEMMA2_CACHE": str(cache)}).stdout)
    assert first["available"] is True
    library = Path(first["path"])
    assert library.name == "libgemma2_cpu.so" and library.exists()
    digest = library.parent
    assert digest.parent == cache / "kernels" and len(digest.name) == 16
    int(digest.name, 16)
    assert [p.name for p in digest.iterdir()] == ["libgemma2_cpu.so"]  # no scratch left behind
    # A second process reuses it: with a compiler that always fails, it still loads the same file.
    second = json.loads(run_python(PRINT_LIBRARY, {"GEMMA2_CACHE": str(cache), "CC": "/bin/false"}).stdout)
    assert second == first


@native
def test_a_broken_compiler_warns_and_the_model_still_works(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code = """
        import json, sys, torch
        import torch.nn.functional as F
        sys.path.insert(0, ".")
        from conftest import quantizable_model
        from gemma2 import quant as quantization
        from gemma2.backends.cpu import kernels as cpu_kernels
        available = cpu_kernels.available()
        model = quantizable_model(vocab_size=211)
        x = torch.randn(1, 128).bfloat16()
        with torch.no_grad():
            exact = torch.equal(model.lm_head(x), F.linear(x, model.lm_head.weight))
        quantization.quantize(model, "int4", 64)
        tokens = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, eos_token_id=[])
        print(json.dumps({"available": available, "exact": exact, "tokens": tokens.tolist()}))
    """
    done = run_python(code, {"GEMMA2_CACHE": str(cache), "CC": "/bin/false"})
    result = json.loads(done.stdout)
    assert result["available"] is False
    assert "native CPU kernels unavailable" in done.stderr and "/bin/false" in done.stderr
    assert result["exact"] is True
    assert len(result["tokens"][0]) == 7
    assert not list(cache.rglob("*.so"))  # nothing half-built is left to be loaded later


# ------------------------------------------------------------------------------------------------
# The small per-layer operations of a decode step


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).type_as(x)


@native
@pytest.mark.parametrize("D", [16, 40, 2304, 3584])
def test_rms_norm_rounds_like_the_reference(D: int) -> None:
    g = generator(D)
    weight = torch.randn(D, generator=g).bfloat16()
    for scale in (1e-4, 1.0, 300.0):
        # A few large features, as Gemma's hidden states have.
        x = (torch.randn(5, 1, D, generator=g) * scale * (1 + 20 * (torch.rand(D, generator=g) > 0.98))).bfloat16()
        with torch.no_grad():
            assert cpu_kernels.rms_norm_applies(x, weight)
            got = cpu_kernels.rms_norm(x, weight, 1e-6)
        want = reference_rms_norm(x, weight, 1e-6)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        # Only the order of the sum of squares differs: at most one bf16 step, and rarely.
        step = want.float().abs() * 2**-7 + 1e-30
        assert ((got.float() - want.float()).abs() <= step).all()
        assert (got == want).float().mean() >= 0.99


@native
def test_rms_norm_only_takes_decode_sized_bf16_inputs_without_autograd() -> None:
    weight = torch.zeros(64, dtype=torch.bfloat16)
    x = torch.randn(2, 1, 64).bfloat16()
    assert cpu_kernels.rms_norm_applies(x, weight)
    assert not cpu_kernels.rms_norm_applies(x.float(), weight)
    assert not cpu_kernels.rms_norm_applies(x, weight.float())
    assert not cpu_kernels.rms_norm_applies(torch.randn(1, cpu_kernels.SMALL_OP_ROWS + 1, 64).bfloat16(), weight)
    with torch.enable_grad():
        assert not cpu_kernels.rms_norm_applies(x, weight.clone().requires_grad_())


@native
@pytest.mark.parametrize("B", [1, 3])
def test_rotary_is_bit_identical_to_the_reference(B: int) -> None:
    from gemma2.model import rotary_cos_sin

    g = generator(B)
    for D, theta in ((256, 10000.0), (128, 10000.0), (32, 500.0)):
        positions = torch.randint(0, 8192, (B, 1), generator=g)
        for cos, sin in (
            rotary_cos_sin(positions, D, theta, torch.bfloat16),
            rotary_cos_sin(positions[:1], D, theta, torch.bfloat16),
        ):
            x = torch.randn(B, 1, 6, D, generator=g).bfloat16().transpose(1, 2)  # a projection's layout
            assert cpu_kernels.rotary_applies(x, cos, sin)
            got = cpu_kernels.rotary(x, cos, sin)
            rotated = torch.cat((-x[..., D // 2 :], x[..., : D // 2]), dim=-1)
            assert torch.equal(got, x * cos[:, None] + rotated * sin[:, None])


@native
def test_rotary_leaves_other_layouts_to_pytorch() -> None:
    cos = sin = torch.ones(1, 1, 64, dtype=torch.bfloat16)
    assert not cpu_kernels.rotary_applies(torch.randn(1, 4, 2, 64).bfloat16(), cos, sin)  # two tokens
    assert not cpu_kernels.rotary_applies(torch.randn(1, 4, 1, 64), cos.float(), sin.float())  # float32
    assert not cpu_kernels.rotary_applies(torch.randn(1, 64, 1, 4).bfloat16().transpose(1, 3), cos, sin)


# ------------------------------------------------------------------------------------------------
# Attention of one new token over the cache


@native
@pytest.mark.parametrize(
    ("B", "H", "K", "S", "D", "softcap", "window"),
    [
        (1, 8, 4, 513, 256, 50.0, None),
        (2, 4, 4, 37, 32, 50.0, 20),
        (3, 6, 2, 100, 96, None, None),
        (1, 16, 8, 64, 128, 20.0, 30),
        (1, 8, 2, 5, 64, 30.0, None),  # 4 heads per key head; fewer keys than one vector of scores
        (2, 12, 1, 300, 64, 50.0, 100),  # 12 heads per key head: scored 8 and then 4 at a time
    ],
)
def test_decode_attention_equals_eager_attention(
    B: int, H: int, K: int, S: int, D: int, softcap: float | None, window: int | None
) -> None:
    from gemma2.attention import MaskSpec, eager_attention

    g = generator(S + D)
    q = (torch.randn(B, H, 1, D, generator=g) * 3).bfloat16()
    keys = (torch.randn(B, K, S, D, generator=g) * 3).bfloat16()
    values = torch.randn(B, K, S, D, generator=g).bfloat16()
    # Slots of a ring buffer, each row at its own position: positions out of order, a few never
    # written (-1), the query's own last.
    query_positions = torch.tensor([S + 40 + 7 * b for b in range(B)])
    key_positions = torch.stack([torch.randperm(S, generator=g) + 41 + 7 * b for b in range(B)])
    key_positions[torch.rand(B, S, generator=g) < 0.1] = -1
    key_positions[:, 0] = query_positions
    padding = torch.rand(B, S, generator=g) > 0.3
    padding[:, 0] = True
    if B > 1:
        padding[1] = False  # a row that sees nothing (all padding): zeros, as documented
    mask = MaskSpec(query_positions[:, None], key_positions, window=window, key_padding=padding)
    with torch.no_grad():
        assert cpu_kernels.decode_attention_applies(q, keys, values)
        got = cpu_kernels.decode_attention(
            q, keys, values, key_positions, query_positions, window, padding, 0.0625, softcap
        )
        want = eager_attention(q, keys, values, mask, 0.0625, softcap)
    assert got.shape == want.shape == (B, 1, H, D)
    sees = padding.any(dim=1)
    assert (got[~sees] == 0).all()
    got, want = got[sees].float(), want[sees].float()
    # The same roundings as eager; float32 sums in another order: rarely one bf16 step apart.
    assert ((got - want).abs() <= want.abs() * 2**-7 + 1e-6).all()
    assert (got == want).float().mean() >= 0.95
    # A window narrower than the keys changes the result: the kernel applies it.
    if window is not None:
        wide = cpu_kernels.decode_attention(
            q, keys, values, key_positions, query_positions, None, padding, 0.0625, softcap
        )
        assert not torch.equal(wide[sees].float(), got)


EVERY_BF16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal bf16 tensors, any NaN matching any NaN."""
    return bool(((a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())).all())


@native
@pytest.mark.parametrize("cap", [30.0, 50.0, 7.3, 1e-3])
def test_soft_cap_is_bit_identical_for_every_bf16_value(cap: float) -> None:
    """Subnormals included: the native rounding must not flush them as VCVTNEPS2BF16 does."""
    logits = EVERY_BF16.view(4, -1)
    assert cpu_kernels.logits_op_applies(logits)
    assert same_bits(cpu_kernels.soft_cap(logits, cap), torch.tanh(logits / cap) * cap)
    odd = EVERY_BF16[:1001]  # a length that leaves a scalar tail
    assert same_bits(cpu_kernels.soft_cap(odd, cap), torch.tanh(odd / cap) * cap)


@native
@pytest.mark.parametrize("n", [1, 5, 16, 17, 1000, 256000])
def test_argmax_equals_torch_argmax_with_ties_nan_and_signed_zeros(n: int) -> None:
    g = generator(n)
    for trial in range(12):
        logits = (torch.randn(3, n, generator=g) * 3).round().bfloat16()  # many ties
        if trial % 4 == 1:
            logits[1, int(torch.randint(0, n, (1,), generator=g))] = float("nan")
        elif trial % 4 == 2:
            logits[:] = float("-inf")
        elif trial % 4 == 3:
            logits[0] = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, -0.0)
        assert torch.equal(cpu_kernels.argmax(logits), logits.argmax(-1))


def test_logits_ops_leave_training_prompts_and_other_dtypes_to_pytorch() -> None:
    logits = torch.randn(2, 300).bfloat16()
    assert cpu_kernels.logits_op_applies(logits) == cpu_kernels.available()
    assert not cpu_kernels.logits_op_applies(logits.float())
    assert not cpu_kernels.logits_op_applies(torch.randn(65, 300).bfloat16())  # a prompt's rows
    assert not cpu_kernels.logits_op_applies(torch.randn(300, 2).bfloat16().T)  # not contiguous
    with torch.enable_grad():
        assert not cpu_kernels.logits_op_applies(logits.clone().requires_grad_())
