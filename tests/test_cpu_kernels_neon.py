"""The AArch64 NEON variant of the native kernels (kernels_neon.c + kernels_scalar.c), on any host.

On an x86-64 machine the variant cannot be loaded, so tests/kernels_driver.c checks it instead: a
static AArch64 executable, cross-compiled with the variant's own flags, that links the NEON library
and the scalar reference (included a second time under reference_* names) and compares them (int8
and int4 linear layers and every entry point taken from the scalar file bit for bit, the bf16
linear layer against float64 math). It runs under qemu-user, once on a CPU with the dot-product
extension and once on one without it, where it must refuse cleanly instead of dying of SIGILL.
Each test skips, naming the tool, where the cross compiler or qemu is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gemma2.backends.cpu import library as cpu_kernels

KERNELS = Path(cpu_kernels.__file__).parent
NEON_SOURCE = KERNELS / "kernels_neon.c"
DRIVER = Path(__file__).with_name("kernels_driver.c")
CROSS_GCC = shutil.which("aarch64-linux-gnu-gcc")
CROSS_CLANG = shutil.which("clang")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
NO_DOTPROD_EXIT = 3  # the driver's exit on a CPU without HWCAP_ASIMDDP
QEMU_TIMEOUT_S = 300


def static_flags(compiler: str, scratch: Path) -> list[str]:
    """The variant's flags for a static executable: no -shared/-fPIC, and -fopenmp only where the
    cross toolchain has a static libgomp to link."""
    flags = [flag for flag in cpu_kernels.NEON_FLAGS if flag not in ("-shared", "-fPIC")] + ["-static"]
    probe = scratch / "openmp_probe.c"
    probe.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    trial = subprocess.run([compiler, *flags, str(probe), "-o", str(scratch / "openmp_probe")], capture_output=True)
    return flags if trial.returncode == 0 else [flag for flag in flags if flag != "-fopenmp"]


def driver_command(compiler: str, flags: list[str], output: Path) -> list[str]:
    """The command line that builds the driver (kept in one place so a failure can print it)."""
    sources = [str(DRIVER), str(NEON_SOURCE)]
    return [compiler, *flags, "-Wall", "-Werror", "-I", str(KERNELS), *sources, "-o", str(output), "-lm"]


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if CROSS_GCC is None:
        pytest.skip("no AArch64 cross compiler (aarch64-linux-gnu-gcc) to build the NEON driver")
    if QEMU is None:
        pytest.skip("no qemu-aarch64 (or qemu-aarch64-static) to run the NEON driver")
    scratch = tmp_path_factory.mktemp("neon")
    executable = scratch / "kernels_driver"
    command = driver_command(CROSS_GCC, static_flags(CROSS_GCC, scratch), executable)
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, f"{' '.join(command)}\n{build.stderr}"
    return executable


def run_driver(executable: Path, cpu: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QEMU, "-cpu", cpu, str(executable)], capture_output=True, text=True, timeout=QEMU_TIMEOUT_S)


def test_neon_kernels_match_the_scalar_reference_under_qemu(driver: Path) -> None:
    """Every check group of the driver passes on an emulated CPU with all extensions."""
    result = run_driver(driver, "max")
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    summary = re.search(r"^neon: (\d+) of (\d+) checks passed$", result.stdout, re.MULTILINE)
    assert summary is not None, report
    assert summary[1] == summary[2] and int(summary[2]) > 0, report


def test_driver_refuses_a_cpu_without_dot_products(driver: Path) -> None:
    """Cortex-A53 (ARMv8.0) lacks SDOT: the driver checks HWCAP_ASIMDDP and exits 3 instead of
    executing an illegal instruction (which would end the process with SIGILL, returncode -4)."""
    result = run_driver(driver, "cortex-a53")
    assert result.returncode == NO_DOTPROD_EXIT, result.stdout + result.stderr
    assert "no dot-product instructions" in result.stdout


def test_neon_source_compiles_without_warnings_with_its_flags(tmp_path: Path) -> None:
    """The variant builds warning-free with library.py's flags (compile only: no emulator needed)."""
    flags = [flag for flag in cpu_kernels.NEON_FLAGS if flag not in ("-shared", "-fPIC")]
    if CROSS_GCC is not None:
        compiler = [CROSS_GCC]
    elif CROSS_CLANG is not None:
        compiler = [CROSS_CLANG, "--target=aarch64-linux-gnu"]
    else:
        pytest.skip("no AArch64 cross compiler (aarch64-linux-gnu-gcc or clang) to compile kernels_neon.c")
    command = [*compiler, *flags, "-Wall", "-Wextra", "-Werror", "-c", str(NEON_SOURCE), "-o", str(tmp_path / "n.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
