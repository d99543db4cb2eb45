"""smoe's own CPU kernels (csrc/gemv_bf16.cpp): bf16 matrix-vector products with AVX512-BF16.

Built on first use with the C++ compiler torch.compile already needs (about 10 s, once per source and
torch version, kept beside the AOT steps in $SMOE_CACHE/native), then loaded as the torch ops
smoe_native::gemv and smoe_native::expert_gemv, which torch.compile and AOTInductor call like any op.
Used for bf16 decode on the CPU (smoe.kernels.linear, the compiled step's single-row linears and its MoE).
Where the CPU lacks AVX512-BF16, no compiler works, or SMOE_NATIVE=0, `available()` is False (a failed
build warns once) and callers keep their torch code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger("smoe.kernels")

SOURCE = Path(__file__).with_name("csrc") / "gemv_bf16.cpp"
ISA_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
_state: dict[str, object] = {"loaded": None}  # None: not tried yet; then True or False


def cpu_has_avx512_bf16() -> bool:
    """Whether this (Linux, x86) CPU executes AVX512-BF16 instructions, from /proc/cpuinfo's flags."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    except OSError:
        pass
    return False


def _build_command(out: Path) -> list[str]:
    from torch.utils import cpp_extension
    cxx = os.environ.get("CXX", "g++")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = [arg for p in cpp_extension.library_paths() for arg in (f"-L{p}", f"-Wl,-rpath,{p}")]
    return [cxx, "-O3", "-shared", "-fPIC", "-std=c++20", "-fopenmp", *ISA_FLAGS,
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *includes, str(SOURCE),
            "-o", str(out), *libdirs, "-lc10", "-ltorch_cpu", "-ltorch", "-lgomp"]


def cache_root() -> Path:
    """Where smoe keeps what it builds (AOT decode steps, these kernels): $SMOE_CACHE, else ~/.cache/smoe
    (or $XDG_CACHE_HOME/smoe)."""
    base = os.environ.get("SMOE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smoe"
    return Path(base)


def library_path() -> Path:
    """Where the built library is kept: named by the hash of its source, build command and torch version."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join([torch.__version__, *ISA_FLAGS]).encode())
    return cache_root() / "native" / f"gemv_bf16-{h.hexdigest()[:16]}.so"


def _build(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.so")
    log.info("building smoe's bf16 CPU kernels (once) into %s", path.parent)
    run = subprocess.run(_build_command(tmp), capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{run.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: a concurrent or killed build never leaves a partial library


def available() -> bool:
    """Whether the smoe_native ops are loaded (building them on the first call); False, and the torch
    code is used, on CPUs without AVX512-BF16, with SMOE_NATIVE=0, or if the build fails (warned once)."""
    if _state["loaded"] is None:
        _state["loaded"] = False
        if os.environ.get("SMOE_NATIVE", "1") != "0" and cpu_has_avx512_bf16():
            try:
                path = library_path()
                if not path.exists():
                    _build(path)
                torch.ops.load_library(str(path))
                _register_fakes()
                _state["loaded"] = True
            except Exception as err:  # no compiler, no headers, a full disk: keep the torch code
                warnings.warn(f"smoe's bf16 CPU kernels are unavailable ({type(err).__name__}: {str(err)[:500]}); "
                              f"using torch's code", stacklevel=2)
    return bool(_state["loaded"])


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block callers use torch's code, as with SMOE_NATIVE=0 (for side-by-side benchmarks)."""
    before = _state["loaded"]
    _state["loaded"] = False
    try:
        yield
    finally:
        _state["loaded"] = before


def used_for(dtype: torch.dtype) -> bool:
    """Whether models of this dtype run the native kernels (loading them now): call before torch.compile."""
    return dtype == torch.bfloat16 and available()


def _register_fakes() -> None:
    """Output shapes for torch.compile and torch.export (the ops themselves are C++)."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("smoe_native::gemv")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("smoe_native::expert_gemv")
    def _(x, w, experts):
        return x.new_empty(experts.shape[0], experts.shape[1], w.shape[1], dtype=torch.float32)

    _register_fakes.done = True


def serves(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the native kernels take this product: bf16 CPU tensors, no gradient, kernels available
    (under torch.compile only if already loaded: call available() before compiling)."""
    if not (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and w.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return False
    return _state["loaded"] is True if torch.compiler.is_compiling() else available()


def gemv(x: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """x (..., I) @ w_OI.T -> (..., O) in bf16, each weight row read once for all rows of x (few rows)."""
    return torch.ops.smoe_native.gemv(x.reshape(-1, x.shape[-1]), w_OI).view(*x.shape[:-1], w_OI.shape[0])


def expert_gemv(x_NKI: torch.Tensor, w_EOI: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
    """y (N, K, O) float32: y[n, k] = w_EOI[experts_NK[n, k]] @ x_NKI[n, k] (x's K may be 1: shared)."""
    return torch.ops.smoe_native.expert_gemv(x_NKI, w_EOI, experts_NK)
