"""smoe's own CPU kernels (smoe.kernels.native), bf16 and fp32: against float64, in the linears and the
compiled decode step that use them, every instruction set's build, and the fallback to torch's code when
they cannot be built."""

from __future__ import annotations

import unittest.mock

import pytest
import torch
import torch.nn.functional as F

from smoe.generation import compiled
from smoe.kernels import linear, native
from smoe.model.attention import KVCache
from tests.conftest import num_threads, tiny_model


@pytest.fixture
def native_kernel():
    """Skips where the kernel cannot load; asked for at run time, once the session's temporary SMOE_CACHE is
    set (at collection the build would go to the user's cache)."""
    if not native.available():
        pytest.skip("needs an x86-64 CPU with AVX2 or AVX512-BF16 and a C++ compiler")


needs_native = pytest.mark.usefixtures("native_kernel")
U = 2.0**-8  # bf16 unit roundoff
F32 = 2.0**-24
ROUNDING = {torch.bfloat16: U, torch.float32: F32}  # of an output in that dtype
DTYPES = [torch.bfloat16, torch.float32]


def _served() -> list[torch.dtype]:
    return [d for d in DTYPES if native.max_rows(d) > 0]


def _bound(x, w, out_rounding: float) -> torch.Tensor:
    """|computed - exact| for products summed in fp32 (each product exact), then rounded by out_rounding."""
    exact = x.double() @ w.double().t()
    mass = x.double().abs() @ w.double().abs().t()
    return exact, out_rounding * exact.abs() + x.shape[-1] * F32 * mass * (1 + out_rounding) + 1e-30


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("I", [32, 100, 256, 1000])
@pytest.mark.parametrize("O", [1, 7, 37, 300])
def test_gemv_within_the_fp32_sum_bound_and_one_rounding(M, I, O, dtype):
    # odd O and I: the streams' remainder rows and the vector loops' tails
    g = torch.Generator().manual_seed(M * 1000 + I + O)
    x, w = torch.randn(M, I, generator=g).to(dtype), torch.randn(O, I, generator=g).to(dtype)
    y = native.gemv(x, w)
    assert y.shape == (M, O) and y.dtype == dtype
    exact, bound = _bound(x, w, ROUNDING[dtype])
    assert ((y.double() - exact).abs() <= bound).all()
    # torch's product rounds the same sum once: at most one step apart
    assert ((y.double() - F.linear(x, w).double()).abs() <= 2 * bound).all()
    # a row's result does not depend on the other rows computed with it
    assert torch.equal(y[-1:], native.gemv(x[-1:], w))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_takes_strided_and_batched_rows(dtype):
    x, w = torch.randn(2, 3, 64).to(dtype), torch.randn(24, 64).to(dtype)
    assert torch.equal(native.gemv(x, w), native.gemv(x.reshape(6, 64), w).view(2, 3, 24))
    assert torch.equal(native.gemv(x[0, 0], w), native.gemv(x[0, :1], w)[0])  # one row as a vector
    xs = torch.randn(5, 128).to(dtype)[:, ::2]  # a non-contiguous view
    assert torch.equal(native.gemv(xs, w), native.gemv(xs.contiguous(), w))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_expert_gemv_equals_each_experts_product(shared, dtype):
    g = torch.Generator().manual_seed(3)
    N, K, E, O, I = 5, 2, 4, 40, 96
    w = torch.randn(E, O, I, generator=g).to(dtype)
    experts = torch.randint(0, E, (N, K), generator=g)
    x = torch.randn(N, 1 if shared else K, I, generator=g).to(dtype)
    y = native.expert_gemv(x, w, experts)
    assert y.shape == (N, K, O) and y.dtype == torch.float32
    for n in range(N):
        for k in range(K):
            xk = x[n, 0 if shared else k][None]
            exact, bound = _bound(xk, w[experts[n, k]], 0.0)
            assert ((y[n, k].double() - exact[0]).abs() <= bound[0]).all()


