"""The config loader: defaults, overrides, validation messages, round trip."""

import pytest
import yaml

from physlm.config import KEYS, Config, ConfigError, from_flat, keys_tagged, load_config
from physlm.runs import RunDirectory
from physlm.sections import CONTROL_MAY_DIFFER, RESUMABLE, WARMUP_INVARIANT
from physlm.values import parse_assignment


def test_defaults_are_the_reference_configuration():
    config = Config().validate()
    assert (config.model.d_model, config.model.n_layers, config.model.n_seq) == (64, 4, 128)
    assert config.model.num_experts == 4 and config.model.bk_mode == "causal"
    assert (config.data.vocab_size, config.data.batch_size) == (30_000, 32)
    assert (config.train.epochs, config.train.lr, config.train.grad_clip) == (10, 1e-3, 0.5)
    physics = config.physics
    assert (physics.physics_start_epoch, physics.lambda_energy_init) == (4, 0.05)
    assert (physics.lambda_lr, physics.energy_target_drift) == (0.01, 0.1)
    assert (physics.lambda_min, physics.lambda_max) == (0.01, 10.0)


def test_flat_keys_are_unique_and_round_trip(tmp_path):
    assert len(KEYS) == len(set(KEYS))
    config = from_flat({"epochs": 3, "physics_start_epoch": 1, "d_model": 16, "lr": 0.002})
    RunDirectory(tmp_path).write_config(config)  # a run's config.yaml is a parameter file
    again = load_config(tmp_path / "config.yaml")
    assert again == config == RunDirectory(tmp_path).read_config()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["d_model"] == 16


