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
dG_ii/da'_j = -G_ij G_ji, so each vector-Jacobian product is a first-order linear recurrence
x_i = u_i + d_i x_{i+1} (right to left; the left-to-right one of the full diagonal runs on
flipped sequences), run as a parallel scan: recursive doubling inside blocks of BLOCK sites,
log2(BLOCK) steps over the whole batch instead of N sequential ones, and one carry between
blocks; O(N log BLOCK) work. A change of q_k acts like a change of a'_{k+1} by -g_k dq_k (on
the sites right of it) or of a'_k by -h_{k+1} dq_k (on the sites left of it).

On a GPU these scans are launch-bound (~100 small kernels per layer forward + backward), so
`resolvent_diagonal` runs CUDA tensors through physlm/bk_triton.py instead: the same recurrences
as one Triton kernel per pass. The scans here stay the CPU path and the reference.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Every operation at the model's sizes (B=32, N=128: a few thousand complex numbers) costs
# its dispatch, not its arithmetic, so both scans are built to issue few operations.
# Moebius forward: sequential steps per chunk, at every level. At B=32, N=128 chunks of
# 12-16 measured fastest, about twice as fast as one loop over all 128 sites.
CHUNK = 16
# Linear scans (the backward): sites per block of the doubling scan, log2(BLOCK) = 7 steps
# of 2-3 operations each, against 16 + 8 sequential steps plus the bookkeeping of a chunked
# scan; longer sequences add one carry between blocks, so the work per site stays
# O(log BLOCK) at every N.
BLOCK = 128


def _times(q: Tensor | None, x: Tensor) -> Tensor:
    """q * x, where q = None stands for all ones (H = tridiag(1, a, 1), the model's case)."""
    return x if q is None else q * x


def _chunks(x: Tensor, k: int, value: complex) -> Tensor:
    """(M, N) -> (CHUNK, M, k), padded with `value`: entry [j, m, c] is site c * CHUNK + j.

    Each row then holds one site of every chunk of every sequence, contiguously.
    """
    if x.shape[-1] != k * CHUNK:
        x = F.pad(x, (0, k * CHUNK - x.shape[-1]), value=value)
    return x.view(x.shape[0], k, CHUNK).permute(2, 0, 1).contiguous()


def _unchunk(x: Tensor, n: int) -> Tensor:
    """Inverse of _chunks: (CHUNK, M, k) -> (M, n)."""
    return x.permute(1, 2, 0).reshape(x.shape[1], -1)[:, :n]


def _moebius_loop(ap: Tensor, q: Tensor | None, dim: int) -> Tensor:
    """g_i = 1 / (ap_i - q_{i-1} g_{i-1}) along `dim`, one site at a time."""
    # In place, site by site, on views of one copy: at these sizes a fresh tensor per site
    # and a stack at the end cost more than the arithmetic.
    g = ap.clone()
    sites = g.unbind(dim)
    q_sites = [None] * (len(sites) - 1) if q is None else q.unbind(dim)
    sites[0].reciprocal_()
    for g_i, g_prev, q_i in zip(sites[1:], sites[:-1], q_sites, strict=True):
        shifted = g_i.sub_(g_prev) if q_i is None else g_i.addcmul_(q_i, g_prev, value=-1)
        shifted.reciprocal_()
    return g