@needs_native
def test_bad_inputs_are_named():
    w = torch.randn(3, 8, 32).bfloat16()
    with pytest.raises(ValueError, match=r"expert index 3 out of range \[0, 3\)"):
        native.expert_gemv(torch.randn(1, 1, 32).bfloat16(), w, torch.tensor([[0, 3]]))
    with pytest.raises(RuntimeError, match="x and w must both be bfloat16 or both float32"):
        native.gemv(torch.randn(1, 32), w[0])
    with pytest.raises(RuntimeError, match=r"x \(\.\.\., I\) and w \(O, I\)"):
        native.gemv(torch.randn(1, 16).bfloat16(), w[0])
    with pytest.raises(RuntimeError, match="streams must be 1, 2, 4 or 8"):
        torch.ops.smoe_native.stream_sum(torch.ones(8), 3)


def test_amx_rate_is_none_without_the_amx_kernels(monkeypatch):
    from smoe.kernels.timing import amx_ns_per_product
    monkeypatch.setattr(native, "amx", lambda: False)
    assert amx_ns_per_product() is None  # benchmarks then print no AMX column


@needs_native
@pytest.mark.parametrize("streams", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 100, 4096 + 37])
def test_stream_sum_is_the_sum(streams, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    got = torch.ops.smoe_native.stream_sum(x, streams)
    assert got.shape == () and abs(got.item() - x.double().sum().item()) <= n * F32 * x.abs().sum().item()


@needs_native
def test_linear_takes_the_kernel_for_few_rows_only():
    for dtype in _served():
        most = native.max_rows(dtype)
        w = torch.randn(300, 64).to(dtype)
        for M in (1, 2, most):
            x = torch.randn(M, 64).to(dtype)
            # on CPUs with AMX, eager bf16 products of 3+ rows take oneDNN's AMX product instead
            amx = dtype == torch.bfloat16 and M in linear.AMX_TRANSPOSED_ROWS
            expected = torch.mm(w, x.t()).t() if amx else native.gemv(x, w)
            assert torch.equal(linear.linear(x, w), expected)
            out = torch.empty(M, 300, dtype=dtype)
            assert torch.equal(linear.mm_into(x, w, out), expected)
        x = torch.randn(most + 1, 64).to(dtype)
        with native.disabled():  # as SMOE_NATIVE=0, for side-by-side benchmarks
            assert native.max_rows(dtype) == 0
            assert torch.equal(linear.linear(x[:1], w), F.linear(x[:1], w))
            beyond = linear.linear(x, w)  # torch's path (bf16 of 8+ rows as fp32 where BF16_AS_FP32)
        assert torch.equal(linear.linear(x, w), beyond)
    assert native.available()
    # with a gradient to record, torch's code
    wg = w.float().requires_grad_()
    assert linear.linear(torch.randn(1, 64), wg).requires_grad


def _forced_logits(model, prompts: torch.Tensor, tokens: torch.Tensor, step_fn, pad: int = 0) -> torch.Tensor:
    """Logits (steps, B, V) of decode steps fed tokens (steps, B) after an eager prefill of prompts (B, T),
    so two step functions see the same inputs; the last row left-padded by `pad` columns."""
    cache = KVCache.for_model(model, prompts.shape[0], 32)
    out = []
    with torch.inference_mode():
        valid = torch.ones(prompts.shape, dtype=torch.bool)
        valid[-1, :pad] = False
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        model(prompts, pos, cache.step(pos, valid if pad else None))
        nxt = pos[:, -1:] + 1
        for t in tokens:
            step = step_fn(model, t, nxt, cache, None)
            out.append(step.logits.float())
            nxt = step.positions
    return torch.stack(out)


@needs_native
@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype,batch", [(torch.bfloat16, 1), (torch.bfloat16, 3), (torch.float32, 3)])
def test_compiled_decode_calls_the_kernel_and_matches_eager(monkeypatch, tmp_path, dtype, batch):
    # the compiled step's linears of few rows and its MoE run the native ops, in torch.compile and in the AOT
    # package alike; eager decode uses the same kernel for its few rows. bf16 activations are rounded at
    # other places than eagerly: logits within a few bf16 steps (1 measured). The batch's last prompt is
    # left-padded: its padding slots stay masked in every step
    if not native.used_for(dtype):
        pytest.skip(f"smoe's kernels do not serve {dtype} on this CPU ({native._state['isa']})")
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path))
    from torch._inductor.utils import run_and_get_code
    model = tiny_model(seed=5).to(dtype)
    g = torch.Generator().manual_seed(batch)
    prompts, tokens = torch.randint(0, 128, (batch, 5), generator=g), torch.randint(0, 128, (10, batch), generator=g)
    pad = 2 if batch > 1 else 0
    eager = _forced_logits(model, prompts, tokens, compiled.eager_step, pad)
    tol = (4 * U if dtype == torch.bfloat16 else 1e-5) * eager.abs().max().item()
    jit, aot = compiled.CompiledStep(), compiled.AOTStep(compiled.CompiledStep())
    torch._dynamo.reset()
    logits, codes = run_and_get_code(_forced_logits, model, prompts, tokens, jit, pad)
    code = "\n".join(codes)
    assert "smoe_native.gemv" in code and "smoe_native.moe_gemv" in code and jit.failed is None
    torch.testing.assert_close(logits, eager, rtol=0, atol=tol)
    torch.testing.assert_close(_forced_logits(model, prompts, tokens, aot, pad), eager, rtol=0, atol=tol)
    assert aot.failed is None and len(list(tmp_path.glob("aot/*.pt2"))) == 1