def test_params_file_then_overrides(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("epochs: 6\nlr: 1e-3\nbatch_size: 8\n")  # YAML reads 1e-3 as a string
    config = load_config(params, {"batch_size": 4})
    assert config.train.epochs == 6 and config.train.lr == pytest.approx(1e-3)
    assert config.data.batch_size == 4


@pytest.mark.parametrize(("values", "message"), [
    ({"epoch": 3}, "did you mean 'epochs'"),
    ({"lamda_lr": 0.1}, "did you mean 'lambda_lr'"),
    ({"epochs": "ten"}, "epochs: expected int"),
    ({"dropout": "high"}, "dropout: expected float"),
    ({"amp": 3}, "amp: expected bool"),
    ({"bk_mode": "causl"}, "did you mean 'causal'"),
    ({"physics_start_epoch": 11}, "physics would never run"),
    ({"n_seq": 1}, "n_seq must be >= 2"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"vocab_min_count": 0}, "vocab_min_count must be >= 1"),
    ({"optimizer": "adam"}, "did you mean 'adamw'"),
    ({"lr_schedule": "cosin"}, "did you mean 'cosine'"),
    ({"optimizer": "sgd", "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"momentum": 0.9}, "momentum is for sgd and symplectic"),
    ({"optimizer": "sgd", "nesterov": True}, "nesterov: true needs optimizer: sgd and momentum"),
    ({"optimizer": "symplectic", "momentum": 0.9, "nesterov": True}, "nesterov: true needs"),
    ({"symplectic_delta": -1.0}, "symplectic_delta must be >= 0"),
    ({"lr_plateau_patience": -1}, "lr_plateau_patience must be >= 0"),
    ({"lr_schedule": "plateau"}, "plateau needs heldout_fraction > 0"),
    ({"heldout_fraction": 1.0}, r"heldout_fraction must be in \[0, 1\)"),
    ({"heldout_fraction": -0.1}, r"heldout_fraction must be in \[0, 1\)"),
    ({"lr": -1}, "lr must be > 0"),
    ({"device": "tpu"}, "device must be"),
    ({"lambda_energy_init": 20}, "lambda_energy_init must lie in"),
    ({"physics": True, "energy_heads": False}, "needs energy_heads"),
])
def test_bad_values_are_explained(values, message):
    with pytest.raises(ConfigError, match=message):
        from_flat(values)


def test_physics_start_equal_to_epochs_is_allowed():
    config = from_flat({"epochs": 4, "physics_start_epoch": 4})
    assert not config.trains_with_physics
    assert from_flat({"epochs": 5, "physics_start_epoch": 4}).trains_with_physics


def test_physics_start_past_the_end_is_allowed_only_without_a_physics_objective():
    """One rule (Config.has_physics): an LSTM or a control of 3 epochs may keep the default
    physics_start_epoch 4; an energy penalty or a Koopman loss that would never run may not."""
    off = {"energy_heads": False, "energy_penalty": False, "epochs": 3}
    for values in (off, {**off, "architecture": "lstm"}, {"energy_penalty": False, "epochs": 3}):
        config = from_flat(values)
        assert config.physics.physics_start_epoch > config.train.epochs
        assert not config.has_physics and config.warmup_epochs == 3
        assert [config.phase(e) for e in range(3)] == ["warmup"] * 3
    for values in ({"epochs": 3}, {**off, "koopman": True}):
        with pytest.raises(ConfigError, match="physics would never run"):
            from_flat(values)


def test_an_lstm_refuses_an_embedding_scale_it_would_ignore():
    with pytest.raises(ConfigError, match="embedding_init_std does not apply to lstm"):
        from_flat({"architecture": "lstm", "energy_heads": False, "energy_penalty": False,
                   "embedding_init_std": 0.02})


def test_empty_string_means_unset_for_optional_values():
    config = from_flat({"max_train_batches": "", "data_dir": None})
    assert config.data.max_train_batches is None and config.data.data_dir is None


def test_missing_and_malformed_params_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


def test_command_line_assignments():
    assert parse_assignment("epochs=2") == ("epochs", 2)
    assert parse_assignment("lr=1e-3")[1] in ("1e-3", 0.001)
    assert parse_assignment("physics=false") == ("physics", False)
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("epochs")


# A config.yaml as physlm wrote it before `physics` was renamed `energy_penalty`.
OLD_CONFIG_YAML = """\
d_model: 64
n_layers: 4
n_seq: 128
num_experts: 4
dropout: 0.1
bk_mode: causal
potential_clamp: 3.0
feature_clamp: 10.0
energy_heads: true
dataset: wikitext-2-raw-v1
data_dir: ../shared/data/wikitext-2-raw
train_file: null
valid_file: null
vocab_size: 30000
batch_size: 32
max_train_batches: null
max_eval_batches: null
epochs: 6
lr: 0.001
weight_decay: 0.01
grad_clip: 0.5
seed: 0
device: auto
amp: false
checkpoint_every: 0
resume: true
overwrite: false
max_bad_steps: 10
progress: true
physics: false
physics_start_epoch: 2
energy_mode: embedding_pairs
lambda_energy_init: 0.05
lambda_lr: 0.01
energy_target_drift: 0.1
lambda_min: 0.01
lambda_max: 10.0
"""


def test_a_config_yaml_written_before_the_rename_loads(tmp_path):
    run = RunDirectory(tmp_path)
    run.config.write_text(OLD_CONFIG_YAML)
    config = run.read_config()
    assert config.physics.energy_penalty is False and config.train.epochs == 6
    assert config.data.data_dir == "../shared/data/wikitext-2-raw"
    run.write_config(config)  # saved again under the new name, it loads to the same config
    assert "energy_penalty: false" in run.config.read_text() and run.read_config() == config


def test_an_old_name_and_its_new_name_together_are_refused():
    with pytest.raises(ConfigError, match="'physics' is the old name of 'energy_penalty'"):
        from_flat({"physics": True, "energy_penalty": False})


def test_setting_rules_are_declared_on_the_fields():
    """The three rules that used to be lists in three modules, now tags on the fields."""
    judging = {"name", "settle_epochs", "ppl_tolerance", "min_energy_spread"}  # no training
    assert keys_tagged(RESUMABLE) == {"epochs", "device", "amp", "progress", "checkpoint_every",
                                      "resume", "overwrite", "max_bad_steps",
                                      "max_eval_batches", "data_dir", "train_file",
                                      "valid_file"} | judging  # the data: checked by sha256
    assert keys_tagged(CONTROL_MAY_DIFFER) == {
        "energy_penalty", "physics_start_epoch", "energy_mode", "lambda_energy_init",
        "lambda_lr", "energy_target_drift", "lambda_min", "lambda_max", "device", "progress",
        "resume", "overwrite", "checkpoint_every", "max_bad_steps", "data_dir", "train_file",
        "valid_file", "energy_scale", "clip_mode", "fit_heads_in_warmup", "lambda_kp",
        "lambda_scope", "lambda_in_optimizer", "koopman_weight"} | judging
    # Nothing that shapes the model, the data or the optimisation leaves the warmup alone.
    assert not keys_tagged(WARMUP_INVARIANT) & {"d_model", "seed", "lr", "batch_size",
                                                "physics_start_epoch", "max_train_batches",
                                                "fit_heads_in_warmup", "lambda_energy_init",
                                                "bk_mode", "bk_gradient", "router", "koopman"}


def test_control_and_differences():
    config = from_flat({"epochs": 5, "lr": 2e-3})
    control = config.control()
    assert not control.trains_with_physics and config.trains_with_physics
    assert config.differences(control, allowed=CONTROL_MAY_DIFFER) == {}
    assert config.differences(control, allowed=RESUMABLE) == {"energy_penalty": (True, False)}
    assert [config.phase(e) for e in range(5)] == ["warmup"] * 4 + ["physics"]


def test_epochs_is_no_longer_resumable_under_a_cosine_schedule():
    """A cosine schedule runs to zero at the last epoch: more epochs change every step."""
    constant = from_flat({"epochs": 5})
    assert constant.differences(from_flat({"epochs": 8}), allowed=RESUMABLE) == {}
    assert constant.run_name == from_flat({"epochs": 8}).run_name
    cosine = from_flat({"epochs": 5, "lr_schedule": "cosine"})
    longer = from_flat({"epochs": 8, "lr_schedule": "cosine"})
    for tag in (RESUMABLE, WARMUP_INVARIANT):
        assert cosine.differences(longer, allowed=tag) == {"epochs": (5, 8)}
    assert cosine.run_name != longer.run_name
    assert constant.differences(cosine, allowed=RESUMABLE) == {
        "lr_schedule": ("constant", "cosine")}
