"""Layer variants (physlm.bk_features, ModelConfig bk_*): dense references, gradcheck,
causality and parameter counts; the MoE's balancing term and its trivial solutions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from physlm.bk_core import resolvent_diagonal
from physlm.bk_features import GAMMA_FLOOR, SpectralShift, linear_recurrence, resolve_features
from physlm.build import build_model
from physlm.config import Config, ModelConfig, from_flat
from physlm.model import BKLayer, ResNetBK, count_parameters
from physlm.moe import balance_score, load_entropy
from physlm.values import ConfigError

VARIANTS = {
    "potentials": {"bk_potentials": 4},
    "shifts": {"bk_potentials": 4, "bk_shift": "learned"},
    "coupling": {"bk_potentials": 4, "bk_coupling": "learned"},
    "features": {"bk_potentials": 4, "bk_shift": "learned", "bk_readout": "features"},
    "all": {"bk_potentials": 4, "bk_shift": "learned", "bk_coupling": "learned",
            "bk_readout": "features"},
    "gated": {"bk_potentials": 4, "bk_shift": "learned", "bk_readout": "features",
              "bk_gates": True},
}
PROXY_VOCABULARY = 21_143  # the proxy's (reports/published/physics_recommended.md)


def dense_system(a: torch.Tensor, hopping: torch.Tensor | None, z: complex) -> torch.Tensor:
    """H - z for one sequence: diagonal a, symmetric off-diagonals `hopping` (None: ones)."""
    n = a.shape[-1]
    t = torch.ones(n - 1, dtype=torch.float64) if hopping is None else hopping
    off = torch.diag(t, 1) + torch.diag(t, -1)
    return (torch.diag(a) + off).to(torch.complex128) - z * torch.eye(n, dtype=torch.complex128)


def dense_resolved(a: torch.Tensor, hopping: torch.Tensor | None, z: complex,
                   u: torch.Tensor, causal: bool) -> torch.Tensor:
    """(H - z)^{-1} u (u: (N, F)), or (causal) row i of the solve on the leading i+1 sites."""
    system = dense_system(a, hopping, z)
    u = u.to(torch.complex128)
    if not causal:
        return torch.linalg.solve(system, u)
    return torch.stack([torch.linalg.solve(system[:i + 1, :i + 1], u[:i + 1])[-1]
                        for i in range(a.shape[-1])])


def dense_diagonal(a: torch.Tensor, hopping: torch.Tensor | None, z: complex,
                   causal: bool) -> torch.Tensor:
    """G_ii, or (causal) the last diagonal entry of the inverse on the leading i+1 sites."""
    inverse = torch.linalg.inv
    system = dense_system(a, hopping, z)
    if not causal:
        return inverse(system).diagonal()
    return torch.stack([inverse(system[:i + 1, :i + 1])[-1, -1] for i in range(a.shape[-1])])


def plain_recurrence(u: torch.Tensor, d: torch.Tensor, reverse: bool) -> torch.Tensor:
    x = list(u.unbind(-1))
    steps = range(len(x) - 2, -1, -1) if reverse else range(1, len(x))
    for i in steps:
        x[i] = x[i] + (d[:, i] * x[i + 1] if reverse else d[:, i - 1] * x[i - 1])
    return torch.stack(x, -1)


def complex_normal(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=torch.complex128)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [1, 2, 17, 300])
def test_linear_recurrence_matches_the_loop(n: int, reverse: bool) -> None:
    u, d = complex_normal(3, n, seed=0), complex_normal(3, n - 1, seed=1, scale=0.7)
    torch.testing.assert_close(linear_recurrence(u, d, reverse), plain_recurrence(u, d, reverse),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [5, 140])  # 140: more than one block of the scan
def test_linear_recurrence_gradcheck(n: int, reverse: bool) -> None:
    u = complex_normal(2, n, seed=2).requires_grad_()
    d = complex_normal(2, n - 1, seed=3, scale=0.6).requires_grad_()
    assert torch.autograd.gradcheck(lambda u, d: linear_recurrence(u, d, reverse), (u, d))


def _potentials(b: int, p: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """A diagonal -2 + v (v in [-3, 3]), shifts i gamma (gamma in [0.1, 1]), hopping in (0, 2)."""
    gen = torch.Generator().manual_seed(seed)
    a = -2 + 6 * torch.rand(b, p, n, generator=gen, dtype=torch.float64) - 3
    gamma = 0.1 + 0.9 * torch.rand(p, generator=gen, dtype=torch.float64)
    hopping = 2 * torch.rand(b, p, n - 1, generator=gen, dtype=torch.float64)
    return a, gamma, hopping


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("coupled", [False, True])
def test_resolved_features_match_dense_solves(causal: bool, coupled: bool) -> None:
    b, p, width, n = 2, 3, 2, 9
    a, gamma, hopping = _potentials(b, p, n, seed=4)
    hopping = hopping if coupled else None
    u = torch.randn(b, n, p * width, dtype=torch.float64, generator=torch.Generator()
                    .manual_seed(5))
    z = (1j * gamma).unsqueeze(-1)
    g = resolvent_diagonal(a, z, offdiag_product=None if hopping is None else hopping.square())
    got = resolve_features(u, g, hopping, causal=causal)
    for i in range(b):
        for c in range(p):
            expected = dense_resolved(a[i, c], None if hopping is None else hopping[i, c],
                                      1j * gamma[c].item(), u[i, :, c * width:(c + 1) * width],
                                      causal)
            torch.testing.assert_close(got[i, :, c * width:(c + 1) * width], expected,
                                       rtol=0, atol=1e-10)


def test_resolved_features_long_sequence_float32_is_finite_and_accurate() -> None:
    """N = 4,096 at the smallest shift a learned gamma can take: the bound ||w|| <= ||u|| / gamma
    holds, and float32 agrees with float64."""
    b, p, n = 1, 2, 4_096
    a, _, hopping = _potentials(b, p, n, seed=6)
    u = torch.randn(b, n, 2 * p, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    z = torch.full((p, 1), 1j * GAMMA_FLOOR, dtype=torch.complex128)
    out = {}
    for dtype in (torch.float64, torch.float32):
        g = resolvent_diagonal(a.to(dtype), z.to(dtype.to_complex()),
                               offdiag_product=hopping.to(dtype).square())
        out[dtype] = resolve_features(u.to(dtype), g, hopping.to(dtype))
    assert out[torch.float32].isfinite().all()
    assert out[torch.float64].abs().max() <= u.abs().max() * math.sqrt(n) / GAMMA_FLOOR
    error = (out[torch.float32].to(torch.complex128) - out[torch.float64]).abs().max()
    assert error <= 1e-3 * out[torch.float64].abs().max()


def _layer(variant: str, **overrides) -> BKLayer:
    torch.manual_seed(0)
    config = ModelConfig(d_model=8, num_experts=2, dropout=0.0, **VARIANTS[variant], **overrides)
    layer = BKLayer(config).double()
    if layer.coupling is not None:  # hopping spread over (0, 2), not all near 1
        torch.nn.init.normal_(layer.coupling.logit.weight, std=2.0)
    return layer


def dense_layer(layer: BKLayer, h: torch.Tensor) -> torch.Tensor:
    """BKLayer's output with every resolvent from dense solves, sequence by sequence."""
    f = layer.moe(layer.norm(h))[0]
    v = layer.potential(f).clamp(-layer.potential_clamp, layer.potential_clamp)
    p, n = v.shape[-1], v.shape[1]
    gamma = torch.ones(p, dtype=torch.float64) if layer.shift is None else layer.shift.gamma
    t = None if layer.coupling is None else layer.coupling(f)
    u = None if layer.signal is None else layer.signal(f)
    write, read = (1.0, 1.0) if layer.gates is None else torch.sigmoid(
        f @ layer.gates.logit.weight.T + layer.gates.logit.bias).chunk(2, -1)
    if u is not None:
        u = write * u
    rows = []
    for i in range(h.shape[0]):
        columns = []
        for c in range(p):
            args = (v[i, :, c] - 2.0, None if t is None else t[i, c], 1j * gamma[c].item())
            if u is None:
                columns.append(dense_diagonal(*args, causal=layer.causal).unsqueeze(-1))
            else:
                width = u.shape[-1] // p
                columns.append(dense_resolved(*args, u[i, :, c * width:(c + 1) * width],
                                              layer.causal))
        w = torch.cat(columns, -1) * (read if layer.gates is None else read[i])
        rows.append(torch.cat((w.real, w.imag), -1).reshape(n, -1))
    features = torch.stack(rows).clamp(-layer.feature_clamp, layer.feature_clamp)
    return f + layer.scale * layer.features(features)


