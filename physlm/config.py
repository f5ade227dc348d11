"""One configuration object for a physlm run.

Four plain dataclasses (model, data, training, physics) grouped in `Config`.
Every setting has a unique name, so a flat mapping such as a YAML parameter
file, papermill parameters or `--set key=value` on the command line addresses
it directly: `{"epochs": 10, "d_model": 64}`. The defaults below are the
reference configuration of SPEC sections 2 and 4 and are the only defaults in
the project; parameter files only override them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type, or out of range."""


@dataclass
class ModelConfig:
    d_model: int = 64
    n_layers: int = 4
    n_seq: int = 128
    num_experts: int = 4
    dropout: float = 0.1
    bk_mode: Literal["causal", "bidirectional"] = "causal"
    potential_clamp: float = 3.0
    feature_clamp: float = 10.0
    energy_heads: bool = True


@dataclass
class DataConfig:
    dataset: Literal["wikitext-2-raw-v1", "fixture"] = "wikitext-2-raw-v1"
    data_dir: str | None = None
    train_file: str | None = None
    valid_file: str | None = None
    vocab_size: int = 30_000
    batch_size: int = 32
    max_train_batches: int | None = None
    max_eval_batches: int | None = None


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    checkpoint_every: int = 0
    resume: bool = True
    overwrite: bool = False
    max_bad_steps: int = 10
    progress: bool = True


@dataclass
class PhysicsConfig:
    physics: bool = True
    physics_start_epoch: int = 4
    energy_mode: Literal["embedding_pairs", "depth"] = "embedding_pairs"
    lambda_energy_init: float = 0.05
    lambda_lr: float = 0.01
    energy_target_drift: float = 0.1
    lambda_min: float = 0.01
    lambda_max: float = 10.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    physics: PhysicsConfig = field(default_factory=PhysicsConfig)

    def to_flat(self) -> dict[str, Any]:
        """All settings as one flat mapping, in section order."""
        flat: dict[str, Any] = {}
        for section in _SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_flat(), sort_keys=False))

    def validate(self) -> Config:
        """Check ranges and cross-field constraints; return self."""
        m, d, t, p = self.model, self.data, self.train, self.physics
        checks = [
            (m.d_model >= 1, "d_model must be >= 1"),
            (m.n_layers >= 1, "n_layers must be >= 1"),
            (m.n_seq >= 2, "n_seq must be >= 2 (a sequence needs an input and a target)"),
            (m.num_experts >= 1, "num_experts must be >= 1"),
            (0.0 <= m.dropout < 1.0, "dropout must be in [0, 1)"),
            (m.potential_clamp > 0, "potential_clamp must be > 0"),
            (m.feature_clamp > 0, "feature_clamp must be > 0"),
            (d.vocab_size >= 3, "vocab_size must be >= 3 (<pad>, <unk> and one word)"),
            (d.batch_size >= 1, "batch_size must be >= 1"),
            (d.max_train_batches is None or d.max_train_batches >= 1,
             "max_train_batches must be >= 1, or empty for all batches"),
            (d.max_eval_batches is None or d.max_eval_batches >= 1,
             "max_eval_batches must be >= 1, or empty for all batches"),
            (t.epochs >= 1, "epochs must be >= 1"),
            (t.lr > 0, "lr must be > 0"),
            (t.weight_decay >= 0, "weight_decay must be >= 0"),
            (t.grad_clip > 0, "grad_clip must be > 0"),
            (0 <= t.seed < 2**32, "seed must be in [0, 2**32)"),
            (t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
             f"device must be 'auto', 'cpu' or 'cuda[:N]', got {t.device!r}"),
            (t.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: only at epoch ends)"),
            (t.max_bad_steps >= 1, "max_bad_steps must be >= 1"),
            (p.physics_start_epoch >= 0, "physics_start_epoch must be >= 0"),
            (p.physics_start_epoch <= t.epochs,
             f"physics_start_epoch ({p.physics_start_epoch}) > epochs ({t.epochs}): physics "
             "would never run; lower it, or set physics: false for a run without physics"),
            (p.lambda_min > 0, "lambda_min must be > 0"),
            (p.lambda_min <= p.lambda_max, "lambda_min must be <= lambda_max"),
            (p.lambda_min <= p.lambda_energy_init <= p.lambda_max,
             "lambda_energy_init must lie in [lambda_min, lambda_max]"),
            (p.lambda_lr >= 0, "lambda_lr must be >= 0"),
            (p.energy_target_drift >= 0, "energy_target_drift must be >= 0"),
            (not (p.physics and not m.energy_heads),
             "physics: true needs energy_heads: true (the energy heads define H = T + V)"),
        ]
        checks += [(math.isfinite(value), f"{name} must be a finite number, got {value}")
                   for section in (m, d, t, p)
                   for name, value in dataclasses.asdict(section).items()
                   if isinstance(value, float)]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
        return self

    @property
    def physics_runs(self) -> bool:
        """Whether any epoch trains with the energy penalty."""
        return self.physics.physics and self.physics.physics_start_epoch < self.train.epochs

    def physics_active(self, epoch: int) -> bool:
        return self.physics.physics and epoch >= self.physics.physics_start_epoch


_SECTIONS = ("model", "data", "train", "physics")
_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                  "physics": PhysicsConfig}
# Flat key -> (section, resolved field type).
_FIELDS: dict[str, tuple[str, Any]] = {
    f.name: (section, typing.get_type_hints(cls)[f.name])
    for section, cls in _SECTION_TYPES.items()
    for f in dataclasses.fields(cls)
}
KEYS: tuple[str, ...] = tuple(_FIELDS)


def suggest(key: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Return `value` as the type `hint` asks for, or raise ConfigError.

    Ints are accepted where floats are expected, and numeric strings where
    numbers are expected (YAML reads `1e-3` as a string; the CLI passes text).
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        if value == "" and type(None) in options:
            return None  # papermill and CLI users write "empty" as ""
        (inner,) = [o for o in options if o is not type(None)]
        return coerce(key, value, inner)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}"
                              + (suggest(str(value), choices) if isinstance(value, str) else ""))
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a new field type without a coercion rule
        raise TypeError(f"no coercion rule for {key}: {hint}")
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def from_flat(values: dict[str, Any], base: Config | None = None) -> Config:
    """Build a validated Config from flat `key: value` overrides of `base`."""
    config = dataclasses.replace(base) if base else Config()
    sections = {s: dataclasses.asdict(getattr(config, s)) for s in _SECTIONS}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"parameter names are text, got {type(key).__name__} {key!r}; "
                              f"valid names are listed in physlm.config.KEYS")
        if key not in _FIELDS:
            raise ConfigError(f"unknown parameter {key!r}{suggest(key, KEYS)}")
        section, hint = _FIELDS[key]
        sections[section][key] = coerce(key, value, hint)
    built = Config(**{s: _SECTION_TYPES[s](**sections[s]) for s in _SECTIONS})
    return built.validate()


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML parameter file (the format papermill's `-f` takes)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
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


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse a command-line `key=value`; the value is read as YAML (`2`, `1e-3`, `true`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"expected key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{text}: {raw!r} is not a valid YAML value ({problem}); fix it, "
                          "or quote it to pass it as text") from error
    return key, value
