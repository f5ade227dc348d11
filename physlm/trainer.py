"""Training: warmup epochs on the language-model loss, then physics epochs.

    loss = CE(logits, y) + [epoch >= physics_start_epoch] * mean_l lambda_l * mse_l

One optimizer step per batch (AdamW, gradient-norm clipping), then the
multiplier controller (physlm.physics). Every step appends a record to
metrics/steps.jsonl; every epoch ends with validation, a record in
metrics/epochs.jsonl and a checkpoint. `Trainer.fit(until_epoch)` stops early
at an epoch boundary, which is how the warmup and physics notebooks split one
run; calling it again (or re-running after a crash) resumes from the checkpoint.

A non-finite loss or gradient norm skips the step on the device (the fused
AdamW kernel's `found_inf`, as AMP's grad scaler does), is logged as
`skipped`, and `max_bad_steps` consecutive ones abort the run. On the CPU the
metrics are flushed every step; on CUDA every FLUSH_EVERY_CUDA steps so the hot
loop never waits for the device.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from physlm import distributed
from physlm.checkpoint import load_checkpoint, save_checkpoint
from physlm.config import Config, from_flat
from physlm.data import Corpus, Vocabulary, eval_batches, load_corpus, num_batches, train_batches
from physlm.model import ResNetBK, count_parameters
from physlm.physics import energy_terms
from physlm.run import (
    RunDirectory,
    append_jsonl,
    atomic_write_text,
    environment_info,
    read_jsonl,
    write_jsonl,
)

FLUSH_EVERY_CUDA = 50
# Step-record statistics logged per layer, and the name of their mean over layers.
LAYER_MEANS = {"lambda": "lambda_per_layer", "drift": "drift_per_layer",
               "energy_mse": "energy_mse_per_layer"}
# Settings that may change between a run and its resumption; any other change
# (model shape, data, seed, optimiser, physics recipe) makes a different run.
RESUMABLE_KEYS = frozenset({"epochs", "device", "amp", "progress", "checkpoint_every",
                            "resume", "overwrite", "max_bad_steps", "max_eval_batches"})


class TrainingError(RuntimeError):
    """Training cannot go on: too many non-finite steps, or a run directory conflict."""


def settings_changed(config: Config, run: RunDirectory) -> dict[str, tuple[Any, Any]]:
    """Settings outside RESUMABLE_KEYS whose value in the run's config.yaml differs from
    `config`: key -> (value in the run, value now). Empty when the run has no config."""
    if not run.config.exists():
        return {}
    before = from_flat(yaml.safe_load(run.config.read_text()) or {}).to_flat()
    return {key: (before[key], now) for key, now in config.to_flat().items()
            if key not in RESUMABLE_KEYS and now != before[key]}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} asked for, but CUDA is not available here; "
                            "use device: auto or cpu")
    return device


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


class Trainer:
    def __init__(self, config: Config, run_dir: str | Path, corpus: Corpus | None = None) -> None:
        self.config = config
        self.run = RunDirectory(run_dir)
        self.rank, self.world = distributed.init_from_environment()
        self.device = resolve_device(distributed.local_device(config.train.device))
        self.amp = config.train.amp and self.device.type == "cuda"
        if config.train.amp and not self.amp:
            warnings.warn("amp: true is ignored on the CPU (no bf16 units); training in float32",
                          stacklevel=2)
        if config.physics.physics and not config.physics_runs:
            warnings.warn(f"physics_start_epoch ({config.physics.physics_start_epoch}) == epochs "
                          f"({config.train.epochs}): physics never runs, every epoch is warmup. "
                          "Raise epochs or lower physics_start_epoch to train with the energy "
                          "penalty (or set physics: false to say that this is intended).",
                          stacklevel=2)
        # Rank 0 decides (and cleans up on overwrite); the others follow what it left.
        if self.rank == 0:
            self._prepare_run_directory()
        distributed.barrier(self.world)
        saved_state = (load_checkpoint(self.run.checkpoint, map_location="cpu")
                       if self.run.checkpoint.exists() else None)
        vocab = Vocabulary.load(self.run.vocab) if saved_state and self.run.vocab.exists() else None
        self.corpus = corpus or load_corpus(config.data, config.model.n_seq, vocab=vocab)
        self._check_same_data()

        torch.manual_seed(config.train.seed)
        self.model = ResNetBK(config.model, len(self.corpus.vocab),
                              config.physics.lambda_energy_init).to(self.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.train.lr,
                                           weight_decay=config.train.weight_decay, fused=True)
        self.epoch = 0              # the epoch in progress (0-based)
        self.batch_in_epoch = 0     # batches of it already trained
        self.global_step = 0
        self.consecutive_bad = 0
        self.previous_embeddings: torch.Tensor | None = None
        self.previous_batch_size = 0  # global size of the previous batch
        self._pending: list[dict[str, Any]] = []
        if saved_state:
            self._restore(saved_state)
        elif self.rank == 0:
            self._start_fresh()
        if self.world > 1:
            for tensor in self.model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        distributed.barrier(self.world)

    # ---------------------------------------------------------------- run directory
    def _prepare_run_directory(self) -> None:
        """Clear the run directory for a fresh start, or check that it can be resumed."""
        run, train = self.run, self.config.train
        run.create()
        holds_run = run.config.exists() or run.steps.exists() or run.checkpoint.exists()
        if holds_run and train.overwrite:
            for path in (run.config, run.vocab, run.env):
                path.unlink(missing_ok=True)
            shutil.rmtree(run.steps.parent, ignore_errors=True)
            shutil.rmtree(run.checkpoint.parent, ignore_errors=True)
            run.create()
            return
        if not holds_run:
            return
        if not train.resume:
            raise TrainingError(f"{run.root} already holds a run. Set resume: true to continue "
                                "it, overwrite: true to start afresh there, or choose another "
                                "run_dir.")
        differing = [f"{key}: {before!r} in the run, {now!r} now"
                     for key, (before, now) in settings_changed(self.config, run).items()]
        if differing:
            raise TrainingError(f"cannot resume the run in {run.root}: its settings differ "
                                "from this configuration:\n  " + "\n  ".join(differing) +
                                "\nUse the run's settings, set overwrite: true to start afresh, "
                                "or choose another run_dir.")

    def _check_same_data(self) -> None:
        if not self.run.env.exists():
            return
        saved = json.loads(self.run.env.read_text()).get("data_checksums", {})
        changed = [split for split, digest in self.corpus.checksums.items()
                   if saved.get(split, digest) != digest]
        if changed:
            raise TrainingError(f"cannot resume the run in {self.run.root}: its "
                                f"{', '.join(changed)} data changed since it started (sha256 "
                                "differs). Restore the data, set overwrite: true, or choose "
                                "another run_dir.")

    def _start_fresh(self) -> None:
        run = self.run
        for path in (run.steps, run.epochs):
            path.unlink(missing_ok=True)
        self._write_run_files()

    def _write_run_files(self) -> None:
        run = self.run
        self.config.save(run.config)
        self.corpus.vocab.save(run.vocab)
        env = environment_info(self.device)
        env.update(parameters=count_parameters(self.model), data_source=self.corpus.source,
                   data_files=self.corpus.files, data_checksums=self.corpus.checksums,
                   data_tokens=self.corpus.num_tokens, vocab_size=len(self.corpus.vocab),
                   train_batches=self.batches_per_epoch, valid_batches=self.eval_batches_count)
        atomic_write_text(run.env, json.dumps(env, indent=2))

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step, self.consecutive_bad = state["global_step"], state["consecutive_bad"]
        torch.set_rng_state(state["rng_cpu"][self.rank % len(state["rng_cpu"])])
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.previous_batch_size = state["previous_batch_size"]
        previous = state.get("previous_embeddings")
        if previous is not None and self.world == 1:
            self.previous_embeddings = previous.to(self.device)
        # In data-parallel runs each process compared against its own slice of the previous
        # batch, which the checkpoint does not hold: the first energy term after a resume
        # is skipped, as after a batch-size change.
        if self.rank == 0:
            # Records written after the checkpoint belong to work that is about to be redone.
            steps = [r for r in read_jsonl(self.run.steps) if r["step"] <= self.global_step]
            epochs = [r for r in read_jsonl(self.run.epochs) if r["epoch"] < self.epoch]
            write_jsonl(self.run.steps, steps)
            write_jsonl(self.run.epochs, epochs)
            self.config.save(self.run.config)  # resumable settings (epochs, ...) may change

    def save_checkpoint(self) -> None:
        """Write the checkpoint once (rank 0), with every process's RNG state."""
        rng_states = distributed.gather_across(torch.get_rng_state(), self.world)
        if self.rank != 0:
            return
        save_checkpoint(self.run.checkpoint, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "consecutive_bad": self.consecutive_bad,
            "rng_cpu": rng_states,
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
            else None,
            "previous_batch_size": self.previous_batch_size,
            "previous_embeddings": None if self.previous_embeddings is None
            else self.previous_embeddings.cpu(),
            "config": self.config.to_flat(),
        })

    # ---------------------------------------------------------------- sizes
    @property
    def batches_per_epoch(self) -> int:
        data = self.config.data
        return num_batches(len(self.corpus.train), data.batch_size, data.max_train_batches)

    @property
    def eval_batches_count(self) -> int:
        data = self.config.data
        return num_batches(len(self.corpus.valid), data.batch_size, data.max_eval_batches)

    @property
    def finished(self) -> bool:
        return self.epoch >= self.config.train.epochs

    # ---------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, physics_on: bool) -> dict[str, Any]:
        """One optimizer step on the global batch (x, y); returns its metrics as device tensors.

        Under torchrun this process trains on its slice of the batch, and every logged
        statistic is the global-batch value (physlm.distributed).
        """
        physics, model = self.config.physics, self.model
        batch_size = x.shape[0]
        x, y = (distributed.shard(t, self.rank, self.world) for t in (x, y))
        share = x.shape[0] / batch_size
        # The reference term compares consecutive batches of the same size only.
        same_size = self.previous_batch_size == batch_size
        with self._autocast():
            out = model(x, y)
            terms = None
            if physics_on:
                terms = energy_terms(model.energy_heads, physics.energy_mode,
                                     embeddings=out.token_embeddings,
                                     previous_embeddings=self.previous_embeddings if same_size
                                     else None,
                                     hidden_states=out.hidden_states)
        if self.config.model.energy_heads:
            self.previous_embeddings = out.token_embeddings.detach()
            self.previous_batch_size = batch_size
        lambdas = torch.stack([m.value for m in model.multipliers]) if terms else None
        energy_loss = (lambdas * terms.mse).mean() if terms else torch.zeros((), device=x.device)
        loss = out.loss + energy_loss

        self.optimizer.zero_grad(set_to_none=True)
        (loss * (share * self.world) if self.world > 1 else loss).backward()
        parameters = self.optimizer.param_groups[0]["params"]
        distributed.average_gradients(parameters, self.world)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.train.grad_clip)

        stats = {"lm_loss": out.loss.detach().reshape(1), "expert_load": out.expert_load}
        if terms:
            stats.update(mse=terms.mse.detach(), drift=terms.drift.detach(),
                         kinetic=terms.kinetic.detach(), potential=terms.potential.detach())
        stats = self._global_mean(stats, share)
        lm_loss = stats["lm_loss"][0]
        energy_loss = (lambdas * stats["mse"]).mean() if terms else energy_loss.detach()
        loss = lm_loss + energy_loss
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.optimizer.found_inf = bad.float()      # the fused kernel skips the update if set
        self.optimizer.step()
        if terms:
            # A skipped step moves the multipliers by eta * (target - target) = 0.
            drift = torch.where(bad, physics.energy_target_drift, stats["drift"].float().mean())
            for multiplier in model.multipliers:
                multiplier.update(drift, physics.energy_target_drift, physics.lambda_lr,
                                  physics.lambda_min, physics.lambda_max)
        record: dict[str, Any] = {
            "loss": loss, "lm_loss": lm_loss, "energy_loss": energy_loss,
            "grad_norm": grad_norm, "skipped": bad, "expert_load": stats["expert_load"],
        }
        if self.config.model.energy_heads:
            zeros = torch.zeros(self.config.model.n_layers, device=x.device)
            record.update({name: (stats[key] if terms else zeros).float() for name, key in (
                ("energy_mse_per_layer", "mse"), ("drift_per_layer", "drift"),
                ("kinetic", "kinetic"), ("potential", "potential"))})
            record.update(energy_computed=terms is not None, lambda_per_layer=torch.stack(
                [m.value.detach().clone() for m in model.multipliers]))
        return record

    def _global_mean(self, stats: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
        """Batch-weighted means over processes of per-process statistics."""
        if self.world == 1:
            return stats
        totals = distributed.sum_across([t.float() * share for t in stats.values()], self.world)
        return dict(zip(stats, totals, strict=True))

    def _flush(self, window_start: float) -> None:
        """Turn pending device metrics into JSON records and append them."""
        if not self._pending:
            return
        step_time = (time.perf_counter() - window_start) / len(self._pending)
        records = []
        for pending in self._pending:
            record = {k: (v.tolist() if isinstance(v, torch.Tensor) else v)
                      for k, v in pending.items()}
            for name, per_layer in LAYER_MEANS.items():
                if per_layer in record:
                    record[name] = sum(record[per_layer]) / len(record[per_layer])
            record["time_s"] = step_time
            record["tokens_per_s"] = record.pop("tokens") / step_time
            records.append(record)
            self.consecutive_bad = self.consecutive_bad + 1 if record["skipped"] else 0
        if self.rank == 0:
            append_jsonl(self.run.steps, records)
        self._pending.clear()
        if self.consecutive_bad >= self.config.train.max_bad_steps:
            raise TrainingError(
                f"{self.consecutive_bad} consecutive steps had a non-finite loss or gradient "
                f"(up to step {records[-1]['step']}); stopping. Nothing was written over the "
                f"last good checkpoint ({self.run.checkpoint}). Lower lr, check the data, or "
                "raise max_bad_steps.")

    def train_epoch(self) -> None:
        config, data = self.config, self.config.data
        physics_on = config.physics_active(self.epoch)
        flush_every = FLUSH_EVERY_CUDA if self.device.type == "cuda" else 1
        every = config.train.checkpoint_every
        self.model.train()
        batches = train_batches(self.corpus.train, data.batch_size, config.train.seed,
                                self.epoch, data.max_train_batches, start=self.batch_in_epoch)
        phase = "physics" if physics_on else "warmup"
        bar = tqdm(batches, total=self.batches_per_epoch, initial=self.batch_in_epoch,
                   desc=f"epoch {self.epoch + 1}/{config.train.epochs} {phase}",
                   disable=not config.train.progress or self.rank != 0, leave=False)
        window_start = time.perf_counter()
        for x, y in bar:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            record = self.train_step(x, y, physics_on)
            self.global_step += 1
            record.update(step=self.global_step, epoch=self.epoch, batch=self.batch_in_epoch,
                          physics=physics_on, tokens=y.numel())
            self.batch_in_epoch += 1
            self._pending.append(record)
            if len(self._pending) >= flush_every:
                self._flush(window_start)
                window_start = time.perf_counter()
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            mid_epoch = self.batch_in_epoch < self.batches_per_epoch
            if every and self.global_step % every == 0 and mid_epoch:
                self._flush(window_start)
                self.save_checkpoint()
                window_start = time.perf_counter()
        self._flush(window_start)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss: token-weighted and per-batch mean, with their perplexities."""
        data = self.config.data
        self.model.eval()
        start = time.perf_counter()
        # Sums over batches (each process takes every world-th batch): token-weighted
        # loss, tokens, per-batch losses, batches.
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        batches = eval_batches(self.corpus.valid, data.batch_size, data.max_eval_batches)
        for index, (x, y) in enumerate(batches):
            if index % self.world != self.rank:
                continue
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                loss = self.model(x, y).loss.double()
            sums += torch.stack([loss * y.numel(), loss.new_tensor(y.numel()), loss,
                                 loss.new_tensor(1.0)])
        self.model.train()
        (sums,) = distributed.sum_across([sums], self.world)
        loss_sum, tokens, batch_loss_sum, count = sums.tolist()
        token_weighted, batch_mean = loss_sum / tokens, batch_loss_sum / count
        return {"val_loss": token_weighted, "val_ppl": _exp(token_weighted),
                "val_loss_batch_mean": batch_mean, "val_ppl_batch_mean": _exp(batch_mean),
                "val_tokens": int(tokens), "val_batches": int(count),
                "val_time_s": time.perf_counter() - start}

    def _epoch_record(self, validation: dict[str, float]) -> dict[str, Any]:
        """Summarise the finished epoch from its step records (they survive a resume)."""
        steps = [r for r in read_jsonl(self.run.steps) if r["epoch"] == self.epoch]
        good = [r for r in steps if not r["skipped"]] or steps

        def mean(key: str, rows: list[dict[str, Any]] = good) -> float:
            return sum(r[key] for r in rows) / len(rows) if rows else 0.0

        train_time = sum(r["time_s"] for r in steps)
        tokens = sum(r["tokens_per_s"] * r["time_s"] for r in steps)
        record: dict[str, Any] = {
            "epoch": self.epoch, "phase": "physics" if self.config.physics_active(self.epoch)
            else "warmup", "steps": len(steps), "skipped_steps": sum(r["skipped"] for r in steps),
            "train_loss": mean("loss"), "train_lm_loss": mean("lm_loss"),
            "train_energy_loss": mean("energy_loss"), "grad_norm": mean("grad_norm"),
            **validation,
            "train_time_s": train_time, "time_s": train_time + validation["val_time_s"],
            "tokens_per_s": tokens / train_time if train_time else 0.0,
            "expert_load": [[sum(r["expert_load"][layer][e] for r in good) / len(good)
                             for e in range(self.config.model.num_experts)]
                            for layer in range(self.config.model.n_layers)],
        }
        if self.config.model.energy_heads:
            computed = [r for r in good if r["energy_computed"]]
            record.update(
                train_energy_mse=mean("energy_mse", computed),
                drift=mean("drift", computed),
                drift_max=max((r["drift"] for r in computed), default=0.0),
                energy_steps=len(computed),
            )
            lambdas = [m.value.item() for m in self.model.multipliers]
            record.update({"lambda": sum(lambdas) / len(lambdas), "lambda_per_layer": lambdas})
        return record

    def fit(self, until_epoch: int | None = None) -> list[dict[str, Any]]:
        """Train up to (not including) `until_epoch` (default: all epochs); return epoch records."""
        stop = self.config.train.epochs if until_epoch is None else min(until_epoch,
                                                                        self.config.train.epochs)
        while self.epoch < stop:
            if self.batch_in_epoch < self.batches_per_epoch:
                self.train_epoch()
            validation = self.evaluate()
            if self.rank == 0:
                record = self._epoch_record(validation)
                append_jsonl(self.run.epochs, [record], sync=True)
                if self.config.train.progress:
                    tqdm.write(format_epoch(record))
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.save_checkpoint()
        distributed.barrier(self.world)
        return read_jsonl(self.run.epochs)


def format_epoch(record: dict[str, Any]) -> str:
    """One line per epoch for the console."""
    text = (f"epoch {record['epoch'] + 1} [{record['phase']}] train {record['train_loss']:.4f} "
            f"val {record['val_loss']:.4f} ppl {record['val_ppl']:.1f}")
    if "drift" in record:
        text += f" drift {record['drift']:.4f} lambda {record['lambda']:.4f}"
    return text + f" {record['time_s']:.1f}s {record['tokens_per_s']:.0f} tok/s"


def train(config: Config, run_dir: str | Path, until_epoch: int | None = None,
          corpus: Corpus | None = None) -> list[dict[str, Any]]:
    """Train (or resume) the run in `run_dir`; return its epoch records."""
    return Trainer(config, run_dir, corpus).fit(until_epoch)