@needs_native
def test_batches_up_to_the_kernels_rows_decode_compiled():
    for dtype in DTYPES:
        if not native.used_for(dtype):  # fp32 on AVX-512: the compiled step takes batch 1 only
            assert compiled.decode_step(True, "cpu", 2, dtype) is compiled.eager_step
            continue
        most = min(compiled.NATIVE_COMPILE_MAX_BATCH, native.max_rows(dtype))
        assert compiled.decode_step(True, "cpu", most, dtype) is compiled._aot
        assert compiled.decode_step("jit", "cpu", 2, dtype) is compiled._compiled
        assert compiled.decode_step(True, "cpu", most + 1, dtype) is compiled.eager_step
        with native.disabled():
            assert compiled.decode_step(True, "cpu", 2, dtype) is compiled.eager_step


def test_unbuildable_kernels_warn_once_and_torch_code_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path))
    monkeypatch.setitem(native._state, "loaded", None)
    monkeypatch.setattr(native, "cpu_isa", lambda: "avx2")
    monkeypatch.setattr(native, "_build_command", lambda out, isa: ["false"])
    with pytest.warns(UserWarning, match="CPU kernels are unavailable"):
        assert not native.available()
    assert not native.available() and not list(tmp_path.glob("native/*"))  # tried once, nothing left behind
    assert native.max_rows(torch.float32) == native.max_rows(torch.bfloat16) == 0
    for dtype in DTYPES:
        x, w = torch.randn(2, 64).to(dtype), torch.randn(30, 64).to(dtype)
        assert torch.equal(linear.linear(x, w), F.linear(x, w))
    monkeypatch.setitem(native._state, "loaded", None)
    monkeypatch.setenv("SMOE_NATIVE", "0")
    assert not native.available()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("isa", sorted(native.ISAS))
def test_every_instruction_sets_build_compiles(tmp_path, isa):
    # on any x86-64 machine with the compiler, whichever build this CPU runs: the other one must not rot
    import platform
    import subprocess
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    try:
        run = subprocess.run(native._build_command(tmp_path / "k.so", isa), capture_output=True, text=True,
                             timeout=280)
    except FileNotFoundError:
        pytest.skip("no C++ compiler")
    assert run.returncode == 0, run.stderr[-3000:]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,skew", [(1, False), (7, False), (16, True), ("limit", False)])
