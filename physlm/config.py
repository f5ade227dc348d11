"""One configuration object for a physlm run.

Five plain dataclasses (model, data, training, physics, criteria) grouped in `Config`.
Every setting has a unique name, so a flat mapping such as a YAML parameter
file, papermill parameters or `--set key=value` on the command line addresses
it directly: `{"epochs": 10, "d_model": 64}`. The defaults below are the
reference configuration of SPEC sections 2 and 4 and are the only defaults in
the project; parameter files only override them.

Rules about settings live here too, as tags on the fields (`setting(...)`):

    RESUMABLE           may change when a run is resumed (epochs, device, ...)
    CONTROL_MAY_DIFFER  may differ between a run and its physics-off control
    WARMUP_INVARIANT    leaves the warmup epochs' computation unchanged

and a renamed key keeps its old name as an alias (`physics` -> `energy_penalty`),
so old parameter files and saved config.yaml files still load.
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

from physlm.values import ConfigError, coerce, suggest

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
    energy_heads: bool = True
    # Token and position embeddings ~ N(0, std^2): 1.0 is nn.Embedding's default, which the
    # original kept (SPEC section 7); 0.02 is GPT-2's.
    embedding_init_std: float = 1.0


@dataclass
class DataConfig:
    dataset: Literal["wikitext-2-raw-v1", "fixture"] = "wikitext-2-raw-v1"
    # Where the data lives; its identity is checked by checksum, not by path.
    data_dir: str | None = setting(None, RESUMABLE, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    train_file: str | None = setting(None, RESUMABLE, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    valid_file: str | None = setting(None, RESUMABLE, CONTROL_MAY_DIFFER, WARMUP_INVARIANT)
    vocab_size: int = 30_000
    batch_size: int = 32
    # shuffled: chunks in a seeded random order; stream: batch_size contiguous streams, so
    # that a recurrent model carries its state from one batch to the next (physlm.data).
    batching: Literal["shuffled", "stream"] = "shuffled"
    max_train_batches: int | None = None
    max_eval_batches: int | None = setting(None, RESUMABLE)


@dataclass
class TrainConfig:
    # The run's name: its default run directory runs/<name> and report reports/<name>.md.
    # Unset, it is "run-" + a digest of the settings (Config.run_name).
    name: str | None = setting(None, *EXECUTION)
    epochs: int = setting(10, RESUMABLE, WARMUP_INVARIANT)  # no schedule depends on it
    lr: float = 1e-3
    lr_warmup_steps: int = 0   # linear learning-rate warmup over the first steps (0: none)
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
            (d.vocab_size >= 3, "vocab_size must be >= 3 (<pad>, <unk> and one word)"),
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
            (t.weight_decay >= 0, "weight_decay must be >= 0"),
            (t.grad_clip > 0, "grad_clip must be > 0"),
            (0 <= t.seed < 2**32, "seed must be in [0, 2**32)"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
             f"device must be 'auto', 'cpu' or 'cuda[:N]', got {t.device!r}"),
            (t.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: only at epoch ends)"),
            (t.max_bad_steps >= 1, "max_bad_steps must be >= 1"),
            (p.physics_start_epoch >= 0, "physics_start_epoch must be >= 0"),
            (p.physics_start_epoch <= t.epochs,
             f"physics_start_epoch ({p.physics_start_epoch}) > epochs ({t.epochs}): physics "
             "would never run; lower it, or set energy_penalty: false for a run without it"),
            (m.embedding_init_std > 0, "embedding_init_std must be > 0"),
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

    @property
    def trains_with_physics(self) -> bool:
        """Whether any epoch trains with the energy penalty."""
        return self.is_physics_epoch(self.train.epochs - 1)

    def is_physics_epoch(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0-based) adds the auxiliary loss (the energy penalty, or
        the Koopman loss) to the LM loss."""
        auxiliary = self.physics.energy_penalty or self.model.koopman
        return auxiliary and epoch >= self.physics.physics_start_epoch

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
        identity = {k: v for k, v in self.to_flat().items() if RESUMABLE not in TAGS[k]}
        digest = hashlib.sha256(yaml.safe_dump(identity, sort_keys=True).encode()).hexdigest()
        return f"run-{digest[:8]}"

    def control(self) -> Config:
        """The baseline: the same model, data, seed and budget with the penalty off."""
        return from_flat({"energy_penalty": False}, base=self)

    def differences(self, other: Config, allowed: str) -> dict[str, tuple[Any, Any]]:
        """Settings not tagged `allowed` whose values differ: key -> (self's, other's)."""
        mine, theirs = self.to_flat(), other.to_flat()
        return {key: (mine[key], theirs[key]) for key in KEYS
                if allowed not in TAGS[key] and mine[key] != theirs[key]}


_SECTIONS = ("model", "data", "train", "physics", "criteria")
_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                  "physics": PhysicsConfig, "criteria": CriteriaConfig}
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


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML parameter file (the format papermill's `-f` takes)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"parameter file {path} is a directory; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (undecodable byte at offset "
                          f"{error.start}); re-encode it to UTF-8") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of parameter: value")
    return values


def load_config(params_file: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the parameter file, then overrides; validated once."""
    values = read_params_file(params_file) if params_file else {}
    values.update(overrides or {})
    return from_flat(values)
