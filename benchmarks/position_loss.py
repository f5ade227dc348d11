"""How much of its context a trained model uses: the validation loss by position in a chunk.

Every chunk of N + 1 validation tokens starts from nothing (no state carried in, for the
LSTM too), so the loss at position i is the loss of a prediction from i + 1 tokens:

    loss(i) = mean over chunks c of  -log p(x_{c,i+1} | x_{c,0..i})

A model that uses its context has loss(i) falling with i; where it stops falling, the model
has stopped using what lies further back. N is --n, or a run's own n_seq where that is
shorter (ResNet-BK and the Transformer cannot go past it: their position embeddings end
there; the LSTM can).

    python benchmarks/position_loss.py RUN_DIR [RUN_DIR ...] [--n 128] [--checkpoint best]
        [--out benchmarks/results/position-loss.json]

From the repository root (the runs' data paths are relative to it).

For a ResNet-BK run it also measures the layers' memory: the recurrence of the resolvent on
the features decays by |t g_i| per site (physlm.bk_features; t = 1 without learned coupling),
so a signal survives k sites as prod |g| ~ exp(k mean log|g|); the e-fold memory of each
layer and potential is -1 / mean log|g_i| over the validation sites, in tokens.

Writes the per-position
losses, their means over bands of context (1, 2-4, 5-16, 17-32, 33-64, 65-128 tokens) and a
figure beside the JSON (.png).
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)] if str(ROOT) not in sys.path else []

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from physlm.data import load_corpus
from physlm.generate import load_run_model
from physlm.runs import RunDirectory
from physlm.text import portable

BANDS = ((1, 1), (2, 4), (5, 16), (17, 32), (33, 64), (65, 128))   # tokens of context


@torch.no_grad()
def position_loss(run_dir: str, n: int | None, checkpoint: str, batch: int = 64) -> dict:
    """The mean validation loss at each position of chunks of n + 1 tokens, from zero state."""
    run = load_run_model(run_dir, checkpoint)
    model = run.config.model
    n = n if n and model.architecture == "lstm" else min(n or model.n_seq, model.n_seq)
    chunks = load_corpus(run.config.data, n, run.vocab).valid
    total = torch.zeros(n, dtype=torch.float64)
    log_g: dict[int, list[torch.Tensor]] = {}    # layer -> per batch, (P,) mean log|g|
    for index, block in enumerate(getattr(run.model, "blocks", [])):
        if hasattr(block, "resolvent"):   # a BK layer
            block.resolvent = _recording(block.resolvent, log_g.setdefault(index, []))
    for start in range(0, len(chunks), batch):
        rows = chunks[start:start + batch]
        total += run.model(rows[:, :-1], rows[:, 1:]).token_losses.double().sum(0)
    loss = (total / len(chunks)).tolist()
    memory = {f"layer {index}": [round(-1 / value, 2) for value in
                                 torch.stack(means).mean(0).tolist()]
              for index, means in log_g.items() if means}
    bands = {f"{lo}-{hi}": sum(loss[lo - 1:hi]) / len(loss[lo - 1:hi])
             for lo, hi in BANDS if lo <= n}
    env = RunDirectory(run_dir).read_env()
    return {"run_dir": portable(run_dir), "name": run.config.train.name,
            "git_commit": env.get("git_commit"),
            "parameters": env.get("parameters", {}).get("total"),
            "architecture": run.config.model.architecture, "n": n, "chunks": len(chunks),
            "checkpoint": checkpoint, "loss_by_position": loss, "mean_loss_by_context": bands,
            "efold_memory_tokens": memory}


def _recording(resolvent, means: list[torch.Tensor]):
    """The layer's resolvent, recording the mean log|g| of each potential (B, P, N -> P)."""
    def recorded(*args, **kwargs):
        g = resolvent(*args, **kwargs)
        means.append(g.abs().log().mean(dim=(0, 2)).double())
        return g
    return recorded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/position_loss.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories with checkpoints")
    parser.add_argument("--n", type=int, help="chunk length, at most a run's n_seq where it "
                        "has position embeddings (default: each run's n_seq)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                        / "position-loss.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [position_loss(run, args.n, args.checkpoint) for run in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    figure, axes = plt.subplots(figsize=(7, 4))
    for result in results:   # per-position means are noisy (each position its own tokens):
        loss = result["loss_by_position"]              # means over octaves of context
        octaves = [(lo, len(loss) if 2 * lo > len(loss) else 2 * lo - 1)
                   for lo in (1, 2, 4, 8, 16, 32, 64) if lo <= len(loss)]
        axes.plot([(lo * hi) ** 0.5 for lo, hi in octaves],
                  [sum(loss[lo - 1:hi]) / (hi - lo + 1) for lo, hi in octaves], marker="o",
                  label=f"{result['name']} (N {result['n']})")
        print(result["name"], {band: round(value, 3)
                               for band, value in result["mean_loss_by_context"].items()},
              "e-fold memory (tokens):", result["efold_memory_tokens"])
    axes.set(xscale="log", xlabel="tokens of context (position + 1; octaves 1, 2-3, 4-7, ...)",
             ylabel="validation loss (nats)", title="Loss by position in a chunk, from zero state")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=120)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