@pytest.mark.parametrize("bk_mode", ["causal", "bidirectional"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_matches_dense_reference(variant: str, bk_mode: str) -> None:
    layer = _layer(variant, bk_mode=bk_mode)
    h = torch.randn(2, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(h)[0], dense_layer(layer, h), rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_gradcheck(variant: str) -> None:
    """Through the input and the variant's own parameters (shifts, hopping, signal)."""
    layer = _layer(variant)
    names = [name for name in ("shift.rho", "coupling.logit.weight", "signal.weight",
                               "gates.logit.weight")
             if name in dict(layer.named_parameters())]
    params = dict(layer.named_parameters())
    inputs = [torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)]
    inputs += [params[name].detach().clone().requires_grad_() for name in names]

    def output(h: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, dict(zip(names, values, strict=True)), (h,))[0]

    assert torch.autograd.gradcheck(output, tuple(inputs))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_never_sees_the_future(variant: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(d_model=16, n_layers=2, n_seq=12, dropout=0.0, **VARIANTS[variant])
    model = ResNetBK(config, 50).eval()
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        base = model(x).logits
        for j in (0, 5, 11):
            changed = x.clone()
            changed[:, j] = (changed[:, j] + 7) % 50
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, :j], base[:, :j], rtol=0, atol=1e-6)
            assert not torch.allclose(logits[:, j:], base[:, j:])


def test_features_bidirectional_sees_the_future() -> None:
    """The full solve is the ablation: it must leak, or the causal test above proves nothing."""
    layer = _layer("features", bk_mode="bidirectional")
    h = torch.randn(1, 7, 8, dtype=torch.float64)
    changed = h.clone()
    changed[:, 5] = torch.randn(8, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(layer(changed)[0][:, :5], layer(h)[0][:, :5])


def test_one_learned_shift_starts_as_the_reference_layer() -> None:
    """gamma starts at 1 for one potential (and the shift draws no random numbers)."""
    x = torch.randint(0, 50, (2, 12))
    logits = []
    for shift in ("fixed", "learned"):
        torch.manual_seed(0)
        config = ModelConfig(d_model=16, n_layers=2, n_seq=12, dropout=0.0, bk_shift=shift)
        logits.append(ResNetBK(config, 50).eval()(x).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)


def test_learned_shifts_start_geometric_and_stay_positive() -> None:
    layer = _layer("shifts")
    torch.testing.assert_close(layer.shift.gamma, torch.tensor([1.0, 10 ** (-1 / 3),
                                                                10 ** (-2 / 3), 0.1]).double(),
                               rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.shift.rho.fill_(-1e4)
    assert (layer.shift.gamma >= GAMMA_FLOOR).all()


def test_the_lowest_initial_shift_is_a_setting_above_the_floor() -> None:
    """bk_gamma_init_min sets the longest initial memory: gamma geometric from 1 down to it."""
    layer = _layer("shifts", bk_gamma_init_min=0.02)
    torch.testing.assert_close(layer.shift.gamma, 0.02 ** (torch.arange(4) / 3).double(),
                               rtol=0, atol=1e-6)
    for lowest in (GAMMA_FLOOR, 1.5):
        with pytest.raises(ConfigError, match="bk_gamma_init_min must be in"):
            from_flat({"bk_gamma_init_min": lowest})
        with pytest.raises(ValueError, match="initial gamma"):
            SpectralShift(4, lowest)


def _extra_per_layer(d: int, p: int, shift: bool, coupling: bool, features: bool,
                     gates: bool) -> int:
    """Parameters a variant adds to one layer, counted by hand: Linear(D, P) potentials and
    hopping, P shifts, Linear(2P, D) or (features) Linear(D, D) + Linear(2D, D) readouts,
    Linear(D, 2D) gates."""
    potentials = (d + 1) * (p - 1)
    readout = (d * d + d) + 2 * d * d if features else 2 * d * p  # weights; biases match
    return (potentials + p * shift + (d + 1) * p * coupling + readout - 2 * d
            + (d + 1) * 2 * d * gates)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_parameter_counts(variant: str) -> None:
    settings = VARIANTS[variant]
    extra = 4 * _extra_per_layer(64, settings["bk_potentials"],
                                 settings.get("bk_shift") == "learned",
                                 settings.get("bk_coupling") == "learned",
                                 settings.get("bk_readout") == "features",
                                 settings.get("bk_gates", False))
    for vocabulary, reference in ((30_000, 4_179_924), (PROXY_VOCABULARY, 3_037_371)):
        model, penalty = build_model(from_flat(settings), vocabulary)
        assert count_parameters(model, penalty)["total"] == reference + extra


def test_variant_settings_are_checked() -> None:
    for values, message in (({"bk_potentials": 0}, "bk_potentials must be >= 1"),
                            ({"bk_potentials": 3, "bk_readout": "features"}, "divide d_model"),
                            ({"bk_gradient": "surrogate", "bk_shift": "learned"}, "surrogate"),
                            ({"moe_balance_weight": -0.1}, "moe_balance_weight"),
                            ({"bk_gates": True}, "needs bk_readout: features")):
        with pytest.raises(ConfigError, match=message):
            from_flat(values)
    from_flat({"bk_potentials": 3})  # the diagonal readout takes any number of potentials


def test_balance_score_of_uniform_and_collapsed_routers_is_one() -> None:
    """Exactly uniform load scores 1 (so the loss alpha) whatever the probabilities; so does a
    collapsed router with flat probabilities: the loss cannot tell the two apart."""
    importance = torch.tensor([0.7, 0.1, 0.1, 0.1])
    assert balance_score(torch.full((4,), 0.25), importance).item() == pytest.approx(1.0)
    collapsed = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert balance_score(collapsed, torch.full((4,), 0.25)).item() == pytest.approx(1.0)
    assert balance_score(collapsed, importance).item() == pytest.approx(2.8)


def test_balance_score_below_one_without_balance() -> None:
    """E = 2: 3/4 of the tokens at a tie (first expert chosen), 1/4 sure of the second."""
    probs = torch.tensor([[0.5, 0.5]] * 3 + [[0.0, 1.0]])
    load = torch.bincount(probs.argmax(-1), minlength=2).double() / 4
    assert load.tolist() == [0.75, 0.25]
    assert balance_score(load, probs.mean(0)).item() == pytest.approx(7 / 8)


def test_model_returns_the_balance_term_apart_from_the_loss() -> None:
    torch.manual_seed(0)
    x, y = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    config = ModelConfig(d_model=16, n_layers=2, n_seq=12, dropout=0.0)
    assert ResNetBK(config, 50)(x, y).balance_loss is None
    torch.manual_seed(0)
    weighted = ResNetBK(ModelConfig(d_model=16, n_layers=2, n_seq=12, dropout=0.0,
                                    moe_balance_weight=0.01), 50)
    for layer in weighted.blocks:  # a gate that ignores its input: flat probabilities
        torch.nn.init.zeros_(layer.moe.gate.weight)
        torch.nn.init.zeros_(layer.moe.gate.bias)
    out = weighted(x, y)
    assert out.balance_loss.item() == pytest.approx(0.01)
    assert out.expert_load[:, 0].tolist() == [1.0, 1.0]  # collapsed, ties go to expert 0
    logits = weighted(x).logits.reshape(-1, 50)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, y.reshape(-1)))  # LM loss only
    out.balance_loss.backward()
    gate = weighted.blocks[0].moe.gate
    assert gate.bias.grad[0] > 0 > gate.bias.grad[1]  # pushes the overloaded expert down
    expert_grad = weighted.blocks[-1].moe.w1.grad  # the experts' output is not in the term
    assert expert_grad is None or not expert_grad.any()


def test_random_router_scores_one_on_average() -> None:
    """Tokens sent to experts uniformly at random, independently of their probabilities."""
    gen = torch.Generator().manual_seed(0)
    scores = []
    for _ in range(200):
        choices = torch.randint(0, 4, (256,), generator=gen)
        load = torch.bincount(choices, minlength=4).double() / 256
        importance = torch.softmax(torch.randn(4, generator=gen, dtype=torch.float64), 0)
        scores.append(balance_score(load, importance))
    assert torch.stack(scores).mean().item() == pytest.approx(1.0, abs=0.01)


def test_load_entropy() -> None:
    load = torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(load_entropy(load),
                               torch.tensor([math.log(4), 0.0, math.log(2)]))


def test_reference_config_is_unchanged() -> None:
    defaults = Config().model
    assert (defaults.bk_potentials, defaults.bk_shift, defaults.bk_coupling,
            defaults.bk_readout, defaults.moe_balance_weight) == (1, "fixed", "fixed",
                                                                  "diagonal", 0.0)


def test_potential_init_at_the_band_centre_lengthens_the_initial_memory() -> None:
    """bk_potential_init 2 puts the sites at the band centre of H: at v = 2 the causal g
    tends (oscillating) to the decaying root of g^2 + i gamma g + 1 = 0, |g| = (sqrt(gamma^2
    + 4) - gamma) / 2 = 0.95 at gamma 0.1, against 0.80 at the band edge, v = 0."""
    gamma = 0.1
    layer = BKLayer(ModelConfig(d_model=8, n_seq=64, bk_potentials=2, bk_shift="learned",
                                bk_readout="features", bk_gamma_init_min=gamma,
                                bk_potential_init=2.0))
    assert layer.potential.bias.tolist() == [2.0, 2.0]
    decay = {}
    for v in (0.0, 2.0):
        g = resolvent_diagonal(torch.full((1, 2, 64), v - 2.0), layer.shift(), causal=True)
        decay[v] = g[0, 1, -16:].abs().mean().item()         # the potential at gamma = 0.1
    assert decay[2.0] == pytest.approx((math.sqrt(gamma**2 + 4) - gamma) / 2, abs=0.005)
    assert decay[0.0] == pytest.approx(0.80, abs=0.005)
    with pytest.raises(ConfigError, match="bk_potential_init must be within"):
        from_flat({"bk_potential_init": 4.0})


def test_open_gates_are_the_ungated_layer_and_closed_ones_cut_the_context() -> None:
    """Gates saturated open (sigmoid -> 1) leave the features layer as it is; a write gate
    shut (-> 0) leaves nothing in the state, so the layer is f alone plus the readout's bias."""
    gated, plain = _layer("gated"), _layer("features")
    gated.load_state_dict(plain.state_dict(), strict=False)
    h = torch.randn(2, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        gated.gates.logit.weight.zero_()
        gated.gates.logit.bias.fill_(50.0)
        torch.testing.assert_close(gated(h)[0], plain(h)[0], rtol=0, atol=1e-12)
        gated.gates.logit.bias[:8].fill_(-50.0)
        f = gated.moe(gated.norm(h))[0]
        torch.testing.assert_close(gated(h)[0], f + gated.scale * gated.features.bias,
                                   rtol=0, atol=1e-12)
