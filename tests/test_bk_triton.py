"""The Triton BK core (physlm/bk_triton.py) and linear scan (physlm/scan_triton.py) against
bk_core's PyTorch scans and plain loops: values and gradients, adversarial potentials, strides,
causality, compilation for GPUs, the dispatch.

Where the kernels run: on a CUDA machine, compiled, in this process (backend "cuda", marked
`cuda`; benchmarks/gpu_check.sh runs them). Without one, in Triton's interpreter on the CPU, in a
pytest process of its own (`test_kernels_in_the_interpreter`, or by hand:
`TRITON_INTERPRET=1 python -m pytest tests/test_bk_triton.py`). triton.jit reads TRITON_INTERPRET
when it decorates a function, triton's own library included, so the variable must be set before
triton is first imported and would then hold for every kernel of the process: a process of its
own keeps it away from every other test.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from physlm import bk_core
from physlm.bk_core import resolvent_diagonal

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install "
                                  "triton; Linux wheels only): the fused BK core is not tested")
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
REPO = Path(__file__).resolve().parents[1]
LONG = 16_384
MODULES = ("physlm.triton_complex", "physlm.bk_triton", "physlm.scan_triton")


@dataclass
class Backend:
    name: str
    core: ModuleType   # physlm.bk_triton
    scan: ModuleType   # physlm.scan_triton
    device: torch.device


def kernel_modules(interpreter: bool) -> list[ModuleType]:
    """The Triton modules; in the interpreter, their device functions made plain Python: the
    interpreter patches triton.language around each launch already, and its re-patching at every
    device-function call would double the time of these tests. (This process runs only them.)"""
    from triton.runtime.interpreter import InterpretedFunction

    modules = [importlib.import_module(name) for name in MODULES]
    for module in modules if interpreter else []:
        for name, value in vars(module).copy().items():
            if isinstance(value, InterpretedFunction) and not name.endswith("_kernel"):
                setattr(module, name, value.fn)
    return modules


@pytest.fixture(scope="module", params=[
    "interpreter" if INTERPRETER else pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request) -> Backend:
    if not HAS_TRITON:
        pytest.skip(needs_triton.kwargs["reason"])
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA (without it, test_kernels_in_the_interpreter runs these tests)")
    _, core, scan = kernel_modules(request.param == "interpreter")
    return Backend(request.param, core, scan, torch.device(
        "cpu" if request.param == "interpreter" else "cuda"))


@pytest.mark.slow
@needs_triton
@pytest.mark.skipif(INTERPRETER, reason="this is the interpreter's run")
def test_kernels_in_the_interpreter():
    """Every test of this file on the interpreted kernels, in a pytest process of its own."""
    environment = {**os.environ, "TRITON_INTERPRET": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@pytest.fixture(autouse=True)
def _quiet_dead_lanes():
    """Lanes past the last sequence of a program compute 1/0, never stored: numpy (the
    interpreter) would warn about them."""
    with np.errstate(divide="ignore", invalid="ignore"):
        yield


def potentials(m: int, n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The model's diagonal a = -2 + v, v uniform in [-3, 3]."""
    generator = torch.Generator().manual_seed(seed)
    return (-2 + 3 * (2 * torch.rand(m, n, generator=generator, dtype=torch.float64) - 1)
            ).to(dtype)


def offdiag(kind: str, m: int, n: int, seed: int, dtype: torch.dtype) -> torch.Tensor | None:
    """q = b c: None (all ones), real in [0.2, 1.7], or complex normal."""
    generator = torch.Generator().manual_seed(seed)
    complex_dtype = (torch.ones((), dtype=dtype) * 1j).dtype
    if kind == "ones":
        return None
    if kind == "real":
        return (0.2 + 1.5 * torch.rand(m, n - 1, generator=generator)).to(complex_dtype)
    return torch.randn(m, n - 1, generator=generator, dtype=complex_dtype)


def core_pass(function, ap: torch.Tensor, q: torch.Tensor | None, device: torch.device
              ) -> tuple[torch.Tensor, ...]:
    """Values and gradients (for ap, and q when given) of an autograd Function of (ap, q)
    through a fixed complex read-out, on `device`, returned on the CPU."""
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(ap.shape, generator=generator, dtype=torch.complex128).to(ap.dtype)
    leaves = [ap.to(device).requires_grad_()]
    if q is not None:
        leaves.append(q.to(device).requires_grad_())
    out = function.apply(leaves[0], leaves[1] if q is not None else None)
    grads = torch.autograd.grad((out * weight.to(device)).real.sum(), leaves)
    return tuple(x.detach().cpu() for x in (out, *grads))


