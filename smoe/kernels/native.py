"""smoe's own CPU kernels (csrc/): matrix-vector products for decode (gemv.cpp), SwiGLU's elementwise passes
(swiglu.cpp), the MoE router (route.cpp), the grouped backward's per-expert products spread over the threads
(segment.cpp) and, on CPUs with AMX, the fused bf16 MoE and its backward's weight gradients (amx_moe.cpp) and the
fused fp32 MoE of many tokens (f32_moe.cpp), for x86-64.

Built on first use with the C++ compiler torch.compile already needs (about 15 s, once per source, torch
version and instruction set, kept beside the AOT steps in $SMOE_CACHE/native), for the CPU's instruction
set: "amx" (AVX-512 with BF16 and AMX tiles: Sapphire Rapids and later), "avx512" (AVX-512 with BF16 dot
products: Zen 4) or "avx2" (AVX2 and FMA: x86-64 CPUs since 2013-2015). Loaded as torch ops
(smoe_native::gemv, expert_gemv, moe_gemv, swiglu, swiglu_backward, route, segment_mm, segment_wgrad, amx_moe,
amx_moe_keep, amx_segment_wgrad, amx_probe, f32_segment_wgrad; f32_moe and f32_moe_keep in the amx and avx2 builds),
which torch.compile and AOTInductor call like any op. Where the CPU has none of these instruction sets, no compiler
works, or SMOE_NATIVE=0, `available()` is False (a failed build warns once) and callers keep their torch code.
"""

from __future__ import annotations

import contextlib
import functools
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

CSRC = Path(__file__).with_name("csrc")
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
AVX512_NEEDS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}
# instruction set -> (the /proc/cpuinfo flags it needs, the compiler's flags, the sources), best first; "amx" is
# "avx512" plus the fused MoE of csrc/amx_moe.cpp on AMX tiles and the fp32 one of csrc/f32_moe.cpp (AVX-512, but
# measured only on the Xeon with AMX); "avx2" has the fp32 one at 8 lanes (csrc/f32_moe_avx2.cpp, measured on a Zen 3)
SOURCES = ["gemv.cpp", "swiglu.cpp", "route.cpp", "segment.cpp"]
ISAS = {"amx": (AVX512_NEEDS | {"amx_tile", "amx_bf16"}, [*AVX512_FLAGS, "-mamx-tile", "-mamx-bf16"],
                [*SOURCES, "amx_moe.cpp", "f32_moe.cpp"]),
        "avx512": (AVX512_NEEDS, AVX512_FLAGS, SOURCES),
        "avx2": ({"avx2", "fma"}, ["-mavx2", "-mfma"], [*SOURCES, "f32_moe_avx2.cpp"])}
# products of up to this many rows of x go through the kernels, by instruction set and dtype: where they
# measured faster than torch's paths (benchmarks/linear.py, 1 thread, weights from memory). avx512, Zen 4:
# bf16 1.6-2.9x at 1-2 rows, 0.87-1.74x at 8, alike at 16-32 (fp32 not measured there: torch's code).
# avx2, Zen 3: fp32 1.0-1.7x at 1-8 rows, 1.0-1.3x at 16, 0.9-1.1x at 32; bf16 (torch's bf16 products
# without AVX512-BF16 are slow at every size) 1.1-5x at 1-8 rows, 4-7x at 16-256. amx (the avx512 build), an Intel
# Xeon with AMX: fp32 0.8-1.2x at 1-8 rows one product at a time, but decode at batch 8 (the compiled step with
# the kernels against without) 967 vs 566 tok/s for the small model, 36.3 vs 27.2 for the large one, batch 1 alike;
# bf16 1.4-1.9x at 1 row, 1.0-1.5x at 2 but 0.65-0.85x at 4-8 against oneDNN's AMX products, which eager
# products of 3+ rows take (smoe.kernels.linear.AMX_TRANSPOSED_ROWS); the compiled decode step up to batch 8
# keeps the kernels (small model, batch 8: 2297 tok/s against 1270 eager)
MAX_ROWS = {"amx": {torch.bfloat16: 8, torch.float32: 8}, "avx512": {torch.bfloat16: 8},
            "avx2": {torch.float32: 16, torch.bfloat16: 64}}
_state: dict[str, object] = {"loaded": None, "isa": None}  # loaded None: not tried yet; then True or False


@functools.cache
def cpu_info() -> tuple[str | None, frozenset[str]]:
    """(vendor_id, flags) of this Linux x86-64 CPU from /proc/cpuinfo; (None, empty) elsewhere."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, frozenset()
    vendor, flags = None, frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and vendor is None:
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def cpu_isa() -> str | None:
    """The best instruction set of ISAS this (Linux, x86-64) CPU executes, from /proc/cpuinfo's flags."""
    flags = cpu_info()[1]
    return next((isa for isa, (needs, _, _) in ISAS.items() if needs <= flags), None)


