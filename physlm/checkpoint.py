"""Checkpoints: written atomically, read without ever executing code.

A checkpoint holds everything that determines the rest of a run: model and
optimizer state (the multipliers are model parameters), the position in the
run (next epoch, batches done in it, global step), the RNG states, and the
previous batch's embeddings that the reference energy term compares against.
It is loaded with `torch.load(..., weights_only=True)`, so a foreign file can
fail to load but never run code.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from physlm.run import atomic_write_bytes

FORMAT = "physlm-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint file is truncated, foreign or incompatible."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {str(error).splitlines()[0]}. It is truncated, "
            "corrupt or not a physlm checkpoint; delete it to restart from scratch, or set "
            "overwrite: true") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file; delete it or set overwrite: true")
    return state
