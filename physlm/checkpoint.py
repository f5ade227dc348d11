"""Checkpoints: written atomically, read without ever executing code.

A checkpoint holds everything that determines the rest of a run: model and
optimizer state (the multipliers are model parameters), the learning-rate schedule's
state, the position in the run (next epoch, batches done in it, global step), the RNG
states, and the previous batch's embeddings that the reference energy term compares
against (each auxiliary objective's own state, physlm.objectives). The best epoch's
checkpoint holds the model's weights alone (physlm.trainer); the same format, so that
whatever reads weights reads both.
It is loaded with `torch.load(..., weights_only=True)`, so a foreign file can
fail to load but never run code. A checkpoint of an older format is refused for training
(it lacks a state the run needs to continue exactly); its weights stay readable
(`WEIGHT_FORMATS`), as the model's state did not change.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from physlm.errors import CheckpointError
from physlm.files import atomic_write_bytes

# 2: the auxiliary objectives' states under "objectives"; 3: the schedule's under "schedule".
FORMAT = "physlm-checkpoint-3"
# What each older format lacks, to continue a run from it exactly.
LACKS = {"physlm-checkpoint-1": "the auxiliary objectives' states",
         "physlm-checkpoint-2": "the learning-rate schedule's state"}
# Formats whose "model" this code reads (for sampling): the model's state is unchanged.
WEIGHT_FORMATS = (FORMAT, "physlm-checkpoint-2")


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files left by a process killed while writing `path`."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    _remove_stale_temporaries(path)
    atomic_write_bytes(path, buffer.getvalue())


def _first_sentence(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text.split(". ")[0].rstrip(".")[:200]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu",
                    formats: tuple[str, ...] = (FORMAT,)) -> dict[str, Any]:
    """The checkpoint in `path`, of one of `formats`; CheckpointError otherwise."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:  # torch raises many types on damaged files (OSError, ...)
        if isinstance(error, pickle.UnpicklingError) and "Weights only" in str(error):
            # Never suggest loading it anyway, as torch's own message does.
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds Python objects other than tensors "
                "and plain data, which were refused (loading them could run code), so it is "
                "not a physlm checkpoint; delete it to restart from scratch, or set "
                "overwrite: true") from error
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(error).__name__}: {_first_sentence(error)}. "
            "It is truncated, corrupt or not a physlm checkpoint; delete it to restart from "
            "scratch, or set overwrite: true") from error
    found = state.get("format") if isinstance(state, dict) else None
    if found in LACKS and found not in formats:
        raise CheckpointError(f"{path} is a {found} file, written by an older physlm without "
                              f"{LACKS[found]}, so the run cannot continue exactly from it; "
                              "delete it to restart from scratch, or set overwrite: true")
    if found not in formats:
        raise CheckpointError(f"{path} is not a {FORMAT} file; delete it to restart from "
                              "scratch, or set overwrite: true")
    return state