def _build_command(out: Path, isa: str) -> list[str]:
    from torch.utils import cpp_extension
    cxx = os.environ.get("CXX", "g++")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = [arg for p in cpp_extension.library_paths() for arg in (f"-L{p}", f"-Wl,-rpath,{p}")]
    return [cxx, "-O3", "-shared", "-fPIC", "-std=c++20", "-fopenmp", *ISAS[isa][1],
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *includes,
            *(str(CSRC / name) for name in ISAS[isa][2]),
            "-o", str(out), *libdirs, "-lc10", "-ltorch_cpu", "-ltorch", "-lgomp"]


def cache_root() -> Path:
    """Where smoe keeps what it builds (AOT decode steps, these kernels): $SMOE_CACHE, else ~/.cache/smoe
    (or $XDG_CACHE_HOME/smoe)."""
    base = os.environ.get("SMOE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smoe"
    return Path(base)


def library_path(isa: str) -> Path:
    """Where the built library is kept: named by the hash of its sources and headers, build flags and torch
    version."""
    files = [CSRC / name for name in ISAS[isa][2]] + sorted(CSRC.glob("*.h"))
    h = hashlib.sha256(b"".join(f.read_bytes() for f in files))
    h.update(" ".join([torch.__version__, *ISAS[isa][1]]).encode())
    return cache_root() / "native" / f"gemv-{isa}-{h.hexdigest()[:16]}.so"


def _build(path: Path, isa: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.so")
    log.info("building smoe's CPU kernels for %s (once) into %s", isa, path.parent)
    run = subprocess.run(_build_command(tmp, isa), capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {', '.join(ISAS[isa][2])} failed:\n{run.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: a concurrent or killed build never leaves a partial library


def _candidates() -> list[str]:
    """The instruction sets to try, best first: cpu_isa() and the lesser ones this CPU also runs."""
    first, names = cpu_isa(), list(ISAS)
    if first is None:
        return []
    return [isa for isa in names[names.index(first):] if isa == first or ISAS[isa][0] <= cpu_info()[1]]


def available() -> bool:
    """Whether the smoe_native ops are loaded (building them on the first call); False, and the torch
    code is used, on CPUs with none of ISAS, with SMOE_NATIVE=0, or if no build works (warned once). A build
    that fails falls back to the next instruction set (amx -> avx512)."""
    if _state["loaded"] is None:
        _state["loaded"] = False
        errors = []
        for isa in _candidates() if os.environ.get("SMOE_NATIVE", "1") != "0" else []:
            try:
                path = library_path(isa)
                if not path.exists():
                    _build(path, isa)
                torch.ops.load_library(str(path))
                _register_fakes()
                _state["loaded"], _state["isa"] = True, isa
                break
            except Exception as err:  # no compiler, no headers, a full disk: the next build, or torch's code
                errors.append(f"{isa}: {type(err).__name__}: {str(err)[:500]}")
        if errors and not _state["loaded"]:
            warnings.warn(f"smoe's CPU kernels are unavailable ({'; '.join(errors)}); using torch's code", stacklevel=2)
        elif errors:
            log.warning("smoe's CPU kernels: built for %s instead (%s)", _state["isa"], "; ".join(errors))
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


def _loaded() -> bool:
    # under torch.compile only what is already loaded (tracing cannot build): call available() before compiling
    return _state["loaded"] is True if torch.compiler.is_compiling() else available()


def max_rows(dtype: torch.dtype) -> int:
    """Rows of x up to which products of this dtype go through the kernels (MAX_ROWS); 0 where they don't."""
    return MAX_ROWS[_state["isa"]].get(dtype, 0) if _loaded() else 0


def used_for(dtype: torch.dtype) -> bool:
    """Whether models of this dtype run the native kernels (loading them now): call before torch.compile."""
    return max_rows(dtype) > 0


def _register_fakes() -> None:
    """Output shapes for torch.compile and torch.export (the ops themselves are C++)."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("smoe_native::gemv")
    def _(x, w):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("smoe_native::expert_gemv")
    def _(x, w, experts):
        return x.new_empty(experts.shape[0], experts.shape[1], w.shape[1], dtype=torch.float32)

    @torch.library.register_fake("smoe_native::moe_gemv")
    def _(x, w1, w2, w3, experts, weights):
        return x.new_empty(x.shape)

    _register_fakes.done = True


def serves(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the native kernels take a product of x and w (any number of rows): CPU tensors of one dtype
    that max_rows serves, no gradient, kernels available."""
    return (w.dtype == x.dtype and x.device.type == "cpu" and w.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and max_rows(x.dtype) > 0)


def amx() -> bool:
    """Whether smoe's fused MoE on AMX tiles (csrc/amx_moe.cpp, `amx_moe`) is loaded: CPUs with AMX-BF16."""
    return _loaded() and _state["isa"] == "amx"


def f32_fused() -> bool:
    """Whether smoe's fused fp32 MoE (f32_moe, f32_moe_keep) is loaded: the "amx" build's (csrc/f32_moe.cpp, AVX-512)
    or the "avx2" build's (csrc/f32_moe_avx2.cpp)."""
    return _loaded() and _state["isa"] in ("amx", "avx2")


def amx_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
            experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """The bf16 MoE experts (N, D) in one op on AMX tiles: weights read in place, the gather, SwiGLU, router
    weight and scatter-add fused into the two products (D and H multiples of 32; inference only)."""
    return torch.ops.smoe_native.amx_moe(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)


def amx_moe_keep(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                 experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """amx_moe for training's forward: (out, a1_SH, a3_SH), the pre-activations x w1^T and x w3^T in bf16, one
    row per token-slot in the order of a stable sort of the slots by expert (grouped.sort_by_expert's)."""
    return torch.ops.smoe_native.amx_moe_keep(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)


def amx_segment_wgrad(a_SM: torch.Tensor, b_SN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(E, M, N) bf16: a[run].T @ b[run] for each expert's run of counts[e] rows in order, zero for an empty one (the
    grouped backward's weight gradients, on AMX tiles; bf16 a and b, M and N multiples of 32)."""
    return torch.ops.smoe_native.amx_segment_wgrad(a_SM, b_SN, counts)


def amx_probe_ns(products: int = 1 << 16) -> float:
    """Nanoseconds per AMX tile product (16 x 16 x 32, bf16 -> fp32) now, over that many on tiles in L1: where the
    tile unit is shared (two VMs' vCPUs on one core) it runs 3-4x slower at times, which benchmarks report."""
    return torch.ops.smoe_native.amx_probe(products)


def f32_moe_serves(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                   dtype: torch.dtype | None = None) -> bool:
    """Whether smoe's fused fp32 MoE (csrc/f32_moe.cpp, `f32_moe`) takes these tensors, x converted to dtype (default
    its own) first: float32 x and weights (the "avx2" build: or bfloat16 weights) on the CPU, dim a multiple of 16,
    outside torch.compile, where the "amx" or "avx2" build loaded (the caller checks grad)."""
    return ((dtype or x_ND.dtype) == torch.float32 and w1_EHD.dtype == w2_EDH.dtype == w3_EHD.dtype
            and w1_EHD.dtype in (torch.float32, torch.bfloat16) and x_ND.device.type == "cpu"
            and w1_EHD.device.type == "cpu" and x_ND.shape[-1] % 16 == 0 and not torch.compiler.is_compiling()
            and f32_fused() and (w1_EHD.dtype == torch.float32 or _state["isa"] == "avx2"))


def f32_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
            experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """The fp32 MoE experts (N, D) in one op: each expert's tokens as vector lanes, its weights read in place (bf16
    ones, in the "avx2" build, converted a panel at a time), the gather, SwiGLU, router weight and scatter-add fused
    into the two products (dim a multiple of 16; inference)."""
    return torch.ops.smoe_native.f32_moe(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)


def f32_moe_keep(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                 experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f32_moe for training's forward: (out, a1_SH, a3_SH), the pre-activations x w1^T and x w3^T, one row per
    token-slot in the order of a stable sort of the slots by expert (grouped.sort_by_expert's)."""
    return torch.ops.smoe_native.f32_moe_keep(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)


def f32_wgrad_serves(a_SM: torch.Tensor, b_SN: torch.Tensor) -> bool:
    """Whether f32_segment_wgrad takes these: float32 CPU tensors, b's width a multiple of 16, outside torch.compile,
    where the "amx" build loaded."""
    return (a_SM.dtype == b_SN.dtype == torch.float32 and a_SM.is_cpu and b_SN.is_cpu and b_SN.shape[1] % 16 == 0
            and not torch.compiler.is_compiling() and amx())


def f32_segment_wgrad(a_SM: torch.Tensor, b_SN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(E, M, N) float32: a[run].T @ b[run] for each expert's run of counts[e] rows in order, zero for an empty one (the
    grouped backward's weight gradients; runs of up to 256 rows by smoe's kernel, longer ones by the library)."""
    return torch.ops.smoe_native.f32_segment_wgrad(a_SM, b_SN, counts)


def moe_gemv(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
             experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """The chosen experts of a few tokens, weighted and summed, in one op: (N, D) in x's dtype."""
    return torch.ops.smoe_native.moe_gemv(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)


def swiglu_serves(*tensors: torch.Tensor) -> bool:
    """Whether the one-pass SwiGLU kernels (csrc/swiglu.cpp) take these tensors: contiguous CPU float32 or bfloat16
    tensors of one dtype, outside torch.compile, where the kernels load."""
    t0 = tensors[0]
    return (t0.dtype in (torch.float32, torch.bfloat16) and not torch.compiler.is_compiling() and _loaded()
            and all(t.device.type == "cpu" and t.dtype == t0.dtype and t.is_contiguous() for t in tensors))


def swiglu(a1_SH: torch.Tensor, a3_SH: torch.Tensor, out_SH: torch.Tensor) -> torch.Tensor:
    """out = silu(a1) * a3 in one pass (out may be a1 itself); fp32 math, rounded once."""
    torch.ops.smoe_native.swiglu(a1_SH, a3_SH, out_SH)
    return out_SH


def swiglu_backward(dh_SH: torch.Tensor, a1_SH: torch.Tensor, a3_SH: torch.Tensor, w_S: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For outputs w[s] * silu(a1) * a3 and dh = dL/d(w h), in one pass: (da1, written over dh; da3; w h; dL/dw as
    float32)."""
    da3_SH, hw_SH = torch.empty_like(a1_SH), torch.empty_like(a1_SH)
    dw_S = torch.ops.smoe_native.swiglu_backward(dh_SH, a1_SH, a3_SH, w_S, da3_SH, hw_SH)
    return dh_SH, da3_SH, hw_SH, dw_S


def segment_mm_serves(xs: list[torch.Tensor], ws: list[torch.Tensor]) -> bool:
    """Whether the experts-over-threads segment products (csrc/segment.cpp: segment_mm, segment_wgrad) take these: CPU
    tensors of one dtype (or float32 xs with bfloat16 ws, converted an expert at a time), outside torch.compile, where
    the kernels load."""
    dt = xs[0].dtype
    return (not torch.compiler.is_compiling() and _loaded()
            and all(t.device.type == "cpu" and t.dtype == dt for t in xs)
            and all(w.device.type == "cpu" and (w.dtype == dt or (dt, w.dtype) == (torch.float32, torch.bfloat16))
                    for w in ws))


def segment_mm(xs_SI: list[torch.Tensor], ws_EIO: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """(S, O) in xs' dtype: over each expert's run of counts[e] rows, the sum over i of xs[i][run] @ ws[i][e], one
    library product per expert and pair, the experts (or pieces of a large one) spread over the threads. Float32 xs
    take bfloat16 ws too: each expert's weight is converted to float32 on the thread that multiplies it."""
    return torch.ops.smoe_native.segment_mm(xs_SI, ws_EIO, counts)


def segment_wgrad(a_SO: torch.Tensor, b_SI: torch.Tensor, counts: list[int],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(E, O, I) in dtype (float32 or bfloat16, summed in float32 and rounded once) from float32 a and b: out[e] =
    a[run].T @ b[run] over expert e's run of counts[e] rows (zero where empty), one library product per expert (or
    band of its O rows) on one thread, the experts spread over the threads."""
    return torch.ops.smoe_native.segment_wgrad(a_SO, b_SI, counts, dtype)


def route_serves(x_ND: torch.Tensor, gate_ED: torch.Tensor) -> bool:
    """Whether the one-op router (csrc/route.cpp) takes these: contiguous 2-d float32 or bfloat16 CPU tensors,
    outside torch.compile, where the kernels load (the caller checks grad)."""
    return (x_ND.device.type == gate_ED.device.type == "cpu" and x_ND.dim() == gate_ED.dim() == 2
            and {x_ND.dtype, gate_ED.dtype} <= {torch.float32, torch.bfloat16} and x_ND.is_contiguous()
            and gate_ED.is_contiguous() and not torch.compiler.is_compiling() and _loaded())


def route(x_ND: torch.Tensor, gate_ED: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights_NK fp32, experts_NK, logits_NE fp32) as smoe.model.transformer.route's torch code, in one op."""
    return torch.ops.smoe_native.route(x_ND, gate_ED, top_k)


def gemv(x: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """x (..., I) @ w_OI.T -> (..., O) in x's dtype, each weight row read once for all rows of x (few rows)."""
    return torch.ops.smoe_native.gemv(x, w_OI)


def expert_gemv(x_NKI: torch.Tensor, w_EOI: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
    """y (N, K, O) float32: y[n, k] = w_EOI[experts_NK[n, k]] @ x_NKI[n, k] (x's K may be 1: shared)."""
    return torch.ops.smoe_native.expert_gemv(x_NKI, w_EOI, experts_NK)
