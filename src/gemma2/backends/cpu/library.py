"""The native CPU kernel library: its variants, the build into the cache, loading with ctypes.

Decoding one token reads every weight once, so its speed is memory bandwidth. PyTorch's bf16
matrix-vector product falls well short of it (about 60 % on AVX-512 CPUs, far less on AVX2 ones), and
its weight-only int8/int4 kernels further. The kernels read each weight row once for up to MAX_ROWS
activation rows and run close to the bandwidth of a plain reduction (see `gemma2 bench`).

The C files ship with the package. Each variant has the same entry points and ABI:
  avx512  kernels_avx512*.c: AVX-512 BF16 + VNNI (Sapphire Rapids and later, Zen 4 and later)
  avx2    kernels_avx2.c: AVX2 + FMA + F16C (x86-64-v3: Haswell and later, Zen 1-3)
  neon    kernels_neon.c: AArch64 Advanced SIMD with dot products (Apple M1 and later, Graviton 2
          and later, Neoverse, Cortex-A76 and later)
  scalar  kernels_scalar.c: portable C99, the reference the others are tested against
avx2 and neon #include the scalar file for the entry points they do not make faster. A variant is
compiled on first use with the system C compiler into the cache (keyed by the variant, its sources,
headers and flags), then loaded with ctypes. GEMMA2_CPU_KERNELS
picks one (auto: the fastest this CPU runs); PyTorch's own kernels run where none is selected or
can be used: GEMMA2_CPU_KERNELS=off or GEMMA2_NATIVE_KERNELS=0, a CPU with none of the features, no
compiler. The kernels only run where they are exact stand-ins for F.linear in bf16: CPU tensors,
bf16 activations, no autograd, at most MAX_ROWS rows, K a multiple of 32.
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
COMMON_HEADER = SOURCE.with_name("kernels_common.h")  # bf16 conversions and MAX_ROWS, for every variant
DECODE_LAYER_HEADER = SOURCE.with_name("kernels_decode_layer.h")  # the fused layer every variant includes
SCALAR_SOURCE = SOURCE.with_name("kernels_scalar.c")
# The avx2 and neon variants: their own fast entry points, then `#include "kernels_scalar.c"` for the rest.
AVX2_SOURCES = (SOURCE.with_name("kernels_avx2.c"),)
NEON_SOURCES = (SOURCE.with_name("kernels_neon.c"),)
SCALAR_HEADERS = (SCALAR_SOURCE, COMMON_HEADER, DECODE_LAYER_HEADER)
AVX2_CPU_FEATURES = ("avx2", "fma", "f16c")  # x86-64-v3
NEON_CPU_FEATURES = ("asimd", "asimddp")  # AArch64 /proc/cpuinfo names: Advanced SIMD and its dot products
MAX_ROWS = 8  # activation rows per call; must match MAX_ROWS in kernels_common.h
SMALL_OP_ROWS = 64  # rows up to which the single-threaded norm runs natively (decode and small batches)
CPU_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni")  # /proc/cpuinfo names
FLAGS = ["-O3", *(f"-m{feature.replace('_', '')}" for feature in CPU_FEATURES), "-fopenmp", "-shared", "-fPIC"]
# -ffp-contract=off everywhere: GCC fuses a * b + c into FMAs by default where the target has them
# (AArch64), and the scalar reference would then round differently from the variants built on it.
SCALAR_FLAGS = ["-O2", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# -ffp-contract=off: with -mfma GCC would fuse the scalar file's a * b + c into FMAs, and its entry
# points would no longer be the scalar variant's bit for bit.
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
NEON_FLAGS = ["-O3", "-march=armv8.2-a+dotprod", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# Which variant _library() loads: "auto" (the default) is the fastest one this CPU runs (avx512,
# then avx2 on x86-64, neon on AArch64) and PyTorch's kernels on any other CPU; the scalar variant
# is a portable correctness reference, not a fast path, so only asking for it chooses it.
# GEMMA2_NATIVE_KERNELS=0 (the older switch) means "off" too.
VARIANT_ENV = "GEMMA2_CPU_KERNELS"
VARIANT_CHOICES = ("auto", "avx512", "avx2", "neon", "scalar", "off")
AUTO_ORDER = ("avx512", "avx2", "neon")  # fastest first

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
    "avx512": Variant(
        AVX512_SOURCES, tuple(FLAGS), CPU_FEATURES, headers=(AVX512_HEADER, COMMON_HEADER, DECODE_LAYER_HEADER)
    ),
    # Builds without OpenMP too (a compiler without it, e.g. Apple's clang): one thread then.
    "scalar": Variant((SCALAR_SOURCE,), tuple(SCALAR_FLAGS), optional_flags=("-fopenmp",), headers=SCALAR_HEADERS),
    "avx2": Variant(AVX2_SOURCES, tuple(AVX2_FLAGS), AVX2_CPU_FEATURES, ("-fopenmp",), SCALAR_HEADERS),
    "neon": Variant(NEON_SOURCES, tuple(NEON_FLAGS), NEON_CPU_FEATURES, ("-fopenmp",), SCALAR_HEADERS),
}

_loaded: dict[str, ctypes.CDLL] = {}  # the libraries load_variant has loaded, by variant


@lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """This CPU's instruction-set features, by their Linux /proc/cpuinfo names (empty where unknown).

    x86-64 Linux: the "flags" line; AArch64 Linux: the "Features" line (the kernel's HWCAP bits,
    as the auxiliary vector has them); macOS on Apple silicon: `sysctl hw.optional.arm.FEAT_*`.
    """
    system, machine = platform.system(), platform.machine().lower()
    if system == "Linux":
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                return frozenset(value.split())
        return frozenset()
    if system == "Darwin" and machine == "arm64":
        names = {"asimd"}  # every Apple silicon CPU
        for feature, name in (("FEAT_DotProd", "asimddp"), ("FEAT_BF16", "bf16"), ("FEAT_I8MM", "i8mm")):
            done = subprocess.run(
                ["sysctl", "-n", f"hw.optional.arm.{feature}"], capture_output=True, text=True, check=False
            )
            if done.stdout.strip() == "1":
                names.add(name)
        return frozenset(names)
    return frozenset()


def cpu_architecture() -> str:
    """x86_64, aarch64 or what platform.machine() says (lower case)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def cpu_summary() -> str:
    """The architecture and the features the variants look for, e.g. "x86_64: avx2 fma f16c"."""
    wanted = {*CPU_FEATURES, *AVX2_CPU_FEATURES, *NEON_CPU_FEATURES, "amx_bf16", "bf16", "i8mm"}
    present = sorted(wanted & cpu_features())
    return f"{cpu_architecture()}: {' '.join(present) if present else 'none of the features the kernels use'}"