def test_grouped_inference_takes_the_kernel_within_naive_error(N, skew, dtype, monkeypatch):
    # few token-slots of inference (up to native.max_rows per expert on average, or fewer where the fused fp32 op
    # takes the experts: grouped.native_moe_takes): grouped_moe is native_moe (each touched expert read once per
    # pass of its slots; skew: one expert takes all 32 slots), within the bound of the naive loop; beyond, the sorted
    # per-expert products or the fused op
    if not native.used_for(dtype):
        pytest.skip(f"smoe's kernels do not serve {dtype} on this CPU")
    from smoe.kernels import grouped as G
    from smoe.kernels.naive import naive_moe
    monkeypatch.setattr(G, "amx_serves", lambda *a: False)  # the AMX op's own tests: test_amx_moe.py
    D, H, E, K = 64, 96, 8, 2
    g = torch.Generator().manual_seed(0 if N == "limit" else N)
    w1, w3 = (torch.randn(E, H, D, generator=g).to(dtype) * 0.2 for _ in range(2))
    w2 = torch.randn(E, D, H, generator=g).to(dtype) * 0.2
    limit = native.max_rows(dtype)
    if G.f32_fused_takes(torch.empty(0, D, dtype=dtype), w1, w2, w3, torch.empty(0, K, dtype=torch.long)):
        limit = min(limit, G.NATIVE_MOE_MAX_SLOTS_FUSED)
    N = limit * E // K if N == "limit" else N
    x = torch.randn(N, D, generator=g).to(dtype)
    experts = torch.zeros(N, K, dtype=torch.long) if skew else torch.rand(N, E, generator=g).topk(K, -1).indices
    weights = torch.softmax(torch.randn(N, K, generator=g), -1).to(dtype)
    args = (x, w1, w2, w3, experts, weights)
    y = G.grouped_moe(*args)
    assert torch.equal(y, G.native_moe(*args))
    if N * K == limit * E:  # the limit; one token more and the library's products (or the fused op) run
        more = (torch.cat([x, x[:1]]), w1, w2, w3, torch.cat([experts, experts[:1]]), torch.cat([weights, weights[:1]]))
        with unittest.mock.patch.object(G, "native_moe", side_effect=AssertionError("not past the limit")):
            G.grouped_moe(*more)
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    naive_err = (naive_moe(*args).double() - ref).abs().max()
    assert (y.double() - ref).abs().max() <= 2 * naive_err + 8 * ROUNDING[dtype] * ref.abs().max()


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,H", [(1, 1), (3, 17), (40, 96), (7, 1000)])
def test_swiglu_kernels_against_float64(S, H, dtype):
    # odd H: the vector loops' tails; the forward in place too (out = a1). fp32 math rounded once per output.
    g = torch.Generator().manual_seed(S * 1000 + H)
    a1, a3, dh = (torch.randn(S, H, generator=g).mul(4).to(dtype) for _ in range(3))  # |a1| up to ~16: exp's range
    # and past exp's clamp (+-87.3 for exp(-a1)), in a vector and in a tail
    a1.view(-1)[-9:] = torch.tensor([-200.0, -90.0, -87.5, -20.0, 0.0, 20.0, 87.5, 90.0, 200.0])[-a1.numel():].to(dtype)
    w = torch.rand(S, generator=g).to(dtype)
    x, y, d, ws = (t.double() for t in (a1, a3, dh, w))
    sig = torch.sigmoid(x)
    h = x * sig * y
    tol = 8 * ROUNDING[dtype]
    out = native.swiglu(a1, a3, torch.empty_like(a1))
    assert ((out.double() - h).abs() <= tol * h.abs() + 1e-30).all()
    a1_copy = a1.clone()
    assert torch.equal(native.swiglu(a1_copy, a3, a1_copy), out)
    da1, da3, hw, dw = native.swiglu_backward(dh.clone(), a1, a3, w)
    assert dw.dtype == torch.float32 and dw.shape == (S,)
    exact = {"da1": ws[:, None] * d * y * sig * (1 + x * (1 - sig)), "da3": ws[:, None] * d * x * sig,
             "hw": ws[:, None] * h}
    # silu'(x) = sig (1 + x (1 - sig)) cancels near x = -1.28: da1's bound is relative to its terms' size
    size = {"da1": (ws[:, None] * d * y).abs() * sig * (1 + x.abs() * (1 - sig)), "da3": exact["da3"].abs(),
            "hw": exact["hw"].abs()}
    for name, got in {"da1": da1, "da3": da3, "hw": hw}.items():
        assert ((got.double() - exact[name]).abs() <= tol * size[name] + 1e-30).all(), name
    mass = (d * h).abs().sum(1)
    assert ((dw.double() - (d * h).sum(1)).abs() <= (H + 8) * F32 * mass + 1e-30).all()


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_training_with_and_without_the_swiglu_kernels(dtype, monkeypatch):
    # the one-pass kernels and torch's passes (where the kernels do not load) give the same gradients
    from smoe.kernels import grouped as G
    from tests.kernels.test_kernel_backends import make, run_with_grads
    args = make(60, 32, 48, 8, 2, seed=5, dtype=dtype)
    y0, g0 = run_with_grads(G.grouped_moe, *args)
    monkeypatch.setattr(native, "swiglu_serves", lambda *t: False)
    y1, g1 = run_with_grads(G.grouped_moe, *args)
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    assert (y0.double() - y1.double()).abs().max() <= tol * y1.double().abs().max()
    for a, b in zip(g0, g1):
        assert (a.double() - b.double()).abs().max() <= tol * b.double().abs().max() + 1e-6


