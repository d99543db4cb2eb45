"""smoe.kernels.linear: every library path it picks computes x @ w.T as F.linear does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smoe.kernels import linear as L
from smoe.kernels import native


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 40, 300, 600])
@pytest.mark.parametrize("out_features", [48, 1100, 4200, 9000])  # 4200 x 64: a narrow weight oneDNN takes
def test_linear_equals_f_linear(rows, out_features):
    g = torch.Generator().manual_seed(rows * 7 + out_features)
    x = torch.randn(1, rows, 64, generator=g)
    w = torch.randn(out_features, 64, generator=g)
    ref = (x.double() @ w.double().t()).float()
    with torch.no_grad():
        y = L.linear(x, w)
    assert y.shape == (1, rows, out_features) and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)  # fp32 sums of 64 products of N(0, 1) values
    buf = torch.full((rows + 3, out_features), float("nan"))
    L.mm_into(x[0], w, buf[1: rows + 1])
    torch.testing.assert_close(buf[1: rows + 1], ref[0], rtol=1e-5, atol=1e-4)
    assert buf[0].isnan().all() and buf[rows + 1:].isnan().all()  # only its own rows written


def test_fp32_products_of_many_rows_stay_with_mkl_where_set(monkeypatch):
    # MKL_FP32_MIN_ROWS (set on CPUs with AMX): from that many rows an fp32 product takes F.linear, not oneDNN;
    # fewer rows, and other dtypes, keep the choice they had
    w = torch.randn(4200, 64)  # narrow, and large enough for oneDNN
    monkeypatch.setattr(L, "MKL_FP32_MIN_ROWS", None)
    before = {rows: L._onednn_rows(rows, w) for rows in (40, 300, 600)}
    monkeypatch.setattr(L, "MKL_FP32_MIN_ROWS", 300)
    assert L._onednn_rows(40, w) == before[40]
    assert not L._onednn_rows(300, w) and not L._onednn_rows(600, w)
    assert L._onednn_rows(600, w.bfloat16()) == before[600]
    x = torch.randn(600, 64)
    with torch.no_grad():
        assert torch.equal(L.linear(x, w), F.linear(x, w))


def test_linear_keeps_autograd_and_other_dtypes_on_f_linear():
    w = torch.randn(9000, 32, requires_grad=True)
    x = torch.randn(4, 32, requires_grad=True)
    L.linear(x, w).square().sum().backward()
    gw, gx = w.grad.clone(), x.grad.clone()
    w.grad = x.grad = None
    F.linear(x, w).square().sum().backward()
    torch.testing.assert_close(w.grad, gw)
    torch.testing.assert_close(x.grad, gx)
    xb, wb = x.detach().bfloat16(), w.detach().bfloat16()
    assert not L._fast_path_ok(xb, wb)
    with native.disabled():  # bf16 without smoe's kernels (tests/kernels/test_native.py has them)
        assert torch.equal(L.linear(xb, wb), F.linear(xb, wb))


def test_linear_module_is_an_nn_linear_without_bias():
    m = L.Linear(8, 3)
    assert isinstance(m, torch.nn.Linear) and m.bias is None and list(m.state_dict()) == ["weight"]
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.linear(x, m.weight), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [L.BF16_AS_FP32_MIN_ROWS, 40, 300])
def test_bf16_products_as_fp32_where_the_cpu_lacks_bf16_instructions(monkeypatch, rows):
    # exact bf16 products summed in fp32 and rounded once: torch's bf16 matmul computes the same, within one
    # bf16 step of the float64 product
    monkeypatch.setattr(L, "BF16_AS_FP32", True)
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 64, generator=g).bfloat16(), torch.randn(1100, 64, generator=g).bfloat16()
    with native.disabled(), torch.no_grad():
        y = L.linear(x, w)
        assert y.dtype == torch.bfloat16 and torch.equal(y, L.linear(x.float(), w.float()).bfloat16())
        out = torch.empty(rows, 1100, dtype=torch.bfloat16)
        assert torch.equal(L.mm_into(x, w, out), y)
    exact, mass = x.double() @ w.double().t(), x.double().abs() @ w.double().abs().t()
    assert ((y.double() - exact).abs() <= 2**-8 * exact.abs() + 64 * 2**-24 * mass).all()
    with native.disabled():  # fewer rows: torch's bf16 path (converting the weight would cost more)
        assert torch.equal(L.linear(x[:1], w), F.linear(x[:1], w))
    wg = w.float().requires_grad_()  # with a gradient to record, F.linear as it is
    assert L.linear(x.float(), wg).requires_grad


@pytest.mark.parametrize("rows", [L.BF16_AS_FP32_MIN_ROWS, 300])
def test_bf16_training_products_as_fp32(monkeypatch, rows):
    # with a gradient recorded, the forward and both gradient products are fp32 ones rounded once to bf16:
    # each within one bf16 step (plus fp32 summation) of the float64 product, and torch's bf16 autograd
    # (emulated here, native elsewhere) lands within two such steps of the same values
    monkeypatch.setattr(L, "BF16_AS_FP32", True)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 64, generator=g).bfloat16().requires_grad_()
    w = torch.randn(96, 64, generator=g).bfloat16().requires_grad_()
    gy = torch.randn(2, rows, 96, generator=g).bfloat16()
    with native.disabled():
        y = L.linear(x, w)
        assert y.dtype == torch.bfloat16 and y.grad_fn is not None and "Bf16ViaFp32" in type(y.grad_fn).__name__
        dx, dw = torch.autograd.grad(y, (x, w), gy)
        y_t = F.linear(x, w)
        dx_t, dw_t = torch.autograd.grad(y_t, (x, w), gy)
    X, W, G = x.detach().double().reshape(-1, 64), w.detach().double(), gy.double().reshape(-1, 96)
    for got, torch_, exact, mass in ((y, y_t, X @ W.t(), X.abs() @ W.abs().t()),
                                     (dx, dx_t, G @ W, G.abs() @ W.abs()),
                                     (dw, dw_t, G.t() @ X, G.abs().t() @ X.abs())):
        got, torch_ = got.detach().double().reshape(exact.shape), torch_.detach().double().reshape(exact.shape)
        assert ((got - exact).abs() <= 2**-8 * exact.abs() + 64 * 2**-24 * mass).all()
        assert ((got - torch_).abs() <= 2**-7 * exact.abs() + 128 * 2**-24 * mass).all()
    assert dx.dtype == dw.dtype == torch.bfloat16


def test_bf16_autocast_products_as_fp32(monkeypatch):
    # under CPU bf16 autocast, fp32 tensors go in as bf16 and the product comes out bf16, as F.linear under
    # autocast gives, with the gradient reaching the fp32 weight in fp32
    monkeypatch.setattr(L, "BF16_AS_FP32", True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 64, generator=g).requires_grad_()
    w = torch.randn(96, 64, generator=g).requires_grad_()
    with native.disabled(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = L.linear(x, w)
        y_t = F.linear(x, w)
    assert y.dtype == y_t.dtype == torch.bfloat16
    exact = x.detach().bfloat16().double() @ w.detach().bfloat16().double().t()
    assert ((y.detach().double() - exact).abs() <= 2**-8 * exact.abs() + 1e-4).all()
    assert ((y.detach().double() - y_t.detach().double()).abs() <= 2**-7 * exact.abs() + 1e-4).all()
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = torch.ones(40, 96, dtype=torch.float64).t() @ x.detach().bfloat16().double()
    assert ((w.grad.double() - ref).abs() <= 2**-7 * ref.abs() + 1e-3).all()
    monkeypatch.setattr(L, "BF16_AS_FP32", False)  # elsewhere autocast handles it, through F.linear
    with native.disabled(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(L.linear(x, w), F.linear(x, w))
