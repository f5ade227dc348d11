"""The scale parameter files (issue "Scale"): each loads into a valid configuration, and its
model runs one forward pass at the file's n_seq (a tiny vocabulary keeps it fast)."""

from pathlib import Path

import pytest
import torch

from physlm.build import build_model
from physlm.config import load_config

PARAMS = Path(__file__).resolve().parents[1] / "params"
SCALE_FILES = ["scale_d256.yaml", "long_context.yaml",
               *sorted(p.name for p in PARAMS.glob("long_context_*.yaml"))]
REFERENCE_TOKENS = 32 * 128   # tokens per batch of the reference configuration


def test_there_is_a_longer_context_file():
    assert len(SCALE_FILES) >= 3


@pytest.mark.parametrize("name", SCALE_FILES)
def test_params_file_builds_a_model_that_runs_at_its_n_seq(name):
    config = load_config(PARAMS / name, {"vocab_size": 64})
    assert config.train.name == Path(name).stem
    model, penalty = build_model(config, config.data.vocab_size)
    n = config.model.n_seq
    x = torch.randint(0, config.data.vocab_size, (1, n + 1),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x[:, :-1], x[:, 1:])
    assert out.loss.isfinite()
    assert len(out.hidden_states) == config.model.n_layers + 1
    assert out.hidden_states[-1].shape == (1, n, config.model.d_model)
    if name.startswith("long_context"):
        # a batch keeps the reference's 32 x 128 tokens, or one sequence when that is more
        assert config.data.batch_size == max(1, REFERENCE_TOKENS // n)
    if name == "scale_d256.yaml":
        assert (config.model.d_model, config.model.n_layers) == (256, 8)
        assert penalty is not None   # the reference recipe: physics on, energy heads built
