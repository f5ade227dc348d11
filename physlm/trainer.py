"""Training: warmup epochs on the language-model loss, then physics epochs.

    loss = CE(logits, y) + sum_k loss_k      the auxiliary objectives (physlm.objectives),
                                             e.g. [epoch >= physics_start_epoch] * mean_l
                                             lambda_l * mse_l for the energy penalty

One optimizer step per batch (physlm.optim: AdamW, SGD or the conformal symplectic
optimizer, after gradient-norm clipping), then the schedule's step and each objective's
`after_step` (the multiplier controller). Every step appends a record to steps.jsonl; every
epoch ends with validation and the held-out evaluation (which alone drives the plateau
schedule and picks the best epoch, saved as checkpoints/best.pt: physlm.rundata), a record
in epochs.jsonl and a checkpoint. `Trainer.fit(until_epoch)` stops at an epoch boundary
(how the warmup and physics notebooks split one run); calling it again, or re-running after
a crash, resumes. A finished run writes samples.json (physlm.generate).

A non-finite loss or gradient norm skips the step on the device (`found_inf`, as AMP's
grad scaler does for the fused kernels; the schedule still counts the batch), is logged
as `skipped`, and `max_bad_steps` consecutive ones abort the run. On the CPU the
metrics are flushed every step; on CUDA every FLUSH_EVERY_CUDA steps so the hot
loop never waits for the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from physlm import distributed, generate, gradients, optim
from physlm.batches import num_batches, train_batches
from physlm.build import build_model
from physlm.checkpoint import load_checkpoint, save_checkpoint
from physlm.config import Config
from physlm.data import Corpus, Vocabulary, load_corpus
from physlm.errors import TrainingError
from physlm.evaluation import HELDOUT, evaluate
from physlm.metrics import EpochTotals, epoch_figures, step_record
from physlm.model import count_parameters
from physlm.moe import load_entropy
from physlm.ngram import references
from physlm.objectives import build_objectives
from physlm.provenance import environment_info
from physlm.rundata import improves, selection_key
from physlm.runs import RunDirectory

FLUSH_EVERY_CUDA = 50


class Trainer:
    def __init__(self, config: Config, run_dir: str | Path, corpus: Corpus | None = None) -> None:
        self.config = config
        self.run = RunDirectory(run_dir)
        self.rank, self.world = distributed.init_from_environment()
        self.device = distributed.resolve_device(config.train.device)
        self.amp = config.train.amp and self.device.type == "cuda"
        if config.train.amp and not self.amp:
            warnings.warn("amp: true is ignored on the CPU (no bf16 units); training in float32",
                          stacklevel=2)
        if config.has_physics and not config.trains_with_physics:
            warnings.warn(f"physics_start_epoch ({config.physics.physics_start_epoch}) == epochs "
                          f"({config.train.epochs}): physics never runs, every epoch is warmup. "
                          "Raise epochs or lower physics_start_epoch to train with physics (or "
                          "set energy_penalty: false and koopman: false if intended).",
                          stacklevel=2)
        if self.rank == 0:  # rank 0 decides (and clears on overwrite); the others follow
            self.run.prepare(config)
        distributed.barrier(self.world)
        saved = (load_checkpoint(self.run.checkpoint, map_location="cpu")
                 if self.run.checkpoint.exists() else None)
        vocab = Vocabulary.load(self.run.vocab) if saved and self.run.vocab.exists() else None
        self.corpus = corpus or load_corpus(config.data, config.model.n_seq, vocab=vocab)
        # samples.json's prompts are the config's validation text: not that of a corpus given
        # as tensors (the benchmarks'), and a bidirectional model cannot write.
        self.writes_samples = corpus is None and generate.is_causal(config.model)
        self.run.check_same_data(self.corpus.checksums)

        self.model, self.penalty = build_model(config, len(self.corpus.vocab))
        self.objectives = build_objectives(config, self.model, self.penalty)
        self.layer_means = {k: v for o in self.objectives for k, v in o.layer_means.items()}
        trained = [o.module for o in self.objectives if o.module is not None]
        self.modules = torch.nn.ModuleList([self.model, *trained]).to(self.device)
        # One group over the trained parameters: its params are what is clipped.
        self.optimizer = optim.build_optimizer(
            config.train, [p for p in self.modules.parameters() if p.requires_grad])
        self.schedule = optim.build_schedule(config.train, self.optimizer, self.batches_per_epoch)
        self.epoch = 0              # the epoch in progress (0-based)
        self.batch_in_epoch = 0     # batches of it already trained
        self.global_step = 0
        self.consecutive_bad = 0
        self.totals = EpochTotals()  # the epoch in progress, so far
        self.carry: Any = None         # recurrent state carried along the batch streams
        self.streaming = config.data.batching == "stream"
        self._pending: list[dict[str, Any]] = []
        if saved:
            self._restore(saved)
        else:  # the untrained model's validation loss: what training must improve on
            initial = {**self.evaluate(), **self.evaluate_heldout()}
            if self.rank == 0:
                self._start_fresh(initial)
        if self.world > 1:
            for tensor in self.modules.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        distributed.barrier(self.world)

    # ---------------------------------------------------------------- the loop
    def fit(self, until_epoch: int | None = None) -> list[dict[str, Any]]:
        """Train up to (not including) `until_epoch` (default: all epochs); return epoch records."""
        epochs = self.config.train.epochs
        stop = epochs if until_epoch is None else min(until_epoch, epochs)
        while self.epoch < stop:
            if self.batch_in_epoch < self.batches_per_epoch:
                self.train_epoch()
            record = self.epoch_record(self.evaluate(), self.evaluate_heldout())
            if "heldout_loss" in record:   # the plateau schedule watches held-out, never val
                self.schedule.after_epoch(record["heldout_loss"])
            if self.rank == 0:
                if improves(self.run.epoch_records(), record):
                    self.save_best(record)   # before last.pt: a crash between redoes the epoch
                self.run.append_epoch(record)
                if self.config.train.progress:
                    tqdm.write(f"{self.run.label}: epoch {self.epoch + 1}/{epochs} "
                               f"[{record['phase']}] {epoch_figures(record)}  "
                               f"{record['time_s']:.1f}s  {record['tokens_per_s']:,.0f} tok/s")
            self.epoch, self.batch_in_epoch, self.totals = self.epoch + 1, 0, EpochTotals()
            self.save_checkpoint()
        if self.rank == 0 and self.finished and self.writes_samples:
            generate.write_samples(self.run.root)   # the same file again for the same weights
        distributed.barrier(self.world)
        return self.run.epoch_records()

    def train_epoch(self) -> None:
        config, data = self.config, self.config.data
        physics_on = config.is_physics_epoch(self.epoch)
        flush_every = FLUSH_EVERY_CUDA if self.device.type == "cuda" else 1
        every = config.train.checkpoint_every
        self.model.train()
        self.carry = None if self.batch_in_epoch == 0 else self.carry   # streams restart
        batches = train_batches(self.corpus.train, data.batch_size, config.train.seed,
                                self.epoch, data.max_train_batches, start=self.batch_in_epoch,
                                batching=data.batching)
        bar = tqdm(batches, total=self.batches_per_epoch, initial=self.batch_in_epoch,
                   desc=f"epoch {self.epoch + 1}/{config.train.epochs} {config.phase(self.epoch)}",
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

    def train_step(self, x: torch.Tensor, y: torch.Tensor, physics_on: bool) -> dict[str, Any]:
        """One optimizer step on the global batch (x, y); returns its metrics as device tensors.

        The auxiliary objectives' terms (physlm.objectives) are added to the LM loss; their
        gradient g_E is accounted for and clipped apart from the LM's (physlm.gradients),
        except that of the terms that join the LM's (the MoE balance), which is g_LM's.
        Under torchrun this process trains on its slice of the batch, and every logged
        statistic is the global-batch value (physlm.distributed).
        """
        batch_size = x.shape[0]
        x, y = (distributed.shard(t, self.rank, self.world) for t in (x, y))
        share = x.shape[0] / batch_size
        with self._autocast():
            out = self.model(x, y, state=self.carry if self.streaming else None)
        self.carry = out.state   # a recurrent model's state, for the next batch of the stream
        terms = {o: t for o in self.objectives if (t := o.term(out, batch_size, physics_on))}

        self.optimizer.zero_grad(set_to_none=True)
        weight = share * self.world if self.world > 1 else 1.0  # the mean over processes
        parameters = self.optimizer.param_groups[0]["params"]
        auxiliary = _total([t.loss for t in terms.values() if not t.joins_lm])
        energy = gradients.energy_gradients(None if auxiliary is None else auxiliary * weight,
                                            parameters, self.world)
        lm = _total([out.loss, *(t.loss for t in terms.values() if t.joins_lm)])
        (lm * weight if self.world > 1 else lm).backward()
        distributed.average_gradients(parameters, self.world)
        grads = gradients.clip(parameters, energy, self.config.train.grad_clip,
                               apart=any(t.clip_apart for t in terms.values()))

        local = {"lm_loss": out.loss.detach().reshape(1), "expert_load": out.expert_load}
        for objective, term in terms.items():
            local.update({objective.loss_field: term.loss.detach(), **term.stats})
        stats = distributed.global_mean(local, share, self.world)
        if stats["expert_load"].shape[-1]:   # a mixture of experts: is any expert dead?
            stats["load_entropy_per_layer"] = load_entropy(stats["expert_load"])
        lm_loss = stats["lm_loss"][0]
        loss = _total([lm_loss, *(stats[o.loss_field] for o in terms)])
        skipped = ~(torch.isfinite(loss) & torch.isfinite(grads.grad_norm))
        lr = self.step_optimizer(skipped)
        record = {**stats, "loss": loss, "lm_loss": lm_loss, "skipped": skipped, "lr": lr,
                  **vars(grads)}
        for objective in self.objectives:
            record.update(objective.after_step(stats if objective in terms else None, skipped,
                                               physics_on))
        return record

    # ---------------------------------------------------------------- the optimizer
    def step_optimizer(self, skipped: torch.Tensor) -> float:
        """The update, skipped on the device when `skipped` (`found_inf`, physlm.optim), then
        the schedule's step, which counts every batch; returns the learning rate it used."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.found_inf = skipped.float()
        self.optimizer.step()
        self.schedule.after_step()
        return lr

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", torch.bfloat16) if self.amp else contextlib.nullcontext()

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.corpus.valid, self.config.data, self.device,
                        self.rank, self.world, self._autocast)

    def evaluate_heldout(self) -> dict[str, float]:
        """The held-out split's figures (`heldout_loss`, ...), all of it (max_eval_batches caps
        validation only); none without a held-out split."""
        if self.corpus.heldout is None:
            return {}
        whole = dataclasses.replace(self.config.data, max_eval_batches=None)
        return evaluate(self.model, self.corpus.heldout, whole, self.device, self.rank,
                        self.world, self._autocast, split=HELDOUT)

    # ---------------------------------------------------------------- logging
    def _flush(self, window_start: float) -> None:
        """Turn pending device metrics into JSON records, add them to the epoch's totals
        and append them to steps.jsonl."""
        if not self._pending:
            return
        step_time = (time.perf_counter() - window_start) / len(self._pending)
        records = [step_record(pending, step_time, self.layer_means) for pending in self._pending]
        for record in records:
            self.totals.add(record, self.objectives)
            self.consecutive_bad = self.consecutive_bad + 1 if record["skipped"] else 0
        if self.rank == 0:
            self.run.append_steps(records)
        self._pending.clear()
        if self.consecutive_bad >= self.config.train.max_bad_steps:
            kept = (f"the last good checkpoint ({self.run.checkpoint}) is kept"
                    if self.run.checkpoint.exists() else "no checkpoint had been written yet")
            raise TrainingError(
                f"{self.consecutive_bad} consecutive steps had a non-finite loss or gradient "
                f"(up to step {records[-1]['step']}); stopping: {kept}. Lower lr, check the "
                "data, or raise max_bad_steps.")

    def epoch_record(self, validation: dict[str, float],
                     heldout: dict[str, float]) -> dict[str, Any]:
        """The finished epoch: its running totals, the objectives' figures, validation and
        held-out (none without a held-out split), the learning rate it ended with."""
        record = {"epoch": self.epoch, "phase": self.config.phase(self.epoch),
                  **self.totals.summary(self.objectives), **validation, **heldout,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        record["time_s"] = (record["train_time_s"] + validation["val_time_s"]
                            + heldout.get("heldout_time_s", 0.0))
        return record

    # ---------------------------------------------------------------- run directory
    def _start_fresh(self, initial: dict[str, float]) -> None:
        run = self.run
        run.start_metrics(initial, references(self.corpus))
        run.write_config(self.config)
        self.corpus.vocab.save(run.vocab)
        env = environment_info(self.device)
        env.update(parameters=count_parameters(*self.modules),
                   data_source=self.corpus.source, data_files=self.corpus.files,
                   data_checksums=self.corpus.checksums,
                   data_tokens=self.corpus.num_tokens, vocab_size=len(self.corpus.vocab),
                   train_batches=self.batches_per_epoch, valid_batches=self.eval_batches_count)
        run.write_env(env)

    def save_checkpoint(self) -> None:
        """Write the checkpoint once (rank 0), with every process's RNG state."""
        rng_states = distributed.gather_across(torch.get_rng_state(), self.world)
        if self.rank != 0:
            return
        save_checkpoint(self.run.checkpoint, {
            "model": self.model.state_dict(),
            "objectives": {o.name: o.state_dict() for o in self.objectives},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "consecutive_bad": self.consecutive_bad,
            "epoch_totals": self.totals.state_dict(),
            "rng_cpu": rng_states,
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
            else None,
            "carry": self.carry,
            "config": self.config.to_flat(),
        })
        if self.batch_in_epoch == 0 and self.epoch == self.config.warmup_epochs:
            self.run.keep_warmup_checkpoint()  # where a control or a sibling run may fork

    def save_best(self, record: dict[str, Any]) -> None:
        """checkpoints/best.pt: the weights at the end of epoch `record`, the best so far
        (physlm.rundata.improves); weights only, for sampling (physlm.generate)."""
        key = selection_key(record)
        save_checkpoint(self.run.best_checkpoint, {
            "model": self.model.state_dict(), "epoch": record["epoch"],
            "global_step": self.global_step, "selected_on": key, key: record[key],
            "config": self.config.to_flat()})

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for objective in self.objectives:
            objective.load_state_dict(state["objectives"][objective.name])
        optim.load_optimizer_state(self.optimizer, state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step, self.consecutive_bad = state["global_step"], state["consecutive_bad"]
        self.totals = EpochTotals.from_state(state.get("epoch_totals"))
        torch.set_rng_state(state["rng_cpu"][self.rank % len(state["rng_cpu"])])
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.carry = state["carry"]
        if self.rank == 0:
            self.run.keep_metrics_until(self.global_step, self.epoch)  # redone work goes
            if not self.finished:   # samples of weights that training will replace
                self.run.samples.unlink(missing_ok=True)
            self.run.write_config(self.config)  # resumable settings (epochs, ...) may change

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


def _total(terms: list[torch.Tensor]) -> torch.Tensor | None:
    """((t_0 + t_1) + t_2) + ...: the terms in their order; None for no terms."""
    return sum(terms[1:], start=terms[0]) if terms else None


def train(config: Config, run_dir: str | Path, until_epoch: int | None = None,
          corpus: Corpus | None = None) -> list[dict[str, Any]]:
    """Train (or resume) the run in `run_dir`; return its epoch records."""
    return Trainer(config, run_dir, corpus).fit(until_epoch)
