"""Complex arithmetic for Triton kernels, and how physlm's kernels are launched.

Triton has no complex type: a complex tensor enters a kernel as its float view
(torch.view_as_real, re and im side by side, so strides count floats) and every complex number
is a pair (re, im) of blocks in the precision of the input, float32 or float64. The kernels
(physlm/bk_triton.py, physlm/scan_triton.py) run one sequence per thread: `sequences` gives a
program its BLOCK of them, and a sequence is one lane of every block.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

# Sequences per program: one per thread of one warp. The kernels are latency-bound (a chain of
# dependent steps per thread), so small programs spread over more multiprocessors.
BLOCK = 32
# Every launch. Fused multiply-adds (one rounding where there would be two) are Triton 3.9's
# default, which 3.10 turns off: asked for explicitly, they stay, and 3.9 does not warn.
LAUNCH = {"BLOCK": BLOCK, "num_warps": 1, "enable_fp_fusion": True}


@triton.jit
def mul(ar, ai, br, bi):
    """(ar + i ai)(br + i bi)."""
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def div(x, y):
    """x / y with IEEE rounding: Triton's float32 `/` is div.full.f32 (2 ulp) on NVIDIA GPUs;
    its float64 `/` is IEEE already (and fdiv(ieee_rounding=True) exists for float32 only)."""
    if x.dtype == tl.float32:
        return tl.fdiv(x, y, ieee_rounding=True)
    else:
        return x / y


@triton.jit
def reciprocal(xr, xi):
    """1 / x, scaled by s = max(|Re x|, |Im x|) so that |x|^2 cannot overflow (as Smith's
    division, which PyTorch's complex division follows)."""
    s = tl.maximum(tl.abs(xr), tl.abs(xi))
    ur = div(xr, s)
    ui = div(xi, s)
    d = ur * xr + ui * xi  # |x|^2 / s
    return div(ur, d), -div(ui, d)


@triton.jit
def load(ptr, mask):
    """The complex number at ptr (re) and ptr + 1 (im); 0 where masked."""
    return tl.load(ptr, mask, other=0.0), tl.load(ptr + 1, mask, other=0.0)


@triton.jit
def store(ptr, re, im, mask):
    tl.store(ptr, re, mask)
    tl.store(ptr + 1, im, mask)


@triton.jit
def live_at(live, site, end):
    """The lanes of `live` where 0 <= site < end, else none. (tl.where rather than `&`: Triton
    3.9's interpreter turns `block mask & scalar comparison` into an int32 mask.)"""
    return tl.where(site >= 0, tl.where(site < end, live, False), False)


@triton.jit
def sequences(m_count, BLOCK: tl.constexpr):
    """This program's sequence indices (int64: no overflow in offsets) and which exist."""
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return m.to(tl.int64), m < m_count


def grid(m: int) -> tuple[int]:
    """Programs for m sequences."""
    return (triton.cdiv(m, BLOCK),)


def on_device(x: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it x's (DDP with cuda:N devices)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def pairs(x: Tensor) -> tuple[Tensor, ...]:
    """A complex tensor's float view, then its strides in floats (the last, 1, left out)."""
    view = torch.view_as_real(x)
    return (view, *view.stride()[:-1])
