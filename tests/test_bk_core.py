"""The BK core against dense inverses, gradcheck, long sequences and causality."""

from __future__ import annotations

import pytest
import torch

from physlm.bk_core import BLOCK, CHUNK, _linear_scan, resolvent_diagonal


def potentials(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The model's diagonal: a = -2 + v with v uniform in [-3, 3]."""
    gen = torch.Generator().manual_seed(seed)
    return -2 + 6 * torch.rand(*shape, generator=gen, dtype=dtype) - 3


def offdiag(kind: str, *shape: int, seed: int = 1) -> torch.Tensor | None:
    """b_i c_i: None (all ones), real in [0.2, 1.7], or complex normal."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "ones":
        return None
    if kind == "real":
        return 0.2 + 1.5 * torch.rand(*shape, generator=gen, dtype=torch.float64)
    return torch.randn(*shape, generator=gen, dtype=torch.complex128)


def dense_hamiltonian(a: torch.Tensor, q: torch.Tensor | None, z: complex) -> torch.Tensor:
    """H - z for one sequence, super-diagonal q and sub-diagonal 1, so that b_i c_i = q_i."""
    n = a.shape[-1]
    q = torch.ones(n - 1, dtype=torch.float64) if q is None else q
    sub = torch.ones(n - 1, dtype=torch.complex128)
    return torch.diag(a - z) + torch.diag(q.to(torch.complex128), 1) + torch.diag(sub, -1)


def dense_reference(
    a: torch.Tensor, q: torch.Tensor | None, z: complex, causal: bool
) -> torch.Tensor:
    """Diagonal of inv(H - z), or (causal) the last diagonal entry of inv of each leading block."""
    rows = []
    for b in range(a.shape[0]):
        inv = torch.linalg.inv(dense_hamiltonian(a[b], None if q is None else q[b], z))
        if not causal:
            rows.append(inv.diagonal())
            continue
        # The inverse of a leading block is a Schur complement of the next block's inverse:
        # inv(A) = E - f g / h for inv([[A, b], [c, d]]) = [[E, f], [g, h]].
        last = [inv[-1, -1]]
        for i in range(inv.shape[0] - 1, 0, -1):
            inv = inv[:i, :i] - inv[:i, i, None] * inv[None, i, :i] / inv[i, i]
            last.append(inv[-1, -1])
        rows.append(torch.stack(last[::-1]))
    return torch.stack(rows)


def plain_recursion(a: torch.Tensor, z: complex = 1j) -> torch.Tensor:
    """g_i = 1 / (a_i - z - g_{i-1}), one position at a time: the unchunked definition."""
    ap = (a - z).unbind(-1)
    g = [1 / ap[0]]
    for a_i in ap[1:]:
        g.append(1 / (a_i - g[-1]))
    return torch.stack(g, -1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", ["ones", "real", "complex"])
@pytest.mark.parametrize("n", [1, 2, 3, 17, 128])
def test_matches_dense_inverse(n: int, kind: str, causal: bool) -> None:
    a = potentials(3, n)
    q = offdiag(kind, 3, n - 1)
    expected = dense_reference(a, q, 1j, causal)
    got = resolvent_diagonal(a, 1j, causal=causal, offdiag_product=q)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_matches_dense_inverse_two_scan_levels() -> None:
    n = CHUNK * CHUNK + 44  # more chunks than CHUNK: the chunk-end recursion is chunked too
    a = potentials(1, n, seed=5)
    full = resolvent_diagonal(a, 0.3 + 0.8j, causal=False)
    torch.testing.assert_close(
        full, dense_reference(a, None, 0.3 + 0.8j, False), rtol=0, atol=1e-10
    )
    # Causal value at site i: the last diagonal entry of the inverse of the leading block.
    causal = resolvent_diagonal(a, 0.3 + 0.8j)
    for i in [0, CHUNK - 1, CHUNK, 100, CHUNK * CHUNK - 1, CHUNK * CHUNK, n - 1]:
        expected = dense_reference(a[:, : i + 1], None, 0.3 + 0.8j, False)[:, -1]
        torch.testing.assert_close(causal[:, i], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [1, 2, 3, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5,
                               BLOCK * BLOCK + 77])
def test_linear_scan_matches_the_recurrence(n: int) -> None:
    """The backward's scan, x_i = u_i + d_i x_{i+1}, against one site at a time: within one
    block, across blocks, and with more blocks than BLOCK (the carry is blocked too)."""
    gen = torch.Generator().manual_seed(n)
    u = torch.randn(2, n, generator=gen, dtype=torch.complex128)
    d = 0.9 * torch.randn(2, n - 1, generator=gen, dtype=torch.complex128)
    x = [u[:, -1]]
    for i in range(n - 2, -1, -1):
        x.append(u[:, i] + d[:, i] * x[-1])
    expected = torch.stack(x[::-1], -1)
    torch.testing.assert_close(_linear_scan(u, d), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 2, 5, 9, 2 * CHUNK + 3])
def test_gradcheck(n: int, causal: bool) -> None:
    a = potentials(2, n).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: resolvent_diagonal(x, causal=causal), (a,))


def test_jacobian_is_minus_g_ij_g_ji() -> None:
    n = CHUNK + 7
    a = potentials(n).requires_grad_()
    out = resolvent_diagonal(a, causal=False)
    rows = []
    for i in range(n):
        (d_re,) = torch.autograd.grad(out[i].real, a, retain_graph=True)
        (d_im,) = torch.autograd.grad(out[i].imag, a, retain_graph=True)
        rows.append(torch.complex(d_re, d_im))
    g = torch.linalg.inv(dense_hamiltonian(a.detach(), None, 1j))
    torch.testing.assert_close(torch.stack(rows), -g * g.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", ["real", "complex"])
def test_gradcheck_offdiag_product(kind: str, causal: bool) -> None:
    n = CHUNK + 5
    a = potentials(2, n).requires_grad_()
    q = offdiag(kind, n - 1).requires_grad_()  # broadcast over the batch
    assert torch.autograd.gradcheck(
        lambda x, p: resolvent_diagonal(x, 0.5 + 1j, causal=causal, offdiag_product=p), (a, q)
    )


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_two_scan_levels(causal: bool) -> None:
    a = potentials(1, CHUNK * CHUNK + 44, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: resolvent_diagonal(x, causal=causal), (a,), fast_mode=True
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_long_sequence_is_finite(causal: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    v = (6 * torch.rand(2, 16384, generator=gen, dtype=dtype) - 3).requires_grad_()
    out = resolvent_diagonal(v, causal=causal)
    out.abs().sum().backward()
    assert out.isfinite().all()
    assert v.grad.isfinite().all()


def test_long_sequence_matches_plain_recursion() -> None:
    a = potentials(2, 16384, seed=7)
    torch.testing.assert_close(resolvent_diagonal(a), plain_recursion(a), rtol=0, atol=1e-10)


def test_causal_ignores_the_future() -> None:
    a = potentials(2, 300)
    base = resolvent_diagonal(a)
    for i in [0, 5, CHUNK - 1, CHUNK, 100, 298]:
        changed = a.clone()
        changed[:, i + 1 :] += torch.randn_like(changed[:, i + 1 :])
        out = resolvent_diagonal(changed)
        assert torch.equal(out[:, : i + 1], base[:, : i + 1])
        assert not torch.equal(out[:, i + 1 :], base[:, i + 1 :])
    # The full diagonal does see the future: the reason the causal form is the default.
    changed = a.clone()
    changed[:, 10] += 1
    full = resolvent_diagonal(changed, causal=False)
    assert not torch.equal(full[:, 9], resolvent_diagonal(a, causal=False)[:, 9])


@pytest.mark.parametrize(
    "dtype, expected", [(torch.float32, torch.complex64), (torch.float64, torch.complex128)]
)
@pytest.mark.parametrize("causal", [True, False])
def test_output_dtype(dtype: torch.dtype, expected: torch.dtype, causal: bool) -> None:
    assert resolvent_diagonal(potentials(2, 40, dtype=dtype), causal=causal).dtype == expected


@pytest.mark.parametrize("causal", [True, False])
def test_batch_shapes(causal: bool) -> None:
    a = potentials(2, 3, 37)
    q = offdiag("real", 36)
    out = resolvent_diagonal(a, causal=causal, offdiag_product=q)
    assert out.shape == (2, 3, 37)
    flat = resolvent_diagonal(a.reshape(6, 37), causal=causal, offdiag_product=q.expand(6, 36))
    torch.testing.assert_close(out.reshape(6, 37), flat, rtol=0, atol=0)
    single = resolvent_diagonal(a[1, 2], causal=causal, offdiag_product=q)
    torch.testing.assert_close(out[1, 2], single, rtol=0, atol=1e-14)


@pytest.mark.parametrize("n", [128, 4096])
@pytest.mark.parametrize("causal", [True, False])
def test_float32_agrees_with_float64(n: int, causal: bool) -> None:
    a = potentials(4, n)
    out32 = resolvent_diagonal(a.float(), causal=causal)
    out64 = resolvent_diagonal(a, causal=causal)
    torch.testing.assert_close(out32.to(torch.complex128), out64, rtol=0, atol=1e-4)