@needs_native
@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 2, (torch.float32,) * 2, (torch.float32, torch.bfloat16)],
                         ids=["bf16", "fp32", "fp32-bf16w"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("counts", [[5, 0, 37, 64, 1], [0, 107, 0], [33, 40, 0, 31]])
@pytest.mark.parametrize("widths", [[48], [40, 72]])
def test_segment_mm_is_each_experts_products_summed(dtypes, threads, counts, widths):
    # per expert's run of rows, sum_i a_i @ w_i[e] against float64: each product summed in fp32 and rounded to the
    # output dtype, a second pair added to the rounded first (addmm) and rounded again; empty experts, one expert
    # with all rows (cut into pieces across the threads), widths no tile divides. fp32 a with bf16 w (the weights
    # converted per expert), the first weight a transposed view as the forward passes it: the fp32 bound
    dtype, w_dtype = dtypes
    g = torch.Generator().manual_seed(len(widths) * 100 + sum(counts))
    S, E, N = sum(counts), len(counts), 56
    a = [torch.randn(S, k, generator=g).to(dtype) for k in widths]
    w = [torch.randn(E, k, N, generator=g).div(k**0.5).to(w_dtype) for k in widths]
    if w_dtype != dtype:
        w[0] = w[0].transpose(1, 2).contiguous().transpose(1, 2)
    with num_threads(threads):
        got = native.segment_mm(a, w, counts)
    assert got.shape == (S, N) and got.dtype == dtype
    exact, mass, first = (torch.zeros(S, N, dtype=torch.float64) for _ in range(3))
    lo = 0
    for e, c in enumerate(counts):
        for i, (ai, wi) in enumerate(zip(a, w)):
            p = ai[lo:lo + c].double() @ wi[e].double()
            exact[lo:lo + c] += p
            mass[lo:lo + c] += ai[lo:lo + c].double().abs() @ wi[e].double().abs()
            if i == 0:
                first[lo:lo + c] = p.abs()
        lo += c
    u = ROUNDING[dtype]
    bound = u * (exact.abs() + (first if len(widths) > 1 else 0)) + sum(widths) * F32 * mass * (1 + u) + 1e-30
    assert ((got.double() - exact).abs() <= bound).all()


@needs_native
def test_segment_mm_names_bad_inputs():
    a, w = torch.randn(10, 32), torch.randn(2, 32, 16)
    with pytest.raises(ValueError, match="counts sum to 9"):
        native.segment_mm([a], [w], [4, 5])
    with pytest.raises(ValueError, match="negative count -1"):
        native.segment_mm([a], [w], [11, -1])
    with pytest.raises(RuntimeError, match="a_i \\(S, K_i\\) and w_i"):
        native.segment_mm([a[:, :24]], [w], [4, 6])
    with pytest.raises(RuntimeError, match="one dtype"):
        native.segment_mm([a.bfloat16()], [w], [4, 6])
    with pytest.raises(RuntimeError, match="as many a as w"):
        native.segment_mm([a, a], [w], [4, 6])
    with pytest.raises(RuntimeError, match="dense slices"):  # a bf16 weight to convert: every other row of one
        native.segment_mm([a[:, :16]], [w.bfloat16()[:, ::2]], [4, 6])


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("counts", [[5, 0, 37, 64, 1], [0, 107, 0], [33, 40, 0, 31], [0, 0]])
@pytest.mark.parametrize("O,I", [(48, 40), (56, 72)])
def test_segment_wgrad_is_each_experts_product(threads, counts, O, I):
    # per expert's run of rows a.T @ b against float64, zero for an empty expert (and for all of them with no rows); one
    # expert with all rows goes in bands of its O rows across the threads; widths no band of 16 divides. Asked for
    # bf16 (a bf16 weight's gradient), the same fp32 sums rounded once
    g = torch.Generator().manual_seed(sum(counts) + O)
    S, E = sum(counts), len(counts)
    a, b = torch.randn(S, O, generator=g), torch.randn(S, I, generator=g)
    with num_threads(threads):
        got = native.segment_wgrad(a, b, counts)
        got16 = native.segment_wgrad(a, b, counts, torch.bfloat16)
    assert got.shape == got16.shape == (E, O, I) and got.dtype == torch.float32 and got16.dtype == torch.bfloat16
    assert torch.equal(got16, got.bfloat16())
    lo = 0
    for e, c in enumerate(counts):
        exact = a[lo:lo + c].double().t() @ b[lo:lo + c].double()
        mass = a[lo:lo + c].double().abs().t() @ b[lo:lo + c].double().abs()
        assert ((got[e].double() - exact).abs() <= F32 * exact.abs() + c * F32 * mass + 1e-30).all(), e
        lo += c


@needs_native
def test_segment_wgrad_names_bad_inputs():
    a, b = torch.randn(10, 32), torch.randn(10, 16)
    with pytest.raises(ValueError, match="counts sum to 9"):
        native.segment_wgrad(a, b, [4, 5])
    with pytest.raises(ValueError, match="negative count -1"):
        native.segment_wgrad(a, b, [11, -1])
    with pytest.raises(RuntimeError, match="a \\(S, M\\) and b \\(S, N\\), float32"):
        native.segment_wgrad(a, b[:9], [4, 6])
    with pytest.raises(RuntimeError, match="float32"):
        native.segment_wgrad(a.bfloat16(), b.bfloat16(), [4, 6])
    with pytest.raises(RuntimeError, match="out dtype float32 or bfloat16, got Half"):
        native.segment_wgrad(a, b, [4, 6], torch.float16)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_backward_takes_segment_mm_and_gives_the_loops_gradients(dtype, monkeypatch):
    # The segment ops against the per-expert loops they replace (where the kernels do not load): dL/dh and dL/dx, the
    # forward's products where they are fp32 (from SEGMENT_OP_MIN_SLOTS_PER_EXPERT rows per expert) and the weight
    # gradients (where smoe's AMX kernels do not take them). fp32: the same products, equal to rounding. bf16 on a CPU
    # without bf16 products (compute_dtype float32): the ops multiply fp32 activations by the bf16 weights, converted
    # an expert at a time, and the forward stays fp32 up to its output where the loop rounds every product to bf16:
    # both within bf16's bound of the float64 computation, the op's output at least as close as the loop's
    from smoe.kernels import grouped as G
    from smoe.kernels.linear import compute_dtype
    from smoe.kernels.naive import naive_moe
    from tests.kernels.test_kernel_backends import make, run_with_grads
    args = make(70, 32, 64, 6, 2, seed=8, dtype=dtype)
    assert 70 * 2 >= G.SEGMENT_OP_MIN_SLOTS_PER_EXPERT * 6
    fp32_math = compute_dtype(args[0]) == torch.float32
    with (unittest.mock.patch.object(native, "segment_mm", wraps=native.segment_mm) as op,
          unittest.mock.patch.object(native, "segment_wgrad", wraps=native.segment_wgrad) as wgrad_op):
        y0, g0 = run_with_grads(G.grouped_moe, *args)
    forward_op = fp32_math and not G.f32_fused_takes(*args[:4], args[4], keep=True)
    assert op.call_count == 2 + (3 if forward_op else 0)
    f32_wgrad_kernel = dtype == torch.float32 and native.f32_wgrad_serves(args[0], args[0])
    assert wgrad_op.call_count == (3 if fp32_math and not f32_wgrad_kernel else 0)
    monkeypatch.setattr(native, "segment_mm_serves", lambda xs, ws: False)
    y1, g1 = run_with_grads(G.grouped_moe, *args)
    if not forward_op:
        assert torch.equal(y0, y1)
    if dtype == torch.float32:
        tol = 1e-5
        assert (y0 - y1).abs().max() <= tol * y1.abs().max()
        for a, b in zip(g0, g1):
            assert (a.double() - b.double()).abs().max() <= tol * b.double().abs().max() + 1e-6
        return
    y64, g64 = run_with_grads(naive_moe, *(t.double() for t in args[:4]), args[4], args[5].double())
    err0, err1 = ((y - y64).abs().max() for y in (y0.double(), y1.double()))
    assert err0 <= err1 + 2**-9 * y64.abs().max() and err1 <= 2**-6 * y64.abs().max()
    for a, b, ref in zip(g0, g1, g64):
        for got in (a, b):
            assert (got.double() - ref).abs().max() <= 2**-6 * ref.abs().max() + 1e-6


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_gemv_is_the_expert_products_with_swiglu_between(dtype):
    # one op for the few-token MoE: expert_gemv for w1 and w3, silu(a1) a3 w rounded to x's dtype, expert_gemv for
    # w2, the K outputs summed in fp32 and rounded once
    g = torch.Generator().manual_seed(11)
    N, K, E, D, H = 3, 2, 4, 64, 96
    x = torch.randn(N, D, generator=g).to(dtype)
    w1, w3 = (torch.randn(E, H, D, generator=g).div(8).to(dtype) for _ in range(2))
    w2 = torch.randn(E, D, H, generator=g).div(10).to(dtype)
    experts = torch.tensor([[0, 3], [2, 2], [1, 0]])
    weights = torch.softmax(torch.randn(N, K, generator=g), -1)
    y = native.moe_gemv(x, w1, w2, w3, experts, weights)
    assert y.shape == (N, D) and y.dtype == dtype
    a1, a3 = native.expert_gemv(x[:, None], w1, experts), native.expert_gemv(x[:, None], w3, experts)
    h = (F.silu(a1.double()) * a3.double() * weights[..., None].double()).to(dtype)
    ref = native.expert_gemv(h, w2, experts).double().sum(1)
    # h's fp32 value differs by a few roundings (exp, the division, the products), so its rounding to x's dtype
    # may too: up to 4 steps of h, carried through w2
    step = 4 * ROUNDING[dtype] * (w2[experts].double().abs() @ h.double().abs()[..., None]).squeeze(-1).sum(1)
    assert ((y.double() - ref).abs() <= ROUNDING[dtype] * ref.abs() + step + 1e-30).all()
    with pytest.raises(RuntimeError, match=r"moe_gemv: x \(N, D\)"):
        native.moe_gemv(x, w1, w2.transpose(1, 2), w3, experts, weights)


@needs_native
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("gate_dtype", DTYPES)
@pytest.mark.parametrize(("N", "E", "D", "k"), [(1, 8, 512, 2), (5, 8, 64, 1), (17, 7, 100, 3), (40, 4, 33, 4),
                                            (300, 8, 40, 2), (9, 16, 72, 2)])
def test_route_kernel_is_the_float64_router(N, E, D, k, x_dtype, gate_dtype):
    g = torch.Generator().manual_seed(N * 100 + E + D + k)
    x, gate = torch.randn(N, D, generator=g).to(x_dtype), (torch.randn(E, D, generator=g) / D**0.5).to(gate_dtype)
    weights, experts, logits = native.route(x, gate, k)
    assert weights.dtype == logits.dtype == torch.float32 and experts.dtype == torch.int64
    exact = x.double() @ gate.double().t()
    # fp32 sums of exact products: within D roundings of the summed magnitudes
    assert ((logits.double() - exact).abs() <= D * F32 * (x.double().abs() @ gate.double().abs().t())).all()
    top, chosen = torch.topk(exact, k)
    ranked = exact.sort(-1, descending=True).values[:, :min(k + 1, E)]
    clear = (ranked[:, :-1] - ranked[:, 1:] > 1e-4).all(-1)  # no near-ties in the top k: the same experts, in order
    assert (experts[clear] == chosen[clear]).all()
    assert torch.allclose(weights.double(), torch.softmax(logits.double().gather(1, experts), -1), atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(N), atol=1e-6)


@needs_native
def test_route_kernel_ties_nans_and_bad_inputs():
    gate = torch.eye(4)
    # equal logits: the first expert first, as the compiled router's max
    w, e, _ = native.route(torch.tensor([[1.0, 1.0, 0.0, 1.0]]), gate, 2)
    assert e.tolist() == [[0, 1]] and w.tolist() == [[0.5, 0.5]]
    _, e, _ = native.route(torch.tensor([[0.0, 0.0, 5.0, 1.0]]), gate.index_fill(0, torch.tensor([1]), float("nan")), 2)
    assert e.tolist() == [[1, 2]]  # NaN above all, as torch.topk
    with pytest.raises(RuntimeError, match=r"k must be in \[1, 4\], got 5"):
        native.route(torch.ones(1, 4), gate, 5)
    with pytest.raises(RuntimeError, match=r"gate must be a contiguous \(E, 8\)"):
        native.route(torch.ones(1, 8), gate, 2)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_layer_routes_by_the_kernel_in_inference_only(dtype, monkeypatch):
    moe = tiny_model().to(dtype).layers[0].feed_forward
    x = torch.randn(2, 3, moe.gate.weight.shape[1]).to(dtype)
    calls = []
    real = native.route
    monkeypatch.setattr(native, "route", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        out, logits = moe(x)
    assert calls  # the kernel routed the inference call
    with native.disabled(), torch.no_grad():
        ref, ref_logits = moe(x)
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}))
    calls.clear()
    moe(x)[0].sum().backward()  # autograd needs the torch router
    assert not calls and moe.gate.weight.grad is not None


