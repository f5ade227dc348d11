"""The BK core as Triton kernels: the GPU path of physlm/bk_core.py (resolvent_diagonal selects
it for CUDA tensors).

On a GPU, bk_core's PyTorch scan is launch-bound: ~100 kernels per layer forward + backward, each
a few microseconds for a few thousand numbers. Here each pass is ONE kernel: every sequence runs
its recurrence site by site in the registers of one thread, all sequences at once, complex
numbers as pairs of floats (physlm/triton_complex.py), in the precision of the input. With
a'_i = a_i - z and q_i = b_i c_i (bk_core's docstring has the derivations; q = 1 when None):

    causal forward    g_i = 1 / (a'_i - q_{i-1} g_{i-1}),             g_{-1} = 0
    causal backward   T_j = g_j^2 (q_j T_{j+1} - conj(grad_j)),        T_N = 0
                      grad a'_j = conj(T_j),  grad q_j = -conj(g_j T_{j+1})
    bidirectional     h_i = 1 / (a'_i - q_i h_{i+1}),                  h_N = 0
                      G_ii = 1 / (a'_i - q_{i-1} g_{i-1} - q_i h_{i+1})
      backward        v = -G_ii^2 conj(grad),  T_j = v_j + q_j g_j^2 T_{j+1},
                      P_i = v_i + q_{i-1} h_i^2 P_{i-1},
                      grad a' = conj(T + P - v),  grad q_j = -conj(g_j T_{j+1} + h_{j+1} P_j)

The bidirectional kernels make two sweeps, the second reading back what the first wrote (g, or P
parked in the gradient's buffer). Tensors are (M, N): M sequences (batch x channels) of N sites;
inputs may have any strides (a q broadcast over the batch has stride 0), outputs are
contiguous. The work is O(N) per sequence and so is the latency: at B = 32, N = 128 that is
128 short dependent steps per pass, where the scan launches ~100 kernels; a very long sequence
in a small batch leaves most of the GPU idle (blocks of sites with a carry between them, as the
scan has, would be the next step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from physlm.triton_complex import (
    LAUNCH,
    grid,
    live_at,
    load,
    mul,
    on_device,
    pairs,
    reciprocal,
    sequences,
    store,
)


@triton.jit
def _times_q(q, site, live, q_sn, xr, xi, HAS_Q: tl.constexpr):
    """q_site x, with q_site = 0 where `live` is false (outside 0 <= site < N - 1)."""
    if HAS_Q:
        qr, qi = load(q + site * q_sn, live)
        return mul(qr, qi, xr, xi)
    else:
        zero = tl.zeros_like(xr)
        return tl.where(live, xr, zero), tl.where(live, xi, zero)


@triton.jit
def _left_sweep(ap, q, g, live, n, ap_sn, q_sn, HAS_Q: tl.constexpr, BLOCK: tl.constexpr):
    """g_i = 1 / (a'_i - q_{i-1} g_{i-1}) for i = 0 .. n-1, written to g (contiguous rows)."""
    gr = tl.zeros([BLOCK], g.dtype.element_ty)
    gi = tl.zeros([BLOCK], g.dtype.element_ty)
    for i in range(n):
        ar, ai = load(ap + i * ap_sn, live)
        lr, li = _times_q(q, i - 1, live_at(live, i - 1, n - 1), q_sn, gr, gi, HAS_Q)
        gr, gi = reciprocal(ar - lr, ai - li)
        store(g + 2 * i, gr, gi, live)


# The kernels do not specialise on their integer arguments (sizes and strides): Triton would
# otherwise compile a variant for every value 1 and every multiple of 16 among them, that is
# for nearly every new shape; a compiled kernel serves every shape of its dtype and switches.
@triton.jit(do_not_specialize=["m_count", "n", "ap_sm", "ap_sn", "q_sm", "q_sn"])
def _causal_forward_kernel(ap, q, g, m_count, n, ap_sm, ap_sn, q_sm, q_sn,
                           HAS_Q: tl.constexpr, BLOCK: tl.constexpr):
    m, live = sequences(m_count, BLOCK)
    _left_sweep(ap + m * ap_sm, q + m * q_sm, g + m * 2 * n, live, n, ap_sn, q_sn, HAS_Q, BLOCK)


@triton.jit(do_not_specialize=["m_count", "n", "q_sm", "q_sn", "gr_sm", "gr_sn"])
def _causal_backward_kernel(g, q, grad, grad_ap, grad_q, m_count, n, q_sm, q_sn, gr_sm, gr_sn,
                            HAS_Q: tl.constexpr, GRAD_Q: tl.constexpr, BLOCK: tl.constexpr):
    m, live = sequences(m_count, BLOCK)
    g += m * 2 * n
    q += m * q_sm
    grad += m * gr_sm
    grad_ap += m * 2 * n
    grad_q += m * 2 * (n - 1)
    tr = tl.zeros([BLOCK], g.dtype.element_ty)  # T_{j+1}, 0 past the last site
    ti = tl.zeros([BLOCK], g.dtype.element_ty)
    for k in range(n):
        j = n - 1 - k
        g_r, g_i = load(g + 2 * j, live)
        dr, di = load(grad + j * gr_sn, live)
        if GRAD_Q:
            pr, pi = mul(g_r, g_i, tr, ti)
            store(grad_q + 2 * j, -pr, pi, live_at(live, j, n - 1))
        sr, si = _times_q(q, j, live_at(live, j, n - 1), q_sn, tr, ti, HAS_Q)
        g2r, g2i = mul(g_r, g_i, g_r, g_i)
        tr, ti = mul(g2r, g2i, sr - dr, si + di)
        store(grad_ap + 2 * j, tr, -ti, live)


@triton.jit(do_not_specialize=["m_count", "n", "ap_sm", "ap_sn", "q_sm", "q_sn"])
def _bidirectional_forward_kernel(ap, q, g, h, diag, m_count, n, ap_sm, ap_sn, q_sm, q_sn,
                                  HAS_Q: tl.constexpr, BLOCK: tl.constexpr):
    m, live = sequences(m_count, BLOCK)
    ap += m * ap_sm
    q += m * q_sm
    g += m * 2 * n
    h += m * 2 * n
    diag += m * 2 * n
    _left_sweep(ap, q, g, live, n, ap_sn, q_sn, HAS_Q, BLOCK)
    tl.debug_barrier()  # each thread reads back only its own g; the barrier makes that safe
    hr = tl.zeros([BLOCK], g.dtype.element_ty)  # h_{i+1}, 0 past the last site
    hi = tl.zeros([BLOCK], g.dtype.element_ty)
    for k in range(n):
        i = n - 1 - k
        ar, ai = load(ap + i * ap_sn, live)
        rr, ri = _times_q(q, i, live_at(live, i, n - 1), q_sn, hr, hi, HAS_Q)
        g_r, g_i = load(g + 2 * (i - 1), live_at(live, i - 1, n))
        lr, li = _times_q(q, i - 1, live_at(live, i - 1, n - 1), q_sn, g_r, g_i, HAS_Q)
        dr, di = reciprocal(ar - lr - rr, ai - li - ri)
        store(diag + 2 * i, dr, di, live)
        hr, hi = reciprocal(ar - rr, ai - ri)
        store(h + 2 * i, hr, hi, live)


@triton.jit
def _vee(diag, grad, j, live, gr_sn):
    """v_j = -G_jj^2 conj(grad_j)."""
    dr, di = load(diag + 2 * j, live)
    d2r, d2i = mul(dr, di, dr, di)
    ur, ui = load(grad + j * gr_sn, live)
    vr, vi = mul(d2r, d2i, ur, -ui)
    return -vr, -vi


@triton.jit(do_not_specialize=["m_count", "n", "q_sm", "q_sn", "gr_sm", "gr_sn"])
def _bidirectional_backward_kernel(g, h, diag, q, grad, grad_ap, grad_q, m_count, n, q_sm, q_sn,
                                   gr_sm, gr_sn, HAS_Q: tl.constexpr, GRAD_Q: tl.constexpr,
                                   BLOCK: tl.constexpr):
    m, live = sequences(m_count, BLOCK)
    g += m * 2 * n
    h += m * 2 * n
    diag += m * 2 * n
    q += m * q_sm
    grad += m * gr_sm
    grad_ap += m * 2 * n
    grad_q += m * 2 * (n - 1)
    # P, left to right, parked in grad_ap until the second sweep.
    pr = tl.zeros([BLOCK], g.dtype.element_ty)  # P_{i-1}, 0 before the first site
    pi = tl.zeros([BLOCK], g.dtype.element_ty)
    for i in range(n):
        vr, vi = _vee(diag, grad, i, live, gr_sn)
        h_r, h_i = load(h + 2 * i, live)
        h2r, h2i = mul(h_r, h_i, h_r, h_i)
        cr, ci = _times_q(q, i - 1, live_at(live, i - 1, n - 1), q_sn, h2r, h2i, HAS_Q)
        xr, xi = mul(cr, ci, pr, pi)
        pr, pi = vr + xr, vi + xi
        store(grad_ap + 2 * i, pr, pi, live)
    tl.debug_barrier()  # as in the forward: each thread reads back its own P
    tr = tl.zeros([BLOCK], g.dtype.element_ty)  # T_{j+1}, 0 past the last site
    ti = tl.zeros([BLOCK], g.dtype.element_ty)
    hr = tl.zeros([BLOCK], g.dtype.element_ty)  # h_{j+1}
    hi = tl.zeros([BLOCK], g.dtype.element_ty)
    for k in range(n):
        j = n - 1 - k
        vr, vi = _vee(diag, grad, j, live, gr_sn)
        g_r, g_i = load(g + 2 * j, live)
        pr, pi = load(grad_ap + 2 * j, live)
        if GRAD_Q:
            ar, ai = mul(g_r, g_i, tr, ti)
            br, bi = mul(hr, hi, pr, pi)
            store(grad_q + 2 * j, -(ar + br), ai + bi, live_at(live, j, n - 1))
        g2r, g2i = mul(g_r, g_i, g_r, g_i)
        cr, ci = _times_q(q, j, live_at(live, j, n - 1), q_sn, g2r, g2i, HAS_Q)
        xr, xi = mul(cr, ci, tr, ti)
        tr, ti = vr + xr, vi + xi
        store(grad_ap + 2 * j, tr + pr - vr, -(ti + pi - vi), live)
        hr, hi = load(h + 2 * j, live)


def _q_pairs(q: Tensor | None, ap: Tensor) -> tuple[Tensor, ...]:
    """q's float view and strides; for q = None (all ones), ap stands in, never read."""
    return (torch.view_as_real(ap), 0, 0) if q is None else pairs(q)


class Causal(torch.autograd.Function):
    """g (see bk_core._Causal) of ap (M, N) and q (M, N-1) or None, complex64 or complex128."""

    @staticmethod
    def forward(ctx, ap: Tensor, q: Tensor | None) -> Tensor:
        m, n = ap.shape
        g = torch.empty(m, n, dtype=ap.dtype, device=ap.device)
        if g.numel():
            (ap_f, ap_sm, ap_sn), (q_f, q_sm, q_sn) = pairs(ap), _q_pairs(q, ap)
            with on_device(ap):
                _causal_forward_kernel[grid(m)](ap_f, q_f, torch.view_as_real(g), m, n, ap_sm,
                                                 ap_sn, q_sm, q_sn, HAS_Q=q is not None,
                                                 **LAUNCH)
        ctx.save_for_backward(g, q)
        return g

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        g, q = ctx.saved_tensors
        m, n = g.shape
        grad_ap = torch.empty_like(g)
        want_q = ctx.needs_input_grad[1]
        grad_q = g.new_empty(m, n - 1) if want_q else None
        if g.numel():
            (q_f, q_sm, q_sn), (gr_f, gr_sm, gr_sn) = _q_pairs(q, g), pairs(grad)
            with on_device(g):
                _causal_backward_kernel[grid(m)](
                    torch.view_as_real(g), q_f, gr_f, torch.view_as_real(grad_ap),
                    torch.view_as_real(grad_q if want_q else grad_ap), m, n, q_sm, q_sn, gr_sm,
                    gr_sn, HAS_Q=q is not None, GRAD_Q=want_q, **LAUNCH)
        return grad_ap, grad_q


class Bidirectional(torch.autograd.Function):
    """G_ii (see bk_core._Bidirectional) of ap (M, N) and q (M, N-1) or None."""

    @staticmethod
    def forward(ctx, ap: Tensor, q: Tensor | None) -> Tensor:
        m, n = ap.shape
        g, h, diag = (torch.empty(m, n, dtype=ap.dtype, device=ap.device) for _ in range(3))
        if g.numel():
            (ap_f, ap_sm, ap_sn), (q_f, q_sm, q_sn) = pairs(ap), _q_pairs(q, ap)
            with on_device(ap):
                _bidirectional_forward_kernel[grid(m)](
                    ap_f, q_f, *(torch.view_as_real(x) for x in (g, h, diag)), m, n, ap_sm,
                    ap_sn, q_sm, q_sn, HAS_Q=q is not None, **LAUNCH)
        ctx.save_for_backward(g, h, diag, q)
        return diag

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        g, h, diag, q = ctx.saved_tensors
        m, n = g.shape
        grad_ap = torch.empty_like(g)
        want_q = ctx.needs_input_grad[1]
        grad_q = g.new_empty(m, n - 1) if want_q else None
        if g.numel():
            (q_f, q_sm, q_sn), (gr_f, gr_sm, gr_sn) = _q_pairs(q, g), pairs(grad)
            with on_device(g):
                _bidirectional_backward_kernel[grid(m)](
                    *(torch.view_as_real(x) for x in (g, h, diag)), q_f, gr_f,
                    torch.view_as_real(grad_ap),
                    torch.view_as_real(grad_q if want_q else grad_ap), m, n, q_sm, q_sn, gr_sm,
                    gr_sn, HAS_Q=q is not None, GRAD_Q=want_q, **LAUNCH)
        return grad_ap, grad_q


