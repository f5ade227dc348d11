"""Light, honest tuning of the LSTM baseline (physlm.lstm) on the WikiText-2 proxy.

The study trains on wiki.test.raw and validates on wiki.valid.raw (params/wt2_proxy.yaml).
Tuning never sees the validation split: the LAST 10% of the training chunks are held out,
each setting of a small grid trains on the first 90% in stream batching (state carried
across batches, reset at each epoch and evaluation start) and is scored by its held-out
perplexity. A plain loop (AdamW, weight decay and gradient clipping as the physlm trainer,
constant learning rate), one torch thread.

The settings train for the study's budget, 6 epochs (params/wt2_proxy.yaml runs), not 2:
after 2 epochs (106 steps) every setting is still near the held-out unigram perplexity
(~2050) and the grid ranks the one that moved least (lr 1e-3) first, while after 6 epochs
the higher learning rates are far ahead (lr 1e-2: 1475, 3e-3: 1721, dropout 0.3).

    python benchmarks/tune_lstm.py            # the default grid, writes results/tune-lstm.json
    python benchmarks/tune_lstm.py --lr 1e-3 3e-3 --dropout 0.1 0.3 --clip 0.5 --epochs 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
from pathlib import Path

import torch

from physlm.config import DataConfig, ModelConfig, load_config
from physlm.data import eval_batches, load_corpus, num_batches, train_batches
from physlm.lstm import LSTMLanguageModel
from physlm.model import count_parameters

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data" / "wikitext-2-raw"
RESULT = ROOT / "benchmarks" / "results" / "tune-lstm.json"
HOLDOUT = 0.10


def tuning_split(chunks: torch.Tensor, held: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train, held-out, vocabulary size): the last `held` chunks held out, and the ids
    renumbered to the vocabulary of the train part alone, as the study's vocabulary is that
    of its train split: a held-out word the train part lacks becomes `<unk>` (id 1).
    (With the file's vocabulary, such words would be trained never to be predicted, and
    the held-out loss would grow with training.)"""
    train, heldout = chunks[:-held], chunks[-held:]
    kept = torch.unique(torch.cat([torch.tensor([0, 1]), train.flatten()]))  # sorted: 0, 1, ...
    table = torch.ones(int(chunks.max()) + 1, dtype=torch.long)             # default: <unk>
    table[kept] = torch.arange(len(kept))
    return table[train], table[heldout], len(kept)


@torch.no_grad()
def heldout_loss(model: LSTMLanguageModel, chunks: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean CE over the held-out chunks, streamed, state from zeros."""
    model.eval()
    total, tokens, state = 0.0, 0, None
    for x, y in eval_batches(chunks, batch_size, batching="stream"):
        out = model(x, y, state=state)
        total += out.loss.item() * y.numel()
        tokens += y.numel()
        state = out.state
    model.train()
    return total / tokens


def run_setting(model_config: ModelConfig, vocab_size: int, train: torch.Tensor,
                heldout: torch.Tensor, *, lr: float, clip: float, epochs: int,
                batch_size: int, weight_decay: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = LSTMLanguageModel(model_config, vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    started, per_epoch, train_loss = time.perf_counter(), [], float("nan")
    for epoch in range(epochs):
        state, losses = None, []
        for x, y in train_batches(train, batch_size, seed, epoch, batching="stream"):
            out = model(x, y, state=state)
            state = out.state
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            losses.append(out.loss.item())
        train_loss = sum(losses) / len(losses)
        loss = heldout_loss(model, heldout, batch_size)
        per_epoch.append({"epoch": epoch + 1, "train_loss": train_loss,
                          "heldout_loss": loss, "heldout_ppl": math.exp(loss)})
        print(f"    epoch {epoch + 1}: train loss {train_loss:.3f}, held-out ppl "
              f"{math.exp(loss):.1f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"lr": lr, "dropout": model_config.dropout, "grad_clip": clip,
            "heldout_loss": per_epoch[-1]["heldout_loss"],
            "heldout_ppl": per_epoch[-1]["heldout_ppl"], "final_train_loss": train_loss,
            "epochs": per_epoch, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params" / "lstm.yaml"),
                        help="the LSTM's shape (d_model, n_layers) and batch size come from here")
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-3, 1e-2])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--clip", type=float, nargs="+", default=[0.5])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_config(args.params)
    data = DataConfig(data_dir=args.data_dir, train_file="wiki.test.raw",
                      valid_file="wiki.valid.raw", vocab_size=config.data.vocab_size)
    corpus = load_corpus(data, n_seq=config.model.n_seq)
    held = round(HOLDOUT * len(corpus.train))
    train, heldout, vocab_size = tuning_split(corpus.train, held)
    batch_size = config.data.batch_size
    shape = {"d_model": config.model.d_model, "n_layers": config.model.n_layers,
             "n_seq": config.model.n_seq}
    probe = LSTMLanguageModel(config.model, vocab_size)
    unknown = (heldout == 1).float().mean().item()
    print(f"LSTM {shape}, {count_parameters(probe)['total']:,} parameters at vocabulary "
          f"{vocab_size:,}; {len(train)} training chunks "
          f"({num_batches(len(train), batch_size, batching='stream')} stream batches of "
          f"{batch_size}), {len(heldout)} held-out chunks (the last {HOLDOUT:.0%} of "
          f"{corpus.files['train']}; {unknown:.2%} of their tokens <unk>)", flush=True)

    results = []
    record = {"what": "LSTM tuning on a held-out slice of the proxy's TRAIN split "
                      "(the validation split is never read for scoring)",
              "train_file": corpus.files["train"], "train_checksum": corpus.checksums["train"],
              "train_chunks": len(train), "heldout_chunks": len(heldout),
              "heldout": f"last {HOLDOUT:.0%} of the train chunks", "heldout_unk_fraction": unknown,
              "vocabulary": "the train part's own (held-out words it lacks are <unk>)",
              "batching": "stream",
              "batch_size": batch_size, "epochs": args.epochs, "optimizer": "AdamW",
              "weight_decay": config.train.weight_decay, "lr_schedule": "constant",
              "seed": args.seed, "vocab_size": vocab_size, **shape,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "results": results}
    grid = list(itertools.product(args.lr, args.dropout, args.clip))
    for index, (lr, dropout, clip) in enumerate(grid, 1):
        print(f"[{index}/{len(grid)}] lr {lr:g}, dropout {dropout:g}, grad clip {clip:g}",
              flush=True)
        model_config = ModelConfig(**{**vars(config.model), "dropout": dropout})
        results.append(run_setting(model_config, vocab_size, train, heldout, lr=lr, clip=clip,
                                   epochs=args.epochs, batch_size=batch_size,
                                   weight_decay=config.train.weight_decay, seed=args.seed))
        best = min(results, key=lambda r: r["heldout_loss"])
        record["chosen"] = {key: best[key] for key in ("lr", "dropout", "grad_clip",
                                                       "heldout_ppl")}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")  # after every setting

    print("\n| lr | dropout | grad clip | train loss | held-out ppl | time (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in sorted(results, key=lambda r: r["heldout_loss"]):
        print(f"| {r['lr']:g} | {r['dropout']:g} | {r['grad_clip']:g} | "
              f"{r['final_train_loss']:.3f} | {r['heldout_ppl']:.1f} | {r['seconds']:.0f} |")
    print(f"\nchosen: {record['chosen']}; written to {args.out}")


if __name__ == "__main__":
    main()
