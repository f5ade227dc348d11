"""The five sections of a physlm configuration: model, data, training, physics, criteria.

Plain dataclasses; every default here is the reference configuration of SPEC sections 2 and
4 and the only default in the project (physlm.config groups them in `Config`, reads them
from flat mappings and checks them). Every setting has a unique name across the sections.

Rules about settings are tags on the fields (`setting(...)`):

    RESUMABLE           may change when a run is resumed (epochs, device, ...)
    CONTROL_MAY_DIFFER  may differ between a run and its physics-off control
    WARMUP_INVARIANT    leaves the warmup epochs' computation unchanged

and a renamed key keeps its old name as an alias (`physics` -> `energy_penalty`),
so old parameter files and saved config.yaml files still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

RESUMABLE = "resumable"
CONTROL_MAY_DIFFER = "control_may_differ"
WARMUP_INVARIANT = "warmup_invariant"
# How a run executes, not what it computes: every rule above lets these change.
EXECUTION = (RESUMABLE, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)


def setting(default: Any, *tags: str, alias: str | None = None) -> Any:
    """A dataclass field with its rules (`tags`) and an optional old name (`alias`)."""
    return field(default=default, metadata={"tags": frozenset(tags), "alias": alias})


@dataclass
class ModelConfig:
    # resnet_bk: the model of SPEC section 2; transformer and lstm: the standard baselines.
    architecture: Literal["resnet_bk", "transformer", "lstm"] = "resnet_bk"
    d_model: int = 64
    n_layers: int = 4
    n_seq: int = 128
    num_experts: int = 4
    dropout: float = 0.1
    n_heads: int = 4  # attention heads (transformer)
    bk_mode: Literal["causal", "bidirectional"] = "causal"
    # exact: autograd-consistent; surrogate: the original's blended diagonal (SPEC section 7).
    bk_gradient: Literal["exact", "surrogate"] = "exact"
    # scaled: the chosen expert's output times its router probability, so the gate learns;
    # unscaled: the original's, whose gate gets no gradient (SPEC section 6, flaw 3).
    router: Literal["scaled", "unscaled"] = "scaled"
    koopman: bool = False    # Koopman lift, operator and inverse per layer (physlm.koopman)
    koopman_dim: int = 256
    potential_clamp: float = 3.0
    feature_clamp: float = 10.0
    # Layer variants (physlm.bk_features): P potentials, shifts i or i gamma_c, hopping 1 or from
    # the tokens, read out on the diagonal or (features) applied to D/P features each.
    bk_potentials: int = 1
    bk_shift: Literal["fixed", "learned"] = "fixed"
    bk_coupling: Literal["fixed", "learned"] = "fixed"
    bk_readout: Literal["diagonal", "features"] = "diagonal"
    # Selective write and read gates per feature from the token (bk_readout: features).
    bk_gates: bool = False
    # Learned shifts start geometric from gamma = 1 down to this (physlm.bk_features): the
    # longest initial memory. Above the floor of a learned gamma, 0.01.
    bk_gamma_init_min: float = 0.1
    # Initial bias of the potentials v: 0 starts every site at the band edge of H (the
    # recurrence decays by |g| = 0.80 per site at gamma 0.1), 2 at its centre (0.95; 0.99 at
    # gamma 0.02): the initial memory, as a linear recurrent unit's eigenvalues near 1.
    bk_potential_init: float = 0.0
    moe_balance_weight: float = 0.0  # alpha of the Switch balancing term (ModelOutput)
    energy_heads: bool = True
    # The LM head's weight is the token embedding (Press & Wolf 2017, as the LSTM baseline's):
    # one V x D matrix instead of two, so d_model can grow at the same parameter count.
    tie_embeddings: bool = False
    # The token embedding's width (and the head's); None: d_model. Another width is mapped
    # into the layers' and out of them by a Linear each (no bias): the softmax's rank need
    # not be the residual stream's.
    embedding_dim: int | None = None
    # Token and position embeddings ~ N(0, std^2): 1.0 is nn.Embedding's default, which the
    # original kept (SPEC section 7); 0.02 is GPT-2's.
    embedding_init_std: float = 1.0


# The model settings each architecture reads (physlm.build): a baseline ignores ResNet-BK's,
# ResNet-BK ignores n_heads. A report lists only those of the architecture that ran.
_BASELINE_SETTINGS = ("architecture", "d_model", "n_layers", "n_seq", "dropout")
ARCHITECTURE_SETTINGS: dict[str, tuple[str, ...]] = {
    "resnet_bk": tuple(name for name in ModelConfig.__dataclass_fields__ if name != "n_heads"),
    "transformer": (*_BASELINE_SETTINGS, "n_heads", "embedding_init_std"),
    "lstm": _BASELINE_SETTINGS,
}


@dataclass
class DataConfig:
    dataset: Literal["wikitext-2-raw-v1", "fixture"] = "wikitext-2-raw-v1"
    # Where the data lives; its identity is checked by checksum, not by path.
    data_dir: str | None = setting(None, RESUMABLE, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    train_file: str | None = setting(None, RESUMABLE, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    valid_file: str | None = setting(None, RESUMABLE, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    vocab_size: int = 30_000
    # Train words seen fewer times are <unk> (1: every train word is in the vocabulary, so
    # on the proxy <unk> never occurs in train; physlm.data).
    vocab_min_count: int = 1
    # The last fraction of the train split's lines, held out for tuning and early stopping
    # (0: none, the reference configuration; physlm.data).
    heldout_fraction: float = 0.0
    batch_size: int = 32
    # shuffled: chunks in a seeded random order; stream: batch_size contiguous streams, so
    # that a recurrent model carries its state from one batch to the next (physlm.data).
    batching: Literal["shuffled", "stream"] = "shuffled"
    max_train_batches: int | None = None
    max_eval_batches: int | None = setting(None, RESUMABLE)   # of validation; held-out: all


@dataclass
class TrainConfig:
    # The run's name: its default run directory runs/<name> and report reports/<name>.md.
    # Unset, it is "run-" + a digest of the settings (Config.run_name).
    name: str | None = setting(None, *EXECUTION)
    # No schedule depends on it, except lr_schedule: cosine (Config.is_tagged).
    epochs: int = setting(10, RESUMABLE, WARMUP_INVARIANT)
    lr: float = 1e-3
    # physlm.optim: adamw (fused); sgd (fused; momentum, nesterov); symplectic (relativistic
    # gradient descent: momentum is its conformal factor e^{-gamma h}, symplectic_delta its
    # 1/(mc)^2; 0 is heavy ball). weight_decay: AdamW's decoupled decay, else an L2 term.
    optimizer: Literal["adamw", "sgd", "symplectic"] = "adamw"
    momentum: float = 0.0
    nesterov: bool = False
    symplectic_delta: float = 1.0
    # constant, cosine (to 0 at the last step: depends on epochs) or plateau (lr / 4 after
    # lr_plateau_patience epochs without a lower held-out loss), after a linear warmup.
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"
    lr_warmup_steps: int = 0   # linear learning-rate warmup over the first steps (0: none)
    lr_plateau_patience: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    seed: int = 0
    device: str = setting("auto", *EXECUTION)
    amp: bool = setting(False, RESUMABLE)
    checkpoint_every: int = setting(0, *EXECUTION)
    resume: bool = setting(True, *EXECUTION)
    overwrite: bool = setting(False, *EXECUTION)
    max_bad_steps: int = setting(10, *EXECUTION)
    progress: bool = setting(True, *EXECUTION)


@dataclass
class PhysicsConfig:
    # The physics recipe: the control differs from its run here, and, except for the
    # start and fitting the heads early, none of it acts before physics_start_epoch.
    energy_penalty: bool = setting(True, CONTROL_MAY_DIFFER, WARMUP_INVARIANT, alias="physics")
    physics_start_epoch: int = setting(4, CONTROL_MAY_DIFFER)
    energy_mode: Literal["embedding_pairs", "depth"] = setting(
        "embedding_pairs", CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    # absolute: the reference gap E_b - E_a; relative: the gap over the spread of H.
    energy_scale: Literal["absolute", "relative"] = setting(
        "absolute", CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    # total: one clip of the summed gradient (the reference); separate: the LM and the
    # energy gradients each clipped to grad_clip, so the energy cannot shrink the LM step.
    clip_mode: Literal["total", "separate"] = setting(
        "total", CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    # Train the heads on the energy objective during the warmup, the network detached.
    fit_heads_in_warmup: bool = setting(False, CONTROL_MAY_DIFFER)
    lambda_energy_init: float = setting(0.05, CONTROL_MAY_DIFFER)  # logged in the warmup too
    lambda_lr: float = setting(0.01, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)   # integral gain eta
    lambda_kp: float = setting(0.0, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)    # proportional gain
    lambda_scope: Literal["shared", "per_layer"] = setting(
        "shared", CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    energy_target_drift: float = setting(0.1, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    lambda_min: float = setting(0.01, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    lambda_max: float = setting(10.0, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    # The original's flaw 4: lambda is also an AdamW parameter (gradient mse_l, weight decay).
    lambda_in_optimizer: bool = setting(False, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    # Weight of the Koopman loss (consistency + reconstruction) in physics epochs.
    koopman_weight: float = setting(0.1, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)


@dataclass
class CriteriaConfig:
    """How the report judges a run; none of it changes training."""

    # Physics epochs left out of the steady-state drift (the transient after the switch).
    settle_epochs: int = setting(1, *EXECUTION)
    # Val PPL "matches the control" when |run / control - 1| <= ppl_tolerance.
    ppl_tolerance: float = setting(0.05, *EXECUTION)
    # Heads whose H varies over the batch by less than this (std, energy units) are
    # degenerate: 100x above the float32 rounding of a sum of 128 O(1) outputs (~1e-5).
    min_energy_spread: float = setting(1e-3, *EXECUTION)
