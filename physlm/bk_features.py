"""Layer variants of the BK core: spectral shifts, coupling, the resolvent on the features.

Per layer and potential c = 1..P, a tridiagonal H_c with diagonal a_i = -2 + v_{c,i} and
symmetric off-diagonals t_i (hopping between sites i and i+1; 1 in the reference model), and a
spectral shift z_c = i gamma_c. The BK core gives the continued fraction

    g_i = 1 / (a_i - z_c - t_{i-1}^2 g_{i-1}),

the last diagonal entry of (H_c - z_c)^{-1} restricted to sites 1..i. The same g is the LU
factorisation of H - z: H - z = L U with L unit lower bidiagonal, L_{i+1,i} = t_i g_i, and U
upper bidiagonal, U_ii = 1 / g_i, U_{i,i+1} = t_i. Applied to a signal u (one column per
feature) instead of read out on its diagonal:

    forward substitution,  L y = u:      y_i = u_i - t_{i-1} g_{i-1} y_{i-1}
    causal solution:                     w_i = g_i y_i
                                             = [(H_[1..i] - z)^{-1} u_[1..i]]_i
    back substitution,     U x = y:      x_i = w_i - g_i t_i x_{i+1}      (x = (H - z)^{-1} u)

w_i is the response at site i of the chain cut at i to the sources at sites <= i: causal, and a
data-dependent complex decay (-t g) of a linear recurrence over the features. x is the full
solve, which sees the future (the bidirectional ablation). Each recurrence is one linear scan,
O(N), with its exact gradient another scan in the opposite direction (`linear_recurrence`).

Selective gates (`bk_gates`): the source and the read-out of the recurrence chosen per feature
by the token at the site, as a gated linear recurrence (GLA, Mamba) or the LSTM's input and
output gates do:

    u_i <- sigmoid(W_in f_i) * u_i,      w_i <- sigmoid(W_out f_i) * w_i

what site i writes into the state, and what it reads of the state, depend on its token; the
decay stays the resolvent's. Real gains in (0, 1) from site i alone: causal, and within the
bounds below.

Finite by construction: H is real symmetric (a real, t real), so for Im z = gamma > 0 every
leading block satisfies ||(H_[1..i] - z)^{-1}|| <= 1 / gamma. Hence |g_i| <= 1/gamma,
|w_i| <= ||u_[1..i]|| / gamma, ||x|| <= ||u|| / gamma, and |y_i| = |w_i / g_i| is bounded as
|1/g_i| <= |a_i| + gamma + t^2 / gamma. A learned gamma is kept >= GAMMA_FLOOR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from physlm.bk_core import _linear_scan

# Initial shifts of P learned potentials: gamma geometric from 1 (the reference z = i) down
# to ModelConfig.bk_gamma_init_min (0.1 by default). The recurrence decays by |g| per site: at
# v = 0 (Re z at the band edge of H) 0.48 at gamma = 1, 0.80 at gamma = 0.1; at v = 2 (the band
# centre) |g| = (sqrt(gamma^2 + 4) - gamma) / 2: 0.62, 0.95 and 0.99 at gamma = 0.02: memories
# from about one site to twenty (a hundred at 0.02).
GAMMA_INIT_MAX = 1.0
# Lower bound of a learned gamma: the resolvent's norm stays <= 100, finite in float32.
GAMMA_FLOOR = 0.01
# A learned hopping is t = COUPLING_MAX * sigmoid(logit): in (0, 2), 1 (the reference) at 0.
COUPLING_MAX = 2.0


def _scan(u: Tensor, d: Tensor, reverse: bool) -> Tensor:
    """x_i = u_i + d_i x_{i+1} (reverse) or x_{i+1} = u_{i+1} + d_i x_i, along the last dim."""
    u, d = u.contiguous(), d.contiguous()  # the scan views its input in blocks
    if reverse:
        return _linear_scan(u, d)
    return _linear_scan(u.flip(-1), d.flip(-1)).flip(-1)


class _LinearRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, d: Tensor, reverse: bool) -> Tensor:
        x = _scan(u, d, reverse)
        ctx.save_for_backward(x, d)
        ctx.reverse = reverse
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, d = ctx.saved_tensors
        # x = M u with M triangular, M_ik the product of the d's between k and i. PyTorch's
        # gradient is M^H grad = conj(T), T = M^T conj(grad): the same recurrence run the other
        # way. d_k multiplies x_k into x_{k+1} (forward), so its gradient is conj(x_k T_{k+1})
        # (and conj(x_{k+1} T_k) for the reverse recurrence).
        t = _scan(grad.conj(), d, not ctx.reverse)
        grad_d = (x[:, 1:] * t[:, :-1] if ctx.reverse else x[:, :-1] * t[:, 1:]).conj()
        return t.conj(), grad_d, None


def linear_recurrence(u: Tensor, d: Tensor, reverse: bool = False) -> Tensor:
    """x_{i+1} = u_{i+1} + d_i x_i left to right, x_0 = u_0 (or, reverse, x_i = u_i + d_i x_{i+1}
    right to left), along the last dim. u: (M, N) complex, d: (M, N-1) of u's dtype.

    Forward and backward are each one parallel scan of bk_core (`_linear_scan`), O(N).
    """
    return _LinearRecurrence.apply(u, d, reverse)


def resolve_features(u: Tensor, g: Tensor, hopping: Tensor | None, causal: bool = True
                     ) -> Tensor:
    """The resolvent of each potential applied to its share of the features.

    u: (B, N, D) real, split into P groups of D / P consecutive features, group c driven
    through potential c; g: (B, P, N) complex, the causal continued fraction of each potential;
    hopping: (B, P, N-1) real t_i, or None for all ones. Returns (B, N, D) complex: w (causal)
    or x = (H - z)^{-1} u (not causal), see the module docstring.
    """
    b, n, d = u.shape
    p = g.shape[1]
    width = d // p
    signal = u.reshape(b, n, p, width).permute(0, 2, 3, 1).to(g.dtype)         # (B, P, F, N)
    # Both substitutions decay by -t_i g_i from site i to its neighbour, the same for the F
    # features of a potential.
    coupled = g[..., :-1] if hopping is None else g[..., :-1] * hopping
    decay = (-coupled).unsqueeze(2).expand(b, p, width, n - 1).reshape(-1, n - 1)
    y = linear_recurrence(signal.reshape(-1, n), decay)
    out = g.unsqueeze(2).expand(b, p, width, n).reshape(-1, n) * y
    if not causal:
        out = linear_recurrence(out, decay, reverse=True)
    return out.view(b, p, width, n).permute(0, 3, 1, 2).reshape(b, n, d)


class SpectralShift(nn.Module):
    """z_c = i gamma_c per potential, gamma_c = GAMMA_FLOOR + softplus(rho_c) > 0, learned.

    Initialised geometric from GAMMA_INIT_MAX down to `lowest` (> GAMMA_FLOOR) over the P
    potentials (one potential: gamma = 1, the reference shift)."""

    def __init__(self, potentials: int, lowest: float) -> None:
        super().__init__()
        if not GAMMA_FLOOR < lowest <= GAMMA_INIT_MAX:
            raise ValueError(f"initial gamma {lowest} is not in ({GAMMA_FLOOR}, {GAMMA_INIT_MAX}]")
        high = GAMMA_INIT_MAX
        gamma = high * (lowest / high) ** (torch.arange(potentials) / max(potentials - 1, 1))
        self.rho = nn.Parameter(torch.log(torch.expm1(gamma - GAMMA_FLOOR)))

    @property
    def gamma(self) -> Tensor:
        return GAMMA_FLOOR + F.softplus(self.rho)

    def forward(self) -> Tensor:
        """z, (P, 1) complex: broadcasts against a (B, P, N) diagonal."""
        return (1j * self.gamma).unsqueeze(-1)


class Coupling(nn.Module):
    """Input-dependent hopping t between sites i-1 and i, from the features at site i:
    t = COUPLING_MAX * sigmoid(Linear(D, P)(f_i)) in (0, COUPLING_MAX), one per potential.

    The token at site i sets how strongly it connects to its past (a data-dependent gate on the
    continued fraction's memory), and the hopping into i depends on sites <= i only, so the
    causal resolvent stays causal. Real and bounded: H stays real symmetric, so the resolvent
    is finite (module docstring), and its spectrum within [min a - 4, max a + 4].
    """

    def __init__(self, d_model: int, potentials: int) -> None:
        super().__init__()
        self.logit = nn.Linear(d_model, potentials)

    def forward(self, f: Tensor) -> Tensor:
        """f: (B, N, D) -> t: (B, P, N-1), t[..., i] the hopping between sites i and i+1."""
        return COUPLING_MAX * torch.sigmoid(self.logit(f[:, 1:])).transpose(1, 2)


class Gates(nn.Module):
    """The selective gates: sigmoid(Linear(D, 2D)(f_i)) split into the write gate on the source
    u_i and the read gate on the response w_i, one per feature (module docstring)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.logit = nn.Linear(d_model, 2 * d_model)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """f: (B, N, D) -> the write and read gates, each (B, N, D) in (0, 1)."""
        write, read = torch.sigmoid(self.logit(f)).chunk(2, dim=-1)
        return write, read
