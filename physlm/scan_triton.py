"""A complex first-order linear recurrence (scan) as a Triton kernel, for the GPU:

    y_i = a_i y_{i-1} + b_i   (or, reversed, y_i = a_i y_{i+1} + b_i),   y = 0 before the first site

over many sequences at once, each site by site in one thread (as physlm/bk_triton.py), one kernel
per pass, differentiable in a and b. Issue 23's feature recurrence y_i = u_i - g_{i-1} y_{i-1},
the causal resolvent's lower factor applied to D channels, is linear_scan(-g.roll(1), u).

Layout: any shape and a `dim`. The broadcast tensors are viewed as (outer, N, inner), and
sequence m = o * inner + c is the column (o, :, c): consecutive threads read neighbouring
channels when the channels are innermost, e.g. features (B, N, C) scanned along dim 1 (reads
coalesced); (B, C, N) along -1 works too (inner = 1, strided reads). b is made contiguous in
that view; a is read through its strides, so a decay (B, N, 1) shared by C channels is never
copied. No CPU path here: on a CPU tensor the kernel needs TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import math

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
    sequences,
    store,
)


@triton.jit(do_not_specialize=["m_count", "n", "inner", "a_so", "a_sn", "a_si"])
def _linear_scan_kernel(a, b, x, y, ga, m_count, n, inner, a_so, a_sn, a_si,
                        REVERSE: tl.constexpr, ADJOINT: tl.constexpr, BLOCK: tl.constexpr):
    """x_i = c_i x_p + b_i over the sites in the order of the scan (REVERSE: from the last), p the
    site before i in that order, x_p = 0 before the first. Forward: c_i = a_i. ADJOINT, the
    vector-Jacobian product of the scan in the other direction (b the gradient of its output y):
    c_i = conj(a_p), and ga_i = conj(y_s) x_i with s the site after i in this order (0 past the
    end). b, x, y, ga: contiguous (outer, n, inner), so a sequence's sites are 2 * inner floats
    apart; a: strides (a_so, a_sn, a_si), in floats. y and ga are not touched unless ADJOINT."""
    m, live = sequences(m_count, BLOCK)
    o = m // inner
    c = m % inner
    first = 2 * (o * n * inner + c)  # site 0 of sequence (o, c) in the contiguous layout
    a += o * a_so + c * a_si
    b += first
    x += first
    y += first
    ga += first
    xr = tl.zeros([BLOCK], x.dtype.element_ty)  # x_p
    xi = tl.zeros([BLOCK], x.dtype.element_ty)
    cr = tl.zeros([BLOCK], x.dtype.element_ty)  # ADJOINT: a_p
    ci = tl.zeros([BLOCK], x.dtype.element_ty)
    for k in range(n):
        i = n - 1 - k if REVERSE else k
        ar, ai = load(a + i * a_sn, live)
        br, bi = load(b + 2 * inner * i, live)
        if ADJOINT:
            tr, ti = mul(cr, -ci, xr, xi)
            cr, ci = ar, ai
        else:
            tr, ti = mul(ar, ai, xr, xi)
        xr, xi = tr + br, ti + bi
        store(x + 2 * inner * i, xr, xi, live)
        if ADJOINT:
            s = i - 1 if REVERSE else i + 1
            yr, yi = load(y + 2 * inner * s, live_at(live, s, n))
            gr, gi = mul(yr, -yi, xr, xi)
            store(ga + 2 * inner * i, gr, gi, live)


def _scan(a: Tensor, b: Tensor, reverse: bool, y: Tensor | None = None
          ) -> tuple[Tensor, Tensor | None]:
    """Launch the scan kernel on a (any strides) and b (contiguous), both (outer, n, inner); with
    y (the forward's output), the adjoint: returns (grad b, grad a) for grad y = b."""
    outer, n, inner = b.shape
    x = torch.empty_like(b)
    ga = None if y is None else torch.empty_like(b)
    if x.numel():
        # without y, x stands in for the adjoint's y and ga, which the kernel then never touches
        y_f, ga_f = (torch.view_as_real(x if t is None else t) for t in (y, ga))
        with on_device(b):
            _linear_scan_kernel[grid(outer * inner)](
                pairs(a)[0], torch.view_as_real(b), torch.view_as_real(x), y_f, ga_f,
                outer * inner, n, inner, *pairs(a)[1:], REVERSE=reverse, ADJOINT=y is not None,
                **LAUNCH)
    return x, ga


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, reverse: bool) -> Tensor:
        y, _ = _scan(a, b, reverse)
        ctx.save_for_backward(a, y)
        ctx.reverse = reverse
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        # y = L b with L lower (upper when reversed) bidiagonal-inverse: grad b = L^H grad, the
        # same scan run the other way with conj(a) one site shifted; grad a_i = conj(y_p) grad b_i.
        a, y = ctx.saved_tensors
        grad_b, grad_a = _scan(a, grad.contiguous(), not ctx.reverse, y)
        return grad_a, grad_b, None


def linear_scan(a: Tensor, b: Tensor, *, dim: int = -1, reverse: bool = False) -> Tensor:
    """y_i = a_i y_{i-1} + b_i along `dim` (reverse: y_i = a_i y_{i+1} + b_i), y = 0 before the
    first site, so the first site's a (the last's when reversed) is never used: a = -g.roll(1)
    gives issue 23's y_i = u_i - g_{i-1} y_{i-1}. Differentiable in a and b.

    a, b: broadcastable, complex (real ones are promoted), on CUDA (or on the CPU under
    TRITON_INTERPRET=1). One kernel per pass; the layout is in the module docstring.
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.complex64)
    shape = torch.broadcast_shapes(a.shape, b.shape)
    dim %= len(shape)
    view = (math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]))  # (outer, N, inner)
    a = a.to(dtype).expand(shape).reshape(view)
    b = b.to(dtype).expand(shape).reshape(view).contiguous()
    return _LinearScan.apply(a, b, reverse).view(shape)
