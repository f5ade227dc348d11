"""One configuration object for a physlm run.

The five sections (physlm.sections: model, data, training, physics, criteria) grouped in
`Config`. Every setting has a unique name, so a flat mapping such as a YAML parameter
file, papermill parameters or `--set key=value` on the command line addresses
it directly: `{"epochs": 10, "d_model": 64}`. The sections' defaults are the
reference configuration of SPEC sections 2 and 4 and are the only defaults in
the project; parameter files only override them. Here: the checks of ranges and of
settings that depend on each other (`Config.validate`), the rules that follow from the
settings (the physics schedule, the control, the run's name), and reading flat mappings
(`from_flat`, `load_config`). The sections' types are re-exported: `from physlm.config
import TrainConfig` keeps working; the tags are physlm.sections'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from physlm.errors import ConfigError
from physlm.sections import (
    RESUMABLE,
    CriteriaConfig,
    DataConfig,
    ModelConfig,
    PhysicsConfig,
    TrainConfig,
)
from physlm.values import coerce, read_params_file, suggest

# Where runs and reports go unless run_dir or report_dir say otherwise (the working directory's).
RUNS_ROOT = "runs"
REPORTS_ROOT = "reports"

@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    physics: PhysicsConfig = field(default_factory=PhysicsConfig)
    criteria: CriteriaConfig = field(default_factory=CriteriaConfig)

    def to_flat(self) -> dict[str, Any]:
        """All settings as one flat mapping, in section order."""
        flat: dict[str, Any] = {}
        for section in _SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat

    def validate(self) -> Config:
        """Check ranges and cross-field constraints; return self."""
        m, d, t, p, c = self.model, self.data, self.train, self.physics, self.criteria
        checks = [
            (m.d_model >= 1, "d_model must be >= 1"),
            (m.n_layers >= 1, "n_layers must be >= 1"),
            (m.n_seq >= 2, "n_seq must be >= 2 (a sequence needs an input and a target)"),
            (m.num_experts >= 1, "num_experts must be >= 1"),
            (m.n_heads >= 1 and m.d_model % m.n_heads == 0,
             "n_heads must be >= 1 and divide d_model"),
            (m.architecture == "resnet_bk" or not m.energy_heads,
             f"energy_heads: true needs architecture: resnet_bk (got {m.architecture})"),
            (0.0 <= m.dropout < 1.0, "dropout must be in [0, 1)"),
            (m.potential_clamp > 0, "potential_clamp must be > 0"),
            (m.architecture == "resnet_bk" or not m.koopman,
             f"koopman: true needs architecture: resnet_bk (got {m.architecture})"),
            (m.koopman_dim >= 1, "koopman_dim must be >= 1"),
            (p.koopman_weight >= 0, "koopman_weight must be >= 0"),
            (m.feature_clamp > 0, "feature_clamp must be > 0"),
            (m.bk_potentials >= 1 and (m.bk_readout == "diagonal"
                                       or m.d_model % m.bk_potentials == 0),
             "bk_potentials must be >= 1, and divide d_model with bk_readout: features"),
            (m.bk_readout == "features" or not m.bk_gates,
             "bk_gates: true gates the resolvent on the features: it needs bk_readout: features"),
            (m.bk_gradient == "exact" or (m.bk_potentials, m.bk_shift, m.bk_coupling,
                                          m.bk_readout) == (1, "fixed", "fixed", "diagonal"),
             "bk_gradient: surrogate is the original's layer: it needs the default bk_* settings"),
            (0.01 < m.bk_gamma_init_min <= 1, "bk_gamma_init_min must be in (0.01, 1] (above "
             "the floor of a learned gamma, at most the reference shift)"),
            (m.architecture == "resnet_bk" or not m.tie_embeddings,
             f"tie_embeddings: true needs architecture: resnet_bk (the LSTM's head is always "
             f"tied; got {m.architecture})"),
            (abs(m.bk_potential_init) <= m.potential_clamp,
             "bk_potential_init must be within +- potential_clamp (the potentials' range)"),
            (m.moe_balance_weight >= 0, "moe_balance_weight must be >= 0"),
            (m.architecture == "resnet_bk" or m.moe_balance_weight == 0,
             f"moe_balance_weight > 0 needs architecture: resnet_bk, whose layers have experts "
             f"(got {m.architecture})"),
            (d.vocab_size >= 3, "vocab_size must be >= 3 (<pad>, <unk> and one word)"),
            (d.vocab_min_count >= 1, "vocab_min_count must be >= 1"),
            (0 <= d.heldout_fraction < 1, "heldout_fraction must be in [0, 1) (0: none)"),
            (d.batch_size >= 1, "batch_size must be >= 1"),
            (d.max_train_batches is None or d.max_train_batches >= 1,
             "max_train_batches must be >= 1, or empty for all batches"),
            (d.max_eval_batches is None or d.max_eval_batches >= 1,
             "max_eval_batches must be >= 1, or empty for all batches"),
            (t.name is None or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", t.name) is not None,
             f"name must be letters, digits, '.', '_' or '-' (a file name), got {t.name!r}"),
            (t.epochs >= 1, "epochs must be >= 1"),
            (t.lr > 0, "lr must be > 0"),
            (t.lr_warmup_steps >= 0, "lr_warmup_steps must be >= 0"),
            (0 <= t.momentum < 1, "momentum must be in [0, 1)"),
            (t.momentum == 0 or t.optimizer != "adamw", "momentum is for sgd and symplectic; "
             "adamw has its own (betas)"),
            (not t.nesterov or (t.optimizer == "sgd" and t.momentum > 0),
             "nesterov: true needs optimizer: sgd and momentum > 0"),
            (t.symplectic_delta >= 0, "symplectic_delta must be >= 0 (0: classical momentum)"),
            (t.lr_plateau_patience >= 0, "lr_plateau_patience must be >= 0"),
            (t.lr_schedule != "plateau" or d.heldout_fraction > 0, "lr_schedule: plateau "
             "needs heldout_fraction > 0 (it watches the held-out loss, never validation)"),
            (t.weight_decay >= 0, "weight_decay must be >= 0"),
            (t.grad_clip > 0, "grad_clip must be > 0"),
            (0 <= t.seed < 2**32, "seed must be in [0, 2**32)"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
             f"device must be 'auto', 'cpu' or 'cuda[:N]', got {t.device!r}"),
            (t.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: only at epoch ends)"),
            (t.max_bad_steps >= 1, "max_bad_steps must be >= 1"),
            (p.physics_start_epoch >= 0, "physics_start_epoch must be >= 0"),
            (p.physics_start_epoch <= t.epochs or not self.has_physics,
             f"physics_start_epoch ({p.physics_start_epoch}) > epochs ({t.epochs}): physics "
             "would never run; lower it, or set energy_penalty: false (and koopman: false) "
             "for a run without it"),
            (m.embedding_init_std > 0, "embedding_init_std must be > 0"),
            (m.embedding_dim is None or m.embedding_dim >= 1, "embedding_dim must be >= 1"),
            (m.architecture != "lstm" or m.embedding_init_std == ModelConfig.embedding_init_std,
             "embedding_init_std does not apply to lstm (its embedding is uniform in (-0.1, "
             "0.1), word_language_model's); leave it unset"),
            (p.lambda_min >= 0, "lambda_min must be >= 0"),
            (p.lambda_kp >= 0, "lambda_kp must be >= 0"),
            (not (p.fit_heads_in_warmup and p.energy_scale == "absolute"),
             "fit_heads_in_warmup needs energy_scale: relative (on the absolute energy the "
             "heads would fit by collapsing to constants)"),
            (c.settle_epochs >= 0, "settle_epochs must be >= 0"),
            (c.ppl_tolerance > 0, "ppl_tolerance must be > 0"),
            (c.min_energy_spread >= 0, "min_energy_spread must be >= 0"),
            (p.lambda_min <= p.lambda_max, "lambda_min must be <= lambda_max"),
            (p.lambda_min <= p.lambda_energy_init <= p.lambda_max,
             "lambda_energy_init must lie in [lambda_min, lambda_max]"),
            (p.lambda_lr >= 0, "lambda_lr must be >= 0"),
            (p.energy_target_drift >= 0, "energy_target_drift must be >= 0"),
            (not (p.energy_penalty and not m.energy_heads),
             "energy_penalty: true needs energy_heads: true (the heads define H = T + V)"),
        ]
        checks += [(math.isfinite(value), f"{name} must be a finite number, got {value}")
                   for section in (m, d, t, p, c)
                   for name, value in dataclasses.asdict(section).items()
                   if isinstance(value, float)]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
        return self

    # The physics schedule, one rule: the objectives that follow it (the energy penalty, the
    # Koopman loss) act from epoch physics_start_epoch on; the epochs before are the warmup.
    @property
    def has_physics(self) -> bool:
        """Whether the run has an objective on the physics schedule (energy penalty, Koopman
        loss); without one, every epoch is warmup and physics_start_epoch may lie anywhere."""
        return self.physics.energy_penalty or self.model.koopman

    def is_physics_epoch(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0-based) adds the physics objectives to the LM loss."""
        return self.has_physics and epoch >= self.physics.physics_start_epoch

    @property
    def trains_with_physics(self) -> bool:
        """Whether any epoch trains with the physics objectives."""
        return self.is_physics_epoch(self.train.epochs - 1)

    @property
    def warmup_epochs(self) -> int:
        """Epochs before physics_start_epoch, at most all: where the warmup stage ends and
        the run keeps the checkpoint that a control or sibling run forks from."""
        return min(self.physics.physics_start_epoch, self.train.epochs)

    def phase(self, epoch: int) -> Literal["warmup", "physics"]:
        return "physics" if self.is_physics_epoch(epoch) else "warmup"

    @property
    def spread_floor(self) -> float:
        """The spread of H over a batch (std, energy units) at or below which a layer's
        energy constraint is degenerate. On the absolute scale the drift target counts too:
        if H varies less than the target, any two states meet it."""
        floor = self.criteria.min_energy_spread
        if self.physics.energy_scale == "absolute":
            floor = max(floor, self.physics.energy_target_drift)
        return floor

    @property
    def run_name(self) -> str:
        """`name`, or "run-" + a digest of the settings a resume may not change, so that
        different experiments never share a default run directory or report."""
        if self.train.name:
            return self.train.name
        identity = {k: v for k, v in self.to_flat().items() if not self.is_tagged(k, RESUMABLE)}
        digest = hashlib.sha256(yaml.safe_dump(identity, sort_keys=True).encode()).hexdigest()
        return f"run-{digest[:8]}"

    def control(self) -> Config:
        """The baseline: the same model, data, seed and budget with the penalty off."""
        return from_flat({"energy_penalty": False}, base=self)

    def is_tagged(self, key: str, tag: str) -> bool:
        """Whether setting `key` carries `tag` in this configuration: its field's tags, except
        that `epochs` sets a cosine schedule's length, so then changes the computation."""
        return tag in TAGS[key] and not (key == "epochs" and self.train.lr_schedule == "cosine")

    def differences(self, other: Config, allowed: str) -> dict[str, tuple[Any, Any]]:
        """Settings not tagged `allowed` (in both) whose values differ: key -> (self's,
        other's)."""
        mine, theirs = self.to_flat(), other.to_flat()
        return {key: (mine[key], theirs[key]) for key in KEYS if mine[key] != theirs[key]
                and not (self.is_tagged(key, allowed) and other.is_tagged(key, allowed))}


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                  "physics": PhysicsConfig, "criteria": CriteriaConfig}
_SECTIONS = tuple(_SECTION_TYPES)
# Flat key -> (section, resolved field type); its tags; old name -> key.
_FIELDS: dict[str, tuple[str, Any]] = {
    f.name: (section, typing.get_type_hints(cls)[f.name])
    for section, cls in _SECTION_TYPES.items()
    for f in dataclasses.fields(cls)
}
_ALL_FIELDS = [f for cls in _SECTION_TYPES.values() for f in dataclasses.fields(cls)]
TAGS: dict[str, frozenset[str]] = {f.name: f.metadata.get("tags", frozenset())
                                   for f in _ALL_FIELDS}