@pytest.mark.timeout(300)
def test_the_avx2_build_computes_alike_where_this_cpu_runs_it(tmp_path):
    # on an AVX-512 machine the AVX2 build's code paths never run in this suite: load that build in a child process
    # and check its products, SwiGLU and router against torch
    import os
    import subprocess
    import sys
    if not {"avx2", "fma"} <= native.cpu_info()[1]:
        pytest.skip("needs an x86-64 CPU with AVX2 and FMA")
    code = """
import torch, torch.nn.functional as F
from smoe.kernels import native
native.cpu_isa = lambda: "avx2"
assert native.available() and native._state["isa"] == "avx2", native._state
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    x, w = torch.randn(3, 200, generator=g).to(dt), torch.randn(37, 200, generator=g).to(dt)
    ref = x.double() @ w.double().t()
    assert (native.gemv(x, w).double() - ref).abs().max() <= 2**-7 * ref.abs().max()
    a1, a3 = torch.randn(5, 70, generator=g).to(dt), torch.randn(5, 70, generator=g).to(dt)
    out, ref = native.swiglu(a1, a3, torch.empty_like(a1)).double(), F.silu(a1.double()) * a3.double()
    assert ((out - ref).abs() <= 2**-7 * ref.abs() + 1e-6).all()
    xg, gate = torch.randn(20, 100, generator=g).to(dt), torch.randn(8, 100, generator=g).to(dt)
    weights, experts, logits = native.route(xg, gate, 2)
    exact = xg.double() @ gate.double().t()
    assert (logits.double() - exact).abs().max() <= 1e-4 * exact.abs().max()
    assert torch.allclose(weights.double(), torch.softmax(logits.double().gather(1, experts), -1), atol=1e-6)
    a, w = torch.randn(9, 64, generator=g).to(dt), torch.randn(3, 64, 40, generator=g).to(dt)
    out, ref = native.segment_mm([a], [w], [4, 0, 5]).double(), torch.cat([a[:4].double() @ w[0].double(),
                                                                          a[4:].double() @ w[2].double()])
    assert (out - ref).abs().max() <= 2**-7 * ref.abs().max()
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280,
                         env={**os.environ, "SMOE_CACHE": str(tmp_path)})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
