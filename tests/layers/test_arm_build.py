"""The aarch64 build, checked from an x86-64 machine.

This machine cannot run aarch64 code, so the quantized-matmul extension's source
(yun/kernels/quant.cpp: x86 paths under target pragmas, a portable scalar path for
everything else) is cross-compiled for aarch64 with Debian's g++-aarch64-linux-gnu (.ci/run
installs it) against torch's headers, as torch's extension build would compile it on an ARM
machine. The AVX-512 / AVX2 builds are x86-only by design: on an ARM CPU's features the
dispatch must pick neither, so those layers use torch's kernels there.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from yun import kernels
from yun.kernels import cpu

CXX = shutil.which("aarch64-linux-gnu-g++")
KERNELS = Path(kernels.__file__).parent
ARM = frozenset({"neon", "asimddp"})
EM_AARCH64 = 183  # ELF e_machine of an aarch64 object


@pytest.mark.skipif(CXX is None, reason="no aarch64 cross compiler (g++-aarch64-linux-gnu)")
def test_quantized_kernels_compile_for_aarch64(tmp_path):
    from torch.utils.cpp_extension import include_paths

    obj = tmp_path / "quant.o"
    cmd = [CXX, "-std=c++20", "-O0", "-fopenmp", "-w", "-c", "-o", str(obj),
           *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
           "-DTORCH_EXTENSION_NAME=yun_quant_kernels", "-DTORCH_API_INCLUDE_EXTENSION_H",
           str(KERNELS / "quant.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    head = obj.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == EM_AARCH64
    # The extension's entry points are in the object (pybind11 registers them by name).
    names = subprocess.run([CXX.replace("g++", "nm"), "-C", str(obj)], capture_output=True,
                           text=True, check=True).stdout
    assert "PyInit_yun_quant_kernels" in names
    assert "scalar::run(" in names  # the portable path is compiled in
    assert "avx512vnni::" not in names and "avx2::" not in names  # x86 paths left out


def test_an_arm_cpu_gets_torch_kernels_and_the_scalar_quantized_path():
    assert kernels.native_isa(ARM) is None
    assert kernels.native_isa(ARM, isa="avx2") is None
    assert cpu.quant_path(ARM) == "scalar"
    # and an x86-64 CPU with AVX2 only gets the AVX2 build and path
    avx2 = frozenset({"avx2", "fma", "f16c"})
    assert kernels.native_isa(avx2) == "avx2" and cpu.quant_path(avx2) == "avx2"
