"""BK core: the diagonal of the resolvent of a tridiagonal matrix in O(N) time and memory.

H has diagonal a and off-diagonals b (super), c (sub); write a'_i = a_i - z, q_i = b_i c_i.
The diagonal of G = (H - z)^{-1} follows from two continued fractions (1-indexed):

    g_i = 1 / (a'_i - q_{i-1} g_{i-1})     left to right, g_1 = 1 / a'_1
    h_i = 1 / (a'_i - q_i h_{i+1})         right to left, h_N = 1 / a'_N
    G_ii = 1 / (a'_i - q_{i-1} g_{i-1} - q_i h_{i+1})

g_i is the last diagonal entry of the resolvent of the leading i x i block: the causal form,
which depends on positions <= i only. Only ratios are computed, never continuants
(determinants), which overflow within a few hundred positions.

Forward, as a chunked scan: inside a chunk the recursion runs from a zero inflow, all chunks at
once. The past enters a chunk only as a self-energy e = q g_prev on its first site, and a
rank-one (Sherman-Morrison) update turns the chunk-local values g0 into the true ones,
g_j = g0_j (1 - e s_{j-1}) / (1 - e s_j), with s_j the first diagonal entry of the chunk's
local j x j resolvent. The chunk-end values obey a recursion of the same form, solved the same
way: log_CHUNK(N) levels of CHUNK sequential steps each, O(N) work in all.

Backward, exact: dg_i/da'_j = -g_j^2 prod_{j<=k<i} q_k g_{k+1}^2 (j <= i) and
dG_ii/da'_j = -G_ij G_ji, so each vector-Jacobian product is a first-order linear recurrence,
run as a chunked linear scan. A change of q_k acts like a change of a'_{k+1} by -g_k dq_k
(on the sites right of it) or of a'_k by -h_{k+1} dq_k (on the sites left of it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Sequential steps per chunk, at every level of the scan. Per-op overhead dominates at the
# model's sizes: at B=32, N=128 chunks of 12-16 measured fastest (about twice as fast as one
# loop over all 128 sites), and the extra levels of long sequences cost little.
CHUNK = 16


def _chunks(x: Tensor, k: int, value: complex) -> Tensor:
    """(M, N) -> (CHUNK, M, k), padded with `value`: entry [j, m, c] is site c * CHUNK + j.

    Each row then holds one site of every chunk of every sequence, contiguously.
    """
    x = F.pad(x, (0, k * CHUNK - x.shape[-1]), value=value)
    return x.view(x.shape[0], k, CHUNK).permute(2, 0, 1).contiguous()


def _unchunk(x: Tensor, n: int) -> Tensor:
    """Inverse of _chunks: (CHUNK, M, k) -> (M, n)."""
    return x.permute(1, 2, 0).reshape(x.shape[1], -1)[:, :n]


def _moebius_loop(ap: Tensor, q: Tensor, dim: int) -> Tensor:
    """g_i = 1 / (ap_i - q_{i-1} g_{i-1}) along `dim`, one site at a time."""
    # unbind + stack: indexing site by site costs more than the arithmetic at these sizes.
    ap_sites = ap.unbind(dim)
    g = [ap_sites[0].reciprocal()]
    for a_i, q_i in zip(ap_sites[1:], q.unbind(dim), strict=True):
        g.append(torch.addcmul(a_i, q_i, g[-1], value=-1).reciprocal_())
    return torch.stack(g, dim)


def _linear_loop(u: Tensor, d: Tensor, dim: int) -> Tensor:
    """x_i = u_i + d_{i-1} x_{i-1} along `dim`, one site at a time."""
    u_sites = u.unbind(dim)
    x = [u_sites[0]]
    for u_i, d_i in zip(u_sites[1:], d.unbind(dim), strict=True):
        x.append(torch.addcmul(u_i, d_i, x[-1]))
    return torch.stack(x, dim)


def _moebius_scan(ap: Tensor, q: Tensor) -> Tensor:
    """g_i = 1 / (ap_i - q_{i-1} g_{i-1}) along the last dim. ap: (M, N), q: (M, N-1)."""
    n = ap.shape[-1]
    if n <= CHUNK:
        return _moebius_loop(ap, q, -1)
    k = -(-n // CHUNK)
    # Padding sits after the last real site, so it cannot reach any real output.
    ap = _chunks(ap, k, 1)
    q = _chunks(q, k, 0)  # q[C-1, :, c] couples chunk c to chunk c+1
    g0 = _moebius_loop(ap, q[:-1], 0)  # every chunk from a zero inflow
    # s_j = sum_{i<=j} t_i, t_i = g0_i prod_{k<i} q_k g0_k^2: first entry of the local resolvent.
    t = g0.clone()
    t[1:] *= (q[:-1] * g0[:-1].square()).cumprod(0)
    s = t.cumsum(0)
    # True chunk-end value: rho + mu phi, where phi = 1 / (1 - e s_last) obeys
    # phi_c = 1 / (A_c - P_{c-1} phi_{c-1}), the same recursion one level up.
    mu = g0[-1] * t[-1] / s[-1]
    rho = g0[-1] - mu
    qin = q[-1, :, :-1]
    coupling = qin * s[-1, :, 1:]
    a_coarse = F.pad(1 - coupling * rho[:, :-1], (1, 0), value=1)
    phi = _moebius_scan(a_coarse, coupling * mu[:, :-1])
    # Self-energy on the first site of each chunk; none on the first chunk.
    e = F.pad(qin * torch.addcmul(rho[:, :-1], mu[:, :-1], phi[:, :-1]), (1, 0))
    d = 1 - e * s
    g = g0 / d
    g[1:] *= d[:-1]  # g_j = g0_j d_{j-1} / d_j
    return _unchunk(g, n)


def _linear_scan(u: Tensor, d: Tensor) -> Tensor:
    """x_i = u_i + d_{i-1} x_{i-1} along the last dim, x_0 = u_0. u: (M, N), d: (M, N-1)."""
    n = u.shape[-1]
    if n <= CHUNK:
        return _linear_loop(u, d, -1)
    k = -(-n // CHUNK)
    u = _chunks(u, k, 0)
    d = _chunks(d, k, 0)  # d[C-1, :, c] couples chunk c to chunk c+1
    x = _linear_loop(u, d[:-1], 0)  # every chunk from a zero inflow
    gain = d[:-1].cumprod(0)  # row j: prod_{i<=j} d_i, what reaches site j+1 of the chunk
    din = d[-1, :, :-1]
    x_end = _linear_scan(x[-1], din * gain[-1, :, 1:])
    inflow = F.pad(din * x_end[:, :-1], (1, 0))
    x[0] += inflow
    x[1:] += gain * inflow
    return _unchunk(x, n)


class _Causal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ap: Tensor, q: Tensor) -> Tensor:
        g = _moebius_scan(ap, q)
        ctx.save_for_backward(g, q)
        return g

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        g, q = ctx.saved_tensors
        # grad_a'_j = sum_{i>=j} conj(dg_i/da'_j) grad_i (the conjugate Jacobian, PyTorch's
        # convention) = S_j, with S_j = u_j + conj(q_j g_j^2) S_{j+1}: a reverse linear scan.
        u = -g.conj().square() * grad
        alpha = (q * g[:, :-1].square()).conj()
        s = _linear_scan(u.flip(-1), alpha.flip(-1)).flip(-1)
        grad_q = -g[:, :-1].conj() * s[:, 1:] if ctx.needs_input_grad[1] else None
        return s, grad_q


class _Bidirectional(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ap: Tensor, q: Tensor) -> Tensor:
        batch = ap.shape[0]
        # Left and right sweeps as one scan over twice the batch.
        gh = _moebius_scan(torch.cat([ap, ap.flip(-1)]), torch.cat([q, q.flip(-1)]))
        g, h = gh[:batch], gh[batch:].flip(-1)
        left = F.pad(q * g[:, :-1], (1, 0))
        right = F.pad(q * h[:, 1:], (0, 1))
        diag = (ap - left - right).reciprocal()
        ctx.save_for_backward(g, h, diag, q)
        return diag

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        g, h, diag, q = ctx.saved_tensors
        batch = g.shape[0]
        # -conj(G_ij G_ji) factorises through g (j < i) and h (j > i): one reverse scan S and
        # one forward scan Q, each counting the diagonal term u once.
        u = -diag.conj().square() * grad
        alpha = (q * g[:, :-1].square()).conj()
        beta = (q * h[:, 1:].square()).conj()
        sq = _linear_scan(torch.cat([u.flip(-1), u]), torch.cat([alpha.flip(-1), beta]))
        s, qs = sq[:batch].flip(-1), sq[batch:]
        grad_q = None
        if ctx.needs_input_grad[1]:
            grad_q = -g[:, :-1].conj() * s[:, 1:] - h[:, 1:].conj() * qs[:, :-1]
        return s + qs - u, grad_q


def resolvent_diagonal(
    diag: Tensor,
    z: complex = 1j,
    *,
    causal: bool = True,
    offdiag_product: Tensor | None = None,
) -> Tensor:
    """Diagonal of (H - z)^{-1} for tridiagonal H, batched over leading dims.

    diag: (..., N) diagonal a of H, float32 or float64. offdiag_product: b_i c_i, (..., N-1) or
    broadcastable, real or complex; None means all ones (H = tridiag(1, a, 1)). Returns complex
    (..., N) (complex64 for float32, complex128 for float64): causal=False gives the full
    diagonal G_ii; causal=True gives g_i, the last diagonal entry of the resolvent of the leading
    i x i block, which depends on positions <= i only.
    """
    n = diag.shape[-1]
    ap = diag - z
    if offdiag_product is None:
        batch = ap.shape[:-1]
        q = torch.ones((), dtype=ap.dtype, device=ap.device).expand(*batch, n - 1)
    else:
        q = offdiag_product.to(ap.dtype)
        batch = torch.broadcast_shapes(ap.shape[:-1], q.shape[:-1])
    m = math.prod(batch)
    ap = ap.expand(*batch, n).reshape(m, n)
    q = q.expand(*batch, n - 1).reshape(m, n - 1)
    out = (_Causal if causal else _Bidirectional).apply(ap, q)
    return out.view(*batch, n)