ALIASES: dict[str, str] = {f.metadata["alias"]: f.name for f in _ALL_FIELDS
                           if f.metadata.get("alias")}
KEYS: tuple[str, ...] = tuple(_FIELDS)


def keys_tagged(tag: str) -> frozenset[str]:
    """The settings that carry `tag` (RESUMABLE, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)."""
    return frozenset(key for key in KEYS if tag in TAGS[key])


def from_flat(values: dict[str, Any], base: Config | None = None) -> Config:
    """Build a validated Config from flat `key: value` overrides of `base`."""
    config = dataclasses.replace(base) if base else Config()
    sections = {s: dataclasses.asdict(getattr(config, s)) for s in _SECTIONS}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"parameter names are text, got {type(key).__name__} {key!r}; "
                              f"valid names are listed in physlm.config.KEYS")
        if key in ALIASES:
            if ALIASES[key] in values:
                raise ConfigError(f"{key!r} is the old name of {ALIASES[key]!r}; give one")
            key = ALIASES[key]
        if key not in _FIELDS:
            raise ConfigError(f"unknown parameter {key!r}{suggest(key, KEYS)}")
        section, hint = _FIELDS[key]
        sections[section][key] = coerce(key, value, hint)
    built = Config(**{s: _SECTION_TYPES[s](**sections[s]) for s in _SECTIONS})
    return built.validate()


def load_config(params_file: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the parameter file, then overrides; validated once."""
    values = read_params_file(params_file) if params_file else {}
    values.update(overrides or {})
    return from_flat(values)