def kernel_pass(backend: Backend, causal: bool, ap: torch.Tensor, q: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
    function = backend.core.Causal if causal else backend.core.Bidirectional
    return core_pass(function, ap, q, backend.device)


def scan_pass(causal: bool, ap: torch.Tensor, q: torch.Tensor | None
              ) -> tuple[torch.Tensor, ...]:
    return core_pass(bk_core._Causal if causal else bk_core._Bidirectional, ap, q,
                     torch.device("cpu"))


def scale_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """|got - expected| <= tolerance * max |expected| (per tensor)."""
    scale = expected.abs().max().clamp_min(1e-30).item() if expected.numel() else 1.0
    error = (got - expected).abs().max().item() if got.numel() else 0.0
    assert error <= tolerance * scale, f"error {error:.3e} > {tolerance:g} x scale {scale:.3e}"


def float32_as_accurate_as_the_scan(backend: Backend, causal: bool, ap: torch.Tensor,
                                    q: torch.Tensor | None) -> None:
    """The float32 kernel and the float32 scan against the float64 scan (the truth here): the
    kernel's error may not exceed twice the scan's plus float32 rounding of the values' scale.
    (The two round differently, and either may be the closer: near a resonance they differ by
    1e-5 of the scale, each amplifying its rounding. In float64 they agree to 1e-12.)"""
    def cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None if x is None else x.to(dtype)

    truth = scan_pass(causal, ap.to(torch.complex128), cast(q, torch.complex128))
    ap32, q32 = ap.to(torch.complex64), cast(q, torch.complex64)
    kernel, scan = kernel_pass(backend, causal, ap32, q32), scan_pass(causal, ap32, q32)
    for got, reference, expected in zip(kernel, scan, truth, strict=True):
        assert torch.isfinite(got).all()
        if not expected.numel():
            continue
        scale = expected.abs().max().item()
        kernel_error = (got.to(expected.dtype) - expected).abs().max().item()
        scan_error = (reference.to(expected.dtype) - expected).abs().max().item()
        assert kernel_error <= 2 * scan_error + 1e-6 * scale, (kernel_error, scan_error, scale)


# (n, batch, q): the lengths of issue 24, batches across the 32 sequences of a program.
CASES = [(1, 3, "ones"), (2, 40, "complex"), (127, 32, "real"), (128, 5, "ones"),
         (129, 7, "complex")]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(("n", "batch", "kind"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_the_scan(backend, dtype, n, batch, kind, causal):
    ap = potentials(batch, n, seed=n, dtype=dtype) - 1j
    q = offdiag(kind, batch, n, seed=n + 1, dtype=dtype)
    if dtype == torch.float32:
        float32_as_accurate_as_the_scan(backend, causal, ap, q)
        return
    for got, expected in zip(kernel_pass(backend, causal, ap, q), scan_pass(causal, ap, q),
                             strict=True):
        scale_close(got, expected, 1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", ["large", "huge", "resonance", "zero_q", "strong_complex_q"])
def test_adversarial_potentials(backend, case, causal):
    m, n, z = 6, 48, 1j
    diag = potentials(m, n, seed=3, dtype=torch.float64)
    q = offdiag("real", m, n, seed=4, dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    if case == "large":        # |v| up to 2e6
        diag = diag * 10 ** (6 * torch.rand(m, n, generator=generator, dtype=torch.float64))
    elif case == "huge":       # |a|^2 overflows float32: the reciprocal must scale
        diag = torch.where(diag > -2, 1e20, -3e19).to(torch.float64)
    elif case == "resonance":  # inside the band [-2, 2] of tridiag(1, 0, 1), 1e-3 off the axis
        diag = 3.8 * torch.rand(m, n, generator=generator, dtype=torch.float64) - 1.9
        z, q = 1e-3j, None
    elif case == "zero_q":     # decoupled sites: g = G = 1 / a', yet q has a gradient
        q = torch.zeros_like(q)
    else:
        q = 4 * torch.randn(m, n - 1, generator=generator, dtype=torch.complex128)
    float32_as_accurate_as_the_scan(backend, causal, diag - z, q)


def test_strided_and_broadcast_inputs(backend):
    """A transposed ap, a q broadcast over the batch (stride 0) and an expanded gradient (the
    gradient of a sum) are read in place, and give what contiguous copies give."""
    n, m = 33, 4
    ap = (potentials(n, m, seed=1, dtype=torch.float32) - 1j).T   # (m, n), strides (1, m)
    q = offdiag("complex", 1, n, seed=2, dtype=torch.float32).expand(m, n - 1)
    for kernel in (backend.core.Causal, backend.core.Bidirectional):
        results = []
        for ap_in, q_in in ((ap, q), (ap.contiguous(), q.contiguous())):
            ap_in = ap_in.to(backend.device).requires_grad_()
            q_in = q_in.to(backend.device).requires_grad_()
            out = kernel.apply(ap_in, q_in)
            results.append((out, *torch.autograd.grad(out.real.sum(), [ap_in, q_in])))
        for strided, contiguous in zip(*results, strict=True):
            torch.testing.assert_close(strided, contiguous, rtol=0, atol=0)


def test_float64_gradcheck(backend):
    m, n = 2, 5
    ap = (potentials(m, n, seed=6, dtype=torch.float64) - 0.5j).to(backend.device)
    q = offdiag("complex", m, n, seed=7, dtype=torch.float64).to(backend.device)
    for kernel in (backend.core.Causal, backend.core.Bidirectional):
        # fast mode: finite differences along random directions, not the whole Jacobian
        assert torch.autograd.gradcheck(kernel.apply, (ap.requires_grad_(), q.requires_grad_()),
                                        fast_mode=True)
        assert torch.autograd.gradcheck(lambda a, kernel=kernel: kernel.apply(a, None), (ap,),
                                        fast_mode=True)


def test_causal_kernel_is_causal(backend):
    """g_i does not change (bit for bit) when sites after i change, and its gradient there is 0."""
    m, n, i = 3, 20, 11
    ap = potentials(m, n, seed=8, dtype=torch.float32) - 1j
    q = offdiag("complex", m, n, seed=9, dtype=torch.float32)
    changed = ap.clone()
    changed[:, i + 1:] += 5.0
    causal = backend.core.Causal
    g = causal.apply(ap.to(backend.device), q.to(backend.device)).cpu()
    g_changed = causal.apply(changed.to(backend.device), q.to(backend.device)).cpu()
    assert torch.equal(g[:, :i + 1], g_changed[:, :i + 1])
    assert not torch.equal(g[:, i + 1:], g_changed[:, i + 1:])
    leaves = [ap.to(backend.device).requires_grad_(), q.to(backend.device).requires_grad_()]
    grad_ap, grad_q = torch.autograd.grad(causal.apply(*leaves)[:, i].abs().sum(), leaves)
    assert (grad_ap[:, i + 1:] == 0).all() and (grad_q[:, i:] == 0).all()
    assert (grad_ap[:, :i + 1] != 0).all()


def test_long_sequence(backend):
    if backend.name == "interpreter":
        pytest.skip(f"N = {LONG:,} takes ~5 minutes in the interpreter (~20 ms a site for "
                    "both forms); the CUDA run of this test covers it")
    for causal in (True, False):
        ap = potentials(2, LONG, seed=10, dtype=torch.float32) - 1j
        float32_as_accurate_as_the_scan(backend, causal, ap, None)


# ---------------------------------------------------------------- the linear scan
def loop_scan(a: torch.Tensor, b: torch.Tensor, dim: int, reverse: bool) -> torch.Tensor:
    """y_i = a_i y_{i-1} + b_i (reverse: y_{i+1}) one site at a time, plain autograd."""
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.movedim(dim, 0), b.movedim(dim, 0)
    order = range(b.shape[0] - 1, -1, -1) if reverse else range(b.shape[0])
    y, sites = torch.zeros_like(b[0]), {}
    for i in order:
        y = sites[i] = a[i] * y + b[i]
    return torch.stack([sites[i] for i in range(b.shape[0])]).movedim(0, dim)


SCAN_CASES = {  # name: (shape of a, shape of b, dim)
    "channels_last_shared_decay": ((3, 37, 1), (3, 37, 5), 1),
    "channels_first": ((2, 4, 37), (2, 4, 37), -1),
    "per_channel_decay_broadcast_batch": ((1, 37, 6), (3, 37, 6), 1),
}


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", SCAN_CASES)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_linear_scan_matches_a_loop(backend, dtype, case, reverse):
    a_shape, b_shape, dim = SCAN_CASES[case]
    generator = torch.Generator().manual_seed(11)
    a = 0.9 * torch.randn(a_shape, generator=generator, dtype=torch.complex128).to(dtype)
    b = torch.randn(b_shape, generator=generator, dtype=torch.complex128).to(dtype)
    weight = torch.randn(torch.broadcast_shapes(a_shape, b_shape), generator=generator,
                         dtype=dtype)
    results = []
    for scan, device in ((backend.scan.linear_scan, backend.device),
                         (loop_scan, torch.device("cpu"))):
        leaves = [a.to(device).requires_grad_(), b.to(device).requires_grad_()]
        y = scan(*leaves, dim=dim, reverse=reverse)
        grads = torch.autograd.grad((y * weight.to(device)).real.sum(), leaves)
        results.append([x.detach().cpu() for x in (y, *grads)])
    tolerance = 2e-6 if dtype == torch.complex64 else 1e-12
    for got, expected in zip(*results, strict=True):
        assert got.shape == expected.shape
        scale_close(got, expected, tolerance)


def test_linear_scan_feature_recurrence_and_gradcheck(backend):
    """Issue 23's y_i = u_i - g_{i-1} y_{i-1} as linear_scan(-g.roll(1), u), g shared by the
    channels; real u promoted; float64 gradcheck in both directions."""
    generator = torch.Generator().manual_seed(12)
    g = 0.5 * torch.randn(2, 9, 1, generator=generator, dtype=torch.complex128)
    u = torch.randn(2, 9, 3, generator=generator, dtype=torch.float64)
    y = backend.scan.linear_scan(-g.roll(1, 1).to(backend.device), u.to(backend.device), dim=1)
    expected = [u[:, 0]]
    for i in range(1, 9):
        expected.append(u[:, i] - g[:, i - 1] * expected[-1])
    torch.testing.assert_close(y.cpu(), torch.stack(expected, 1), rtol=1e-12, atol=1e-12)
    a = g.to(backend.device).requires_grad_()
    b = u.to(backend.device).requires_grad_()
    for reverse in (False, True):
        def scan(a, b, reverse=reverse):
            return backend.scan.linear_scan(a, b, dim=1, reverse=reverse)

        assert torch.autograd.gradcheck(scan, (a, b), fast_mode=True)


# ---------------------------------------------------------------- compiled without a GPU
@needs_triton
@pytest.mark.skipif(INTERPRETER, reason="the interpreter's run has no compiled kernels")
@pytest.mark.parametrize("capability", [75, 90], ids=["sm75_t4", "sm90_h100"])
def test_every_kernel_variant_compiles_for_a_gpu(capability, tmp_path, monkeypatch):
    """Triton's whole compiler (front end, Triton IR, LLVM, PTX, ptxas) needs no GPU: every
    kernel, in both precisions and every switch, for Colab's T4 and an H100/H200. It catches
    what the interpreter accepts and the compiler does not (fdiv with IEEE rounding exists for
    float32 only, say). A kernel's integer arguments are its do_not_specialize ones, its other
    runtime arguments pointers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from physlm.triton_complex import BLOCK, LAUNCH

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA back end")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))   # compile, do not reuse a cache
    target = GPUTarget("cuda", capability, 32)
    kernels = [value for module in kernel_modules(interpreter=False)
               for name, value in vars(module).items()
               if name.endswith("_kernel") and isinstance(value, triton.JITFunction)]
    assert len(kernels) == 5
    for kernel in kernels:
        switches = [p.name for p in kernel.params if p.is_constexpr and p.name != "BLOCK"]
        for dtype in ("fp32", "fp64"):
            signature = {p.name: "constexpr" if p.is_constexpr else
                         "i32" if p.do_not_specialize else f"*{dtype}" for p in kernel.params}
            for values in itertools.product([False, True], repeat=len(switches)):
                constexprs = {"BLOCK": BLOCK, **dict(zip(switches, values, strict=True))}
                options = {k: v for k, v in LAUNCH.items() if k != "BLOCK"}
                compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                          options=options)
                assert compiled.asm["cubin"], (kernel.__name__, dtype, constexprs)


# ---------------------------------------------------------------- the dispatch
def test_cpu_path_does_not_import_triton():
    code = ("import sys, torch; from physlm.bk_core import resolvent_diagonal; "
            "resolvent_diagonal(torch.zeros(2, 8)).abs().sum(); "
            "sys.exit('triton' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def test_fused_without_triton_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(bk_core, "_triton", lambda: None)
    with pytest.raises(ImportError, match="needs Triton"):
        resolvent_diagonal(torch.zeros(2, 8), fused=True)
    resolvent_diagonal(torch.zeros(2, 8), fused=None)   # the CPU path does not need it


@pytest.mark.cuda
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_tensors_take_the_kernels(monkeypatch, causal):
    from physlm import bk_triton

    function = bk_triton.Causal if causal else bk_triton.Bidirectional
    calls = []
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: calls.append(1) or apply(*args))
    diag = potentials(4, 64, seed=13, dtype=torch.float32).cuda()
    fused = resolvent_diagonal(diag, causal=causal)
    assert calls == [1]
    scan = resolvent_diagonal(diag, causal=causal, fused=False)
    assert calls == [1]
    scale_close(fused.cpu(), scan.cpu(), 2e-6)