def _moebius_scan(ap: Tensor, q: Tensor | None) -> Tensor:
    """g_i = 1 / (ap_i - q_{i-1} g_{i-1}) along the last dim. ap: (M, N), q: (M, N-1) or None."""
    n = ap.shape[-1]
    if n <= CHUNK:
        return _moebius_loop(ap, q, -1)
    k = -(-n // CHUNK)
    # Padding sits after the last real site, so it cannot reach any real output.
    ap = _chunks(ap, k, 1)
    q = None if q is None else _chunks(q, k, 0)  # q[C-1, :, c] couples chunk c to chunk c+1
    q_local, q_in = (None, None) if q is None else (q[:-1], q[-1, :, :-1])
    g0 = _moebius_loop(ap, q_local, 0)  # every chunk from a zero inflow
    # s_j = sum_{i<=j} t_i, t_i = g0_i prod_{k<i} q_k g0_k^2: first entry of the local resolvent.
    t = g0.clone()
    t[1:].mul_(_times(q_local, g0[:-1].square()).cumprod(0))
    s = t.cumsum(0)
    # True chunk-end value: rho + mu phi, where phi = 1 / (1 - e s_last) obeys
    # phi_c = 1 / (A_c - P_{c-1} phi_{c-1}), the same recursion one level up.
    mu = g0[-1] * t[-1] / s[-1]
    rho = g0[-1] - mu
    coupling = _times(q_in, s[-1, :, 1:])
    a_coarse = F.pad(1 - coupling * rho[:, :-1], (1, 0), value=1)
    phi = _moebius_scan(a_coarse, coupling * mu[:, :-1])
    # Self-energy on the first site of each chunk; none on the first chunk.
    e = F.pad(_times(q_in, torch.addcmul(rho[:, :-1], mu[:, :-1], phi[:, :-1])), (1, 0))
    d = 1 - e * s
    g = g0 * d.reciprocal()  # a complex reciprocal and a product: faster than a division
    g[1:].mul_(d[:-1])  # g_j = g0_j d_{j-1} / d_j
    return _unchunk(g, n)


def _doubling_scan_(x: Tensor, d: Tensor) -> Tensor:
    """x_i <- x_i + d_i x_{i+1} along the last dim, right to left, by recursive doubling
    (Hillis-Steele), in place.

    After the step of span s, x_i holds the sum over the s sites from i on and `gain` the
    product of the d's across each span: log2(N) steps of 2 to 3 operations each. The products
    are formed before x is written, as the spans overlap.
    """
    n, span, gain = x.shape[-1], 1, d
    while span < n:
        x[:, :-span].add_(gain * x[:, span:])
        if 2 * span < n:
            gain = gain[:, :-span] * gain[:, span:]
        span *= 2
    return x


def _linear_scan(u: Tensor, d: Tensor) -> Tensor:
    """x_i = u_i + d_i x_{i+1} along the last dim, right to left, x_{N-1} = u_{N-1}.
    u: (M, N), d: (M, N-1).

    Doubling inside blocks of BLOCK sites, all blocks at once. What enters a block from the
    right is found first: each block's first value from a zero inflow is a sum of its u's
    weighted by running products of its d's, and the true first values obey the same
    recurrence over blocks, solved the same way. Added to each block's last site, the inflow
    makes one doubling pass give the true values: O(log BLOCK) work per site at every N.
    """
    m, n = u.shape
    if n <= BLOCK:
        return _doubling_scan_(u.clone(), d)
    k = -(-n // BLOCK)
    pad = k * BLOCK - n
    # Padding sits before site 0, which a right-to-left scan never leaves. c_i = d_i is the
    # gain from site i+1 into site i, zero past the last site.
    x = F.pad(u, (pad, 0)).view(m * k, BLOCK)
    c = F.pad(d, (pad, 1)).view(m * k, BLOCK)
    running = c.cumprod(-1)  # running[b, j]: from site j+1 of block b to its first site
    first = x[:, 0] + (running[:, :-1] * x[:, 1:]).sum(-1)
    true_first = _linear_scan(first.view(m, k), running[:, -1].view(m, k)[:, :-1])
    x[:, -1].addcmul_(c[:, -1], F.pad(true_first[:, 1:], (0, 1)).view(m * k))
    return _doubling_scan_(x, c[:, :-1]).view(m, k * BLOCK)[:, pad:]


class _Causal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ap: Tensor, q: Tensor | None) -> Tensor:
        g = _moebius_scan(ap, q)
        ctx.save_for_backward(g, q)
        return g

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        g, q = ctx.saved_tensors
        # grad_a'_j = sum_{i>=j} conj(dg_i/da'_j) grad_i (the conjugate Jacobian, PyTorch's
        # convention) = conj(T_j), T_j = -g_j^2 conj(grad_j) + q_j g_j^2 T_{j+1}: a reverse
        # linear scan. Scanning T rather than its conjugate keeps the scan free of conjugations.
        g2 = g.square()
        t = _linear_scan(-g2 * grad.conj(), _times(q, g2[:, :-1]))
        grad_q = (-g[:, :-1] * t[:, 1:]).conj() if ctx.needs_input_grad[1] else None
        return t.conj(), grad_q


class _Bidirectional(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ap: Tensor, q: Tensor | None) -> Tensor:
        batch = ap.shape[0]
        # Left and right sweeps as one scan over twice the batch.
        gh = _moebius_scan(torch.cat([ap, ap.flip(-1)]),
                           None if q is None else torch.cat([q, q.flip(-1)]))
        g, h = gh[:batch], gh[batch:].flip(-1)
        left = F.pad(_times(q, g[:, :-1]), (1, 0))
        right = F.pad(_times(q, h[:, 1:]), (0, 1))
        diag = (ap - left - right).reciprocal()
        ctx.save_for_backward(g, h, diag, q)
        return diag

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        g, h, diag, q = ctx.saved_tensors
        batch = g.shape[0]
        # -conj(G_ij G_ji) factorises through g (j < i) and h (j > i): one reverse scan T and
        # one forward scan P (conjugated, as in _Causal), each counting the diagonal term once;
        # both run as one right-to-left scan over twice the batch, P on flipped sequences.
        v = -diag.square() * grad.conj()
        alpha = _times(q, g[:, :-1].square())
        beta = _times(q, h[:, 1:].square())
        tp = _linear_scan(torch.cat([v, v.flip(-1)]), torch.cat([alpha, beta.flip(-1)]))
        t, p = tp[:batch], tp[batch:].flip(-1)
        grad_q = None
        if ctx.needs_input_grad[1]:
            grad_q = (-g[:, :-1] * t[:, 1:] - h[:, 1:] * p[:, :-1]).conj()
        return (t + p - v).conj(), grad_q


@functools.cache
def _triton() -> ModuleType | None:
    """physlm.bk_triton, or None where Triton does not import. Imported on first use on CUDA, so
    that the CPU path never pays for importing Triton."""
    try:
        from physlm import bk_triton
    except ImportError:
        return None
    return bk_triton


def resolvent_diagonal(
    diag: Tensor,
    z: complex = 1j,
    *,
    causal: bool = True,
    offdiag_product: Tensor | None = None,
    fused: bool | None = None,
) -> Tensor:
    """Diagonal of (H - z)^{-1} for tridiagonal H, batched over leading dims.

    diag: (..., N) diagonal a of H, float32 or float64. offdiag_product: b_i c_i, (..., N-1) or
    broadcastable, real or complex; None means all ones (H = tridiag(1, a, 1)). Returns complex
    (..., N) (complex64 for float32, complex128 for float64): causal=False gives the full
    diagonal G_ii; causal=True gives g_i, the last diagonal entry of the resolvent of the leading
    i x i block, which depends on positions <= i only.

    fused: None runs float32 and float64 CUDA tensors through the Triton kernels of
    physlm.bk_triton (one kernel per pass) where Triton imports, everything else through the
    PyTorch scans here (the reference); False forces the scans, True the kernels.
    """
    n = diag.shape[-1]
    ap = diag - z
    q = None if offdiag_product is None else offdiag_product.to(ap.dtype)
    batch = ap.shape[:-1] if q is None else torch.broadcast_shapes(ap.shape[:-1], q.shape[:-1])
    m = math.prod(batch)
    ap = ap.expand(*batch, n).reshape(m, n)
    if q is not None:
        q = q.expand(*batch, n - 1).reshape(m, n - 1)
    automatic = ap.is_cuda and ap.dtype in (torch.complex64, torch.complex128)
    kernels = _triton() if fused or (fused is None and automatic) else None
    if fused and kernels is None:
        raise ImportError("resolvent_diagonal(fused=True) needs Triton (pip install triton)")
    if kernels is None:
        out = (_Causal if causal else _Bidirectional).apply(ap, q)
    else:
        out = (kernels.Causal if causal else kernels.Bidirectional).apply(ap, q)
    return out.view(*batch, n)


# The original's backward (SPEC section 7, flaw 2), for the replica and its ablation only.
SURROGATE_FLOOR = 1e-3   # |G_ii^2| is raised to this, its phase kept
SURROGATE_EPS = 1e-6
SURROGATE_CLAMP = 1000.0


class _Surrogate(torch.autograd.Function):
    """Forward: the diagonal as `resolvent_diagonal`. Backward, per position only, with
    g = dL/dRe(G_ii) + i dL/dIm(G_ii) (PyTorch's gradient of a complex output):

        G2 = G_ii^2, raised to modulus 1e-3 where smaller (phase kept)
        dL/dv_i = 0.5 (-Re(g G_ii^2)) + 0.5 (-Re(g / (G2 + 1e-6)))

    non-finite values set to 0, the result clamped to [-1000, 1000]. The true derivative
    is -conj(G_ij G_ji) summed over j; this drops the other positions and the conjugation,
    and the second half is the gradient of nothing. Computed on the causal diagonal g_i
    in the same way when the resolvent is causal.
    """

    @staticmethod
    def forward(ctx, diag: Tensor, z: complex, causal: bool) -> Tensor:
        with torch.no_grad():
            g = resolvent_diagonal(diag, z, causal=causal)
        ctx.save_for_backward(g)
        return g

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (g,) = ctx.saved_tensors
        square = g.square()
        modulus = square.abs()
        stabilised = torch.where(modulus < SURROGATE_FLOOR,
                                 square * (SURROGATE_FLOOR / modulus), square)
        analytic = -(grad * square).real
        surrogate = -(grad / (stabilised + SURROGATE_EPS)).real
        blended = torch.nan_to_num(0.5 * analytic + 0.5 * surrogate, nan=0.0, posinf=0.0,
                                   neginf=0.0)
        return blended.clamp(-SURROGATE_CLAMP, SURROGATE_CLAMP), None, None


def surrogate_resolvent_diagonal(diag: Tensor, z: complex = 1j, *, causal: bool = True
                                 ) -> Tensor:
    """`resolvent_diagonal` (H = tridiag(1, diag, 1)) with the original's surrogate backward."""
    return _Surrogate.apply(diag, z, causal)
