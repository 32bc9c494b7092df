"""The native CPU kernel library: its variants, the build into the cache, loading with ctypes.

Decoding one token reads every weight once, so its speed is memory bandwidth. PyTorch's bf16
matmul reaches about 60 % of it for a single row on AVX-512 CPUs, and its weight-only int8/int4
kernels less. kernels_avx512*.c reads each weight row once for up to MAX_ROWS activation rows and
runs close to the bandwidth of a plain reduction (see `gemma2 bench`).

The C files ship with the package; each variant (avx512, avx2, scalar: the same entry points and
ABI) is compiled on first use with the system C compiler into the cache (keyed by the variant,
its sources and headers, and its flags), then loaded with ctypes. Everything falls back to
PyTorch's own kernels when no variant is selected or can be used: GEMMA2_CPU_KERNELS=off or
GEMMA2_NATIVE_KERNELS=0, "auto" on a CPU without AVX-512 BF16/VNNI, no compiler. The kernels
only run where they are exact stand-ins for F.linear in bf16: CPU tensors, bf16 activations, no
autograd, at most MAX_ROWS rows, K a multiple of 32.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels_avx512.c")  # the matrix kernels; the rest in the files below
AVX512_SOURCES = (SOURCE, SOURCE.with_name("kernels_avx512_decode.c"))
AVX512_HEADER = SOURCE.with_name("kernels_avx512.h")
DECODE_LAYER_HEADER = SOURCE.with_name("kernels_decode_layer.h")  # the fused layer every variant includes
SCALAR_SOURCE = Path(__file__).with_name("kernels_scalar.c")
# The avx2 variant: its bf16 linear layer, every other entry point from the scalar file (see kernels_avx2.c).
AVX2_SOURCES = (Path(__file__).with_name("kernels_avx2.c"), SCALAR_SOURCE)
AVX2_CPU_FEATURES = ("avx2", "fma", "f16c")  # x86-64-v3
MAX_ROWS = 8  # activation rows per call; must match MAX_ROWS in kernels_avx512.c and kernels_scalar.c
SMALL_OP_ROWS = 64  # rows up to which the single-threaded norm runs natively (decode and small batches)
CPU_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni")  # /proc/cpuinfo names
FLAGS = ["-O3", *(f"-m{feature.replace('_', '')}" for feature in CPU_FEATURES), "-fopenmp", "-shared", "-fPIC"]
SCALAR_FLAGS = ["-O2", "-fopenmp", "-shared", "-fPIC"]
# -ffp-contract=off: with -mfma GCC would fuse the scalar file's a * b + c into FMAs, and its entry
# points would no longer be the scalar variant's bit for bit.
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# Which variant _library() loads: "auto" (the default) is avx512 where the CPU has it and PyTorch's
# kernels elsewhere, since the scalar variant is a portable correctness reference, not a fast path,
# and the avx2 variant (AVX2 + FMA bf16 linear layers, the rest scalar) is opt-in only.
# GEMMA2_NATIVE_KERNELS=0 (the older switch) means "off" too.
VARIANT_ENV = "GEMMA2_CPU_KERNELS"
VARIANT_CHOICES = ("auto", "avx512", "avx2", "scalar", "off")

_c_int64, _c_ptr = ctypes.c_int64, ctypes.c_void_p


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: the same entry points (and ABI) from other C sources."""

    sources: tuple[Path, ...]
    flags: tuple[str, ...]
    cpu_features: tuple[str, ...] = ()  # /proc/cpuinfo names it needs on x86-64 Linux; () runs anywhere
    optional_flags: tuple[str, ...] = ()  # dropped on a second try when the compiler rejects them
    headers: tuple[Path, ...] = ()  # included by the sources: part of the cache key


VARIANTS = {
    "avx512": Variant(AVX512_SOURCES, tuple(FLAGS), CPU_FEATURES, headers=(AVX512_HEADER, DECODE_LAYER_HEADER)),
    # Builds without OpenMP too (a compiler without it, e.g. Apple's clang): one thread then.
    "scalar": Variant(
        (SCALAR_SOURCE,), tuple(SCALAR_FLAGS), optional_flags=("-fopenmp",), headers=(DECODE_LAYER_HEADER,)
    ),
    "avx2": Variant(AVX2_SOURCES, tuple(AVX2_FLAGS), AVX2_CPU_FEATURES, headers=(DECODE_LAYER_HEADER,)),
}

_loaded: dict[str, ctypes.CDLL] = {}  # the libraries load_variant has loaded, by variant


def _cpu_supports_kernels(features: tuple[str, ...] = CPU_FEATURES) -> bool:
    if not features:
        return True
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {feature}" in flags for feature in features)


