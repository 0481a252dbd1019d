"""The fused CPU forward pass of `csrc/forward.cpp`, compiled with the system's C++ compiler on first use.

`forward_tokens_kernel()` returns `torch.ops.orchard_engine.forward_tokens`, or None when it cannot be had (no
compiler, a failed build, `ORCHARD_FUSED_DECODE=0`); `TorchEngine` then runs the same step in plain torch.
The shared library is cached under `$ORCHARD_KERNEL_CACHE` (default `~/.cache/orchard/kernels`), named by
a hash of the source, the torch version and the flags, so a changed source or torch rebuilds it. The
build writes a temporary file and renames it into place, so processes building at once (rollout
workers starting together) never load a half-written library.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils import cpp_extension

SOURCE = Path(__file__).parent / "csrc" / "forward.cpp"
#: Set to 0 to always run generation in plain torch.
DISABLE_VARIABLE = "ORCHARD_FUSED_FORWARD"
CACHE_VARIABLE = "ORCHARD_KERNEL_CACHE"
#: Vector instructions for ATen's `Vectorized` in the kernel, matching the capability torch itself uses.
CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}  # fmt: skip
BUILD_TIMEOUT_SECONDS = 600

_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def forward_tokens_kernel() -> Any | None:
    """The compiled `forward_tokens` op, built and loaded once per process; None when unavailable (warns once,
    with the reason)."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return None
    with _lock:
        if "op" not in _loaded:
            try:
                torch.ops.load_library(str(_build()))
                _loaded["op"] = torch.ops.orchard_engine.forward_tokens
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _loaded["op"] = None
                warnings.warn(
                    f"TorchEngine runs generation in plain torch (slower): the fused kernel {SOURCE.name} "
                    f"could not be built or loaded ({error}); install g++ to get it, or set "
                    f"{DISABLE_VARIABLE}=0 to silence this",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _loaded["op"]


def _compile_command(source: Path, output: Path) -> list[str]:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    library_dirs = cpp_extension.library_paths()
    libraries = [f"-L{path}" for path in library_dirs] + [f"-Wl,-rpath,{path}" for path in library_dirs]
    capability = CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    return [
        compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *capability, *includes, str(source), "-o", str(output), *libraries, "-lc10", "-ltorch_cpu",
    ]  # fmt: skip


def _build() -> Path:
    """The cached library for this source, torch and CPU, compiled when missing."""
    cache = Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "orchard" / "kernels")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        source + torch.__version__.encode() + sys.version.encode() + " ".join(_compile_command(SOURCE, cache)).encode()
    ).hexdigest()[:16]
    library = cache / f"forward_tokens-{key}.so"
    if library.is_file():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        partial = Path(scratch) / library.name
        result = subprocess.run(
            _compile_command(SOURCE, partial), capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS
        )
        if result.returncode != 0:
            raise RuntimeError(f"the compiler exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    return library
