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
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from physlm import distributed, gradients
from physlm.checkpoint import load_checkpoint, save_checkpoint
from physlm.config import Config
from physlm.data import Corpus, Vocabulary, load_corpus, num_batches, train_batches
from physlm.evaluation import evaluate
from physlm.metrics import KOOPMAN_TERMS, TERM_RECORD, EpochTotals, format_epoch, step_record
from physlm.model import count_parameters
from physlm.physics import build_model
from physlm.provenance import environment_info
from physlm.runs import RunDirectory

FLUSH_EVERY_CUDA = 50


class TrainingError(RuntimeError):
    """Training cannot go on: too many non-finite steps."""


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
        if config.physics.energy_penalty and not config.trains_with_physics:
            warnings.warn(f"physics_start_epoch ({config.physics.physics_start_epoch}) == epochs "
                          f"({config.train.epochs}): physics never runs, every epoch is warmup. "
                          "Raise epochs or lower physics_start_epoch to train with the energy "
                          "penalty (or set energy_penalty: false to say that this is intended).",
                          stacklevel=2)
        if self.rank == 0:  # rank 0 decides (and clears on overwrite); the others follow
            self.run.prepare(config)
        distributed.barrier(self.world)
        saved = (load_checkpoint(self.run.checkpoint, map_location="cpu")
                 if self.run.checkpoint.exists() else None)
        vocab = Vocabulary.load(self.run.vocab) if saved and self.run.vocab.exists() else None
        self.corpus = corpus or load_corpus(config.data, config.model.n_seq, vocab=vocab)
        self.run.check_same_data(self.corpus.checksums)

        self.model, self.penalty = build_model(config, len(self.corpus.vocab))
        self.koopman = getattr(self.model, "koopman", None)
        trained = [m for m in (self.model, self.penalty) if m is not None]
        self.modules = torch.nn.ModuleList(trained).to(self.device)
        trainable = [p for p in self.modules.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.train.lr,
                                           weight_decay=config.train.weight_decay, fused=True)
        self.epoch = 0              # the epoch in progress (0-based)
        self.batch_in_epoch = 0     # batches of it already trained
        self.global_step = 0
        self.consecutive_bad = 0
        self.totals = EpochTotals()  # the epoch in progress, so far
        self.previous_embeddings: torch.Tensor | None = None
        self.previous_batch_size = 0  # global size of the previous batch
        self.carry: Any = None         # recurrent state carried along the batch streams
        self.streaming = config.data.batching == "stream"
        self._pending: list[dict[str, Any]] = []
        if saved:
            self._restore(saved)
        else:  # the untrained model's validation loss: what training must improve on
            initial = self.evaluate()
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
            record = self.epoch_record(self.evaluate())
            if self.rank == 0:
                self.run.append_epoch(record)
                if self.config.train.progress:
                    tqdm.write(f"{self.run.label}: {format_epoch(record, epochs)}")
            self.epoch, self.batch_in_epoch, self.totals = self.epoch + 1, 0, EpochTotals()
            self.save_checkpoint()
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

        The energy term is computed on physics steps, and on warmup steps too when the heads
        are fitted early (then detached from the network, and it never moves lambda). Its
        gradient is accounted for and clipped apart from the LM's (physlm.gradients). Under
        torchrun this process trains on its slice of the batch, and every logged statistic
        is the global-batch value (physlm.distributed).
        """
        physics, penalty = self.config.physics, self.penalty
        batch_size = x.shape[0]
        x, y = (distributed.shard(t, self.rank, self.world) for t in (x, y))
        share = x.shape[0] / batch_size
        # The reference term compares consecutive batches of the same size only.
        previous = self.previous_embeddings if self.previous_batch_size == batch_size else None
        with self._autocast():
            out = self.model(x, y, state=self.carry if self.streaming else None)
            terms = None
            if penalty is not None and (physics_on or physics.fit_heads_in_warmup):
                terms = penalty.terms(out, previous, attached=physics_on)
        self.carry = out.state   # a recurrent model's state, for the next batch of the stream
        if penalty is not None:
            self.previous_embeddings = out.token_embeddings.detach()
            self.previous_batch_size = batch_size
        energy_loss = penalty.loss(terms.mse) if terms else torch.zeros((), device=x.device)
        koopman = self.koopman.terms(out.hidden_states) if self.koopman and physics_on else None
        # The auxiliary objective (energy penalty and/or Koopman loss) is accounted and
        # clipped as one gradient g_E (physlm.gradients).
        auxiliary = energy_loss + physics.koopman_weight * koopman.loss if koopman else energy_loss
        has_auxiliary = terms is not None or koopman is not None

        self.optimizer.zero_grad(set_to_none=True)
        weight = share * self.world if self.world > 1 else 1.0  # the mean over processes
        parameters = self.optimizer.param_groups[0]["params"]
        clip = self.config.train.grad_clip
        energy = (gradients.energy_gradients(auxiliary * weight, parameters, self.world)
                  if has_auxiliary else None)
        (out.loss * weight if self.world > 1 else out.loss).backward()
        distributed.average_gradients(parameters, self.world)
        # Heads fitted in the warmup are clipped apart: the LM step must be the control's.
        clip_mode = physics.clip_mode if physics_on else "separate"
        grads = (gradients.combine_and_clip(parameters, energy, clip, clip_mode)
                 if has_auxiliary else gradients.clip_without_energy(parameters, clip))

        stats = {"lm_loss": out.loss.detach().reshape(1), "expert_load": out.expert_load}
        if terms:
            stats.update({name: getattr(terms, name).detach() for name in TERM_RECORD})
        if koopman:
            stats.update({f"koopman_{name}": getattr(koopman, name).detach()
                          for name in KOOPMAN_TERMS})
        stats = distributed.global_mean(stats, share, self.world)
        lm_loss = stats["lm_loss"][0]
        energy_loss = penalty.loss(stats["mse"]) if terms else energy_loss.detach()
        loss = lm_loss + energy_loss
        if koopman:
            loss = loss + physics.koopman_weight * (stats["koopman_consistency"]
                                                    + stats["koopman_reconstruction"]).mean()
        bad = ~(torch.isfinite(loss) & torch.isfinite(grads.grad_norm))
        self.optimizer.found_inf = bad.float()      # the fused kernel skips the update if set
        if warmup := self.config.train.lr_warmup_steps:   # linear warmup, then constant
            self.optimizer.param_groups[0]["lr"] = self.config.train.lr * min(
                1.0, (self.global_step + 1) / warmup)
        self.optimizer.step()
        if terms and physics_on:
            penalty.update(stats["drift"], skipped=bad)
        record: dict[str, Any] = {
            "loss": loss, "lm_loss": lm_loss, "energy_loss": energy_loss, "skipped": bad,
            "expert_load": stats["expert_load"], **vars(grads)}
        if penalty is not None:
            zeros = torch.zeros(self.config.model.n_layers, device=x.device)
            record.update({TERM_RECORD[name]: (stats[name] if terms else zeros).float()
                           for name in TERM_RECORD})
            record.update(energy_computed=terms is not None,
                          lambda_per_layer=penalty.lambdas.detach().clone())
        if self.koopman is not None:
            zeros = torch.zeros(self.config.model.n_layers, device=x.device)
            record.update(koopman_computed=koopman is not None, **{
                f"{name}_per_layer": stats[name].float() if koopman else zeros
                for name in (f"koopman_{term}" for term in KOOPMAN_TERMS)})
        return record

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.corpus.valid, self.config.data, self.device,
                        self.rank, self.world, self._autocast)

    # ---------------------------------------------------------------- logging
    def _flush(self, window_start: float) -> None:
        """Turn pending device metrics into JSON records, add them to the epoch's totals
        and append them to steps.jsonl."""
        if not self._pending:
            return
        step_time = (time.perf_counter() - window_start) / len(self._pending)
        records = [step_record(pending, step_time) for pending in self._pending]
        for record in records:
            self.totals.add(record)
            self.consecutive_bad = self.consecutive_bad + 1 if record["skipped"] else 0
        if self.rank == 0:
            self.run.append_steps(records)
        self._pending.clear()
        if self.consecutive_bad >= self.config.train.max_bad_steps:
            raise TrainingError(
                f"{self.consecutive_bad} consecutive steps had a non-finite loss or gradient "
                f"(up to step {records[-1]['step']}); stopping. Nothing was written over the "
                f"last good checkpoint ({self.run.checkpoint}). Lower lr, check the data, or "
                "raise max_bad_steps.")

    def epoch_record(self, validation: dict[str, float]) -> dict[str, Any]:
        """The finished epoch: its running totals, validation, and the multipliers."""
        with_energy = self.penalty is not None
        record = {"epoch": self.epoch, "phase": self.config.phase(self.epoch),
                  **self.totals.summary(with_energy, self.koopman is not None), **validation}
        record["time_s"] = record["train_time_s"] + validation["val_time_s"]
        if with_energy:
            lambdas = self.penalty.lambdas.tolist()
            record.update({"lambda": sum(lambdas) / len(lambdas), "lambda_per_layer": lambdas})
        if self.koopman is not None:
            record["koopman_spectral_radius"] = self.koopman.spectral_radius()
        return record

    # ---------------------------------------------------------------- run directory
    def _start_fresh(self, initial: dict[str, float]) -> None:
        run = self.run
        run.start_metrics(initial)
        run.write_config(self.config)
        self.corpus.vocab.save(run.vocab)
        env = environment_info(self.device)
        env.update(parameters=count_parameters(self.model, self.penalty),
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
            "penalty": None if self.penalty is None else self.penalty.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "consecutive_bad": self.consecutive_bad,
            "epoch_totals": self.totals.state_dict(),
            "rng_cpu": rng_states,
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
            else None,
            "previous_batch_size": self.previous_batch_size, "carry": self.carry,
            "previous_embeddings": None if self.previous_embeddings is None
            else self.previous_embeddings.cpu(),
            "config": self.config.to_flat(),
        })
        if self.batch_in_epoch == 0 and self.epoch == self.config.physics.physics_start_epoch:
            self.run.keep_warmup_checkpoint()  # where a control or a sibling run may fork

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.penalty is not None:
            self.penalty.load_state_dict(state["penalty"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step, self.consecutive_bad = state["global_step"], state["consecutive_bad"]
        self.totals = EpochTotals.from_state(state.get("epoch_totals"))
        torch.set_rng_state(state["rng_cpu"][self.rank % len(state["rng_cpu"])])
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.previous_batch_size, self.carry = state["previous_batch_size"], state.get("carry")
        previous = state.get("previous_embeddings")
        if previous is not None and self.world == 1:
            self.previous_embeddings = previous.to(self.device)
        # In data-parallel runs each process compared against its own slice of the previous
        # batch, which the checkpoint does not hold: the first energy term after a resume
        # is skipped, as after a batch-size change.
        if self.rank == 0:
            self.run.keep_metrics_until(self.global_step, self.epoch)  # redone work goes
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


def train(config: Config, run_dir: str | Path, until_epoch: int | None = None,
          corpus: Corpus | None = None) -> list[dict[str, Any]]:
    """Train (or resume) the run in `run_dir`; return its epoch records."""
    return Trainer(config, run_dir, corpus).fit(until_epoch)