def _build(directory: Path, name: str = "avx512") -> Path:
    """Compile variant `name` into directory (atomically: a half-written library never appears)."""
    variant = VARIANTS[name]
    library = directory / "libgemma2_cpu.so"
    if library.exists():
        return library
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (set CC)")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / library.name
        attempts = [variant.flags]
        if variant.optional_flags:
            attempts.append(tuple(flag for flag in variant.flags if flag not in variant.optional_flags))
        for flags in attempts:
            result = subprocess.run(
                [compiler, *flags, *map(str, variant.sources), "-o", str(partial), "-lm"],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                break
        else:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    return library


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Set the argument and result types of every entry point (the same for every variant)."""
    library.gemma2_linear_int8.restype = library.gemma2_linear_int4.restype = ctypes.c_int
    library.gemma2_linear_bf16.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int64, _c_int64, _c_int64, ctypes.c_int]
    library.gemma2_linear_int8.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_ptr, _c_int64, _c_int64, _c_int64, ctypes.c_int]
    library.gemma2_linear_int4.argtypes = [
        *(_c_ptr,) * 4,
        *(_c_int64,) * 4,
        ctypes.c_int,
    ]
    library.gemma2_dequantize_int4.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int64, _c_int64, _c_int64, ctypes.c_int]
    library.gemma2_decode_attention.argtypes = [
        *(_c_ptr,) * 5,
        _c_int64,
        _c_ptr,
        _c_int64,
        _c_ptr,
        _c_int64,
        _c_ptr,
        *(_c_int64,) * 7,
        ctypes.c_float,
        ctypes.c_float,
        ctypes.c_int,
    ]
    library.gemma2_dequantize_int8.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int64, _c_int64, ctypes.c_int]
    library.gemma2_rms_norm.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int64, _c_int64, ctypes.c_float]
    library.gemma2_rotary.argtypes = [*(_c_ptr,) * 4, *(_c_int64,) * 4]
    library.gemma2_decode_layers.argtypes = [_c_int64, *(_c_ptr,) * 5, _c_int64, ctypes.c_int]
    library.gemma2_decode_layers.restype = _c_int64
    library.gemma2_soft_cap.argtypes = [_c_ptr, _c_ptr, _c_int64, ctypes.c_float, ctypes.c_int]
    library.gemma2_argmax_bf16.argtypes = [_c_ptr, _c_int64, _c_int64, _c_ptr]
    return library


def load_variant(name: str) -> ctypes.CDLL:
    """Build (once, into the cache) and load variant `name` of the kernels, whatever GEMMA2_CPU_KERNELS says.

    Raises ValueError for an unknown name and OSError where it cannot be built or loaded, or where
    this CPU lacks the instructions it needs. Loading one variant does not change which one
    _library() uses, so tests can call two side by side.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown CPU kernel variant {name!r}: expected one of {', '.join(VARIANTS)}")
    if name in _loaded:
        return _loaded[name]
    variant = VARIANTS[name]
    if not _cpu_supports_kernels(variant.cpu_features):
        raise OSError(f"the {name} kernels need x86-64 Linux with {', '.join(variant.cpu_features)}")
    from gemma2.paths import cache_dir

    # The variant, its source and its flags all go into the key: each build gets its own directory.
    code = b"".join(path.read_bytes() for path in (*variant.sources, *variant.headers))
    key = name.encode() + b"\0" + code + " ".join(variant.flags).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    library = _declare(ctypes.CDLL(str(_build(cache_dir() / "kernels" / digest, name))))
    _loaded[name] = library
    return library


_chosen: list[str] = []  # a variant use_variant() chose for this process, over the environment


def use_variant(name: str | None) -> None:
    """Run this process on kernel variant `name` (auto, avx512, avx2, scalar or off); None: back to GEMMA2_CPU_KERNELS.

    Models with the cpu backend follow at their next call (where a variant cannot run, they use
    PyTorch's ops): tests compare the variants and the op path in one process this way.
    """
    if name is not None and name not in VARIANT_CHOICES:
        raise ValueError(f"kernel variant must be one of {', '.join(VARIANT_CHOICES)}, got {name!r}")
    _chosen[:] = [] if name is None else [name]
    _library.cache_clear()


def _requested_variant() -> str:
    """GEMMA2_CPU_KERNELS (auto, avx512, avx2, scalar or off; GEMMA2_NATIVE_KERNELS=0 means off)."""
    if _chosen:
        return _chosen[0]
    raw = os.environ.get(VARIANT_ENV, "auto")
    value = raw.strip().lower() or "auto"
    if value not in VARIANT_CHOICES:
        raise ValueError(f"{VARIANT_ENV}={raw!r} is not one of {', '.join(VARIANT_CHOICES)}")
    return "off" if os.environ.get("GEMMA2_NATIVE_KERNELS", "1") == "0" else value


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The kernels GEMMA2_CPU_KERNELS selects, or None for PyTorch's own (a failed build warns)."""
    name = _requested_variant()
    if name == "auto":
        name = "avx512" if _cpu_supports_kernels(VARIANTS["avx512"].cpu_features) else "off"
    if name == "off":
        return None
    try:
        return load_variant(name)
    except OSError as error:
        logger.warning("gemma2: native CPU kernels unavailable, using PyTorch's (%s)", error)
        return None


def variant() -> str | None:
    """Which variant _library() loaded ("avx512", "scalar" or "avx2"), or None when it uses PyTorch's kernels."""
    library = _library()
    return next((name for name, loaded in _loaded.items() if loaded is library), None)


def available() -> bool:
    """Whether native kernels (of the selected variant) are compiled, loaded and usable on this CPU."""
    return _library() is not None