def _cpu_supports_kernels(features: tuple[str, ...] = CPU_FEATURES) -> bool:
    """Whether this CPU has every feature of a variant (and the architecture those names belong to)."""
    if not features:
        return True
    architecture = "aarch64" if features[0] == "asimd" else "x86_64"
    return cpu_architecture() == architecture and set(features) <= cpu_features()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build(directory: Path, name: str = "avx512") -> Path:
    """Compile variant `name` into directory (atomically: a half-written library never appears)."""
    variant = VARIANTS[name]
    library = directory / "libgemma2_cpu.so"
    if library.exists():
        return library
    compiler = _compiler()
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
        architecture = "AArch64" if variant.cpu_features[0] == "asimd" else "x86-64"
        raise OSError(f"the {name} kernels need an {architecture} CPU with {', '.join(variant.cpu_features)}")
    from gemma2.paths import cache_dir

    # The variant, its source and its flags all go into the key: each build gets its own directory.
    code = b"".join(path.read_bytes() for path in (*variant.sources, *variant.headers))
    # Not the compiler: a library once built keeps loading after the compiler changes or is gone. The
    # flags name the instruction set (never -march=native), so a cache shared between CPUs is safe.
    key = name.encode() + b"\0" + code + " ".join(variant.flags).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    library = _declare(ctypes.CDLL(str(_build(cache_dir() / "kernels" / digest, name))))
    _loaded[name] = library
    return library


_chosen: list[str] = []  # a variant use_variant() chose for this process, over the environment


def use_variant(name: str | None) -> None:
    """Run this process on kernel variant `name` (one of VARIANT_CHOICES); None: back to GEMMA2_CPU_KERNELS.

    Models with the cpu backend follow at their next call (where a variant cannot run, they use
    PyTorch's ops): tests compare the variants and the op path in one process this way.
    """
    if name is not None and name not in VARIANT_CHOICES:
        raise ValueError(f"kernel variant must be one of {', '.join(VARIANT_CHOICES)}, got {name!r}")
    _chosen[:] = [] if name is None else [name]
    _library.cache_clear()


def _requested_variant() -> str:
    """GEMMA2_CPU_KERNELS (one of VARIANT_CHOICES; GEMMA2_NATIVE_KERNELS=0 means off)."""
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
    if name == "off":
        return None
    if name != "auto":
        candidates = [name]
    else:
        # The fastest variant this CPU runs; where its build fails (an older compiler without the
        # AVX-512 BF16 intrinsics, say), the next one.
        candidates = [n for n in AUTO_ORDER if _cpu_supports_kernels(VARIANTS[n].cpu_features)]
        if not candidates:
            logger.warning("gemma2: no native CPU kernels for this CPU (%s), using PyTorch's ops", cpu_architecture())
    for candidate in candidates:
        try:
            return load_variant(candidate)
        except OSError as error:
            logger.warning("gemma2: native CPU kernels unavailable (%s: %s)", candidate, error)
    if candidates:
        logger.warning("gemma2: using PyTorch's ops")
    return None


def variant() -> str | None:
    """Which variant _library() loaded (a key of VARIANTS), or None when it uses PyTorch's kernels."""
    library = _library()
    return next((name for name, loaded in _loaded.items() if loaded is library), None)


def available() -> bool:
    """Whether native kernels (of the selected variant) are compiled, loaded and usable on this CPU."""
    return _library() is not None
