"""Checkpoints: written atomically, read without ever executing code.

A checkpoint holds everything that determines the rest of a run: model and
optimizer state (the multipliers are model parameters), the position in the
run (next epoch, batches done in it, global step), the RNG states, and the
previous batch's embeddings that the reference energy term compares against (each
auxiliary objective's own state, physlm.objectives).
It is loaded with `torch.load(..., weights_only=True)`, so a foreign file can
fail to load but never run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from physlm.errors import CheckpointError
from physlm.files import atomic_write_bytes

FORMAT = "physlm-checkpoint-2"  # 2: the auxiliary objectives' states under "objectives"


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


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
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
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file; delete it to restart from "
                              "scratch, or set overwrite: true")
    return state
