"""The training loop every fastseq model shares: one process or many (torchrun/DDP),
gradient accumulation, mixed precision, faults, evaluation, checkpoints, exact resume.

One run, ``train(task)`` (the model-specific parts are the :class:`~fastseq.training.task.Task`'s):

1. **Set-up**: seeds (Python, torch), threads, the task's data
   (:meth:`Task.setup`, rank 0 prepares, the others wait) and batches, then the
   model (built right after seeding, so its initial weights depend on the seed
   only), Adam, the learning-rate schedule (:mod:`.schedule`).
2. **Updates**: each update sums the gradients of ``accum_steps`` micro-batches
   on each of ``world_size`` processes and normalises by the tokens of the whole
   global batch (:meth:`Task.num_tokens`), so the update is the same whatever
   the split between processes and accumulation (a 2-process run with
   ``accum_steps=1`` equals a 1-process run with ``accum_steps=2``). Global
   batch ``g`` of an epoch goes to rank ``g % world_size``. Gradients are
   clipped to ``clip_norm``; precision per :mod:`.precision`.
3. **Evaluation** (rank 0, every ``eval_every`` updates or once per epoch,
   :mod:`.evaluation`): the task's metrics; plateau decay of the learning rate;
   early stopping after ``patience`` evaluations without improvement.
4. **Checkpoints** (rank 0, atomic, :mod:`.checkpoint`):
   ``checkpoints/step-N.pt`` at each evaluation, keeping the
   ``keep_checkpoints`` best; ``best.pt`` the best of them; ``last.pt`` (full
   training state: model, optimizer, scaler, schedule, every rank's RNG and
   task states, data position) at each evaluation and every ``save_every``
   updates. ``train(task, resume=True)`` continues from ``last.pt`` on exactly
   the trajectory of an uninterrupted run.
5. **Logs**: ``train_log.csv`` / ``eval_log.csv`` (:mod:`.runlog`), a PNG of
   the curves, and ``metrics.json``: the run's figures and the task's final
   test (:meth:`Task.finish`) on ``best.pt``.

Faults (:mod:`.faults`): non-finite losses or gradients never reach the
weights (skip or stop); SIGINT/SIGTERM save ``last.pt`` and raise
:class:`TrainingInterrupted`; ``--resume`` falls back to ``last.prev.pt``,
with a warning, when ``last.pt`` is unreadable.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import torch
from tqdm.auto import tqdm

from fastseq.fileio import atomic_write, remove_stale_tmp
from fastseq.training import distributed
from fastseq.training.checkpoint import (
    load_checkpoint, load_resume_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from fastseq.training.evaluation import CheckpointRetention, due, judge
from fastseq.training.faults import NonFinitePolicy, StopSignals, TrainingError, TrainingInterrupted
from fastseq.training.precision import Precision
from fastseq.training.runlog import TRAIN_FIELDS, CsvLog, eval_fields, plot_curves
from fastseq.training.schedule import LRSchedule
from fastseq.training.state import TrainState
from fastseq.training.task import Runtime, Task

__all__ = ["Trainer", "TrainingError", "TrainingInterrupted", "train"]

logger = logging.getLogger(__name__)


def train(task: Task, resume: bool = False) -> Dict[str, Any]:
    """Train ``task``'s model with its config ``task.cfg`` and return the metrics.

    Under torchrun, every process calls this; rank 0 writes everything and
    returns the metrics (the others return ``{}``).

    Args:
        resume: continue from ``{out}/last.pt`` (model, optimizer, scaler,
            schedule, RNG and task states, data position); the losses then
            continue exactly as in an uninterrupted run with the same world size.

    Raises:
        FileNotFoundError: ``resume`` but no ``last.pt`` in ``out``.
        ValueError: bad config values, or data that does not fit them.
        TrainingError: the fault policy stopped the run.
        TrainingInterrupted: SIGINT/SIGTERM, after ``last.pt`` was written.
    """
    task.cfg.validate()
    device = distributed.pick_device(task.cfg.device)
    ctx = distributed.setup(device)
    try:
        return Trainer(task, ctx, resume).run()
    finally:
        distributed.teardown(ctx)


def _group(it: Iterator[Tuple[int, Any]], n: int) -> Iterator[List[Any]]:
    """Consecutive groups of ``n`` batches (an incomplete last group is dropped)."""
    group: List[Any] = []
    for _, batch in it:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


class Trainer:
    """One training run of ``task`` on this process (see the module docstring);
    :func:`train` makes one and calls :meth:`run`."""

    def __init__(self, task: Task, ctx: distributed.Context, resume: bool):
        cfg = task.cfg
        if "val_loss" not in task.metrics or cfg.best_metric not in task.metrics:
            raise ValueError(f"{type(task).__name__}.metrics {list(task.metrics)} must hold val_loss and "
                             f"best_metric {cfg.best_metric!r}")
        self.task, self.cfg, self.ctx, self.device = task, cfg, ctx, ctx.device
        self.out = Path(cfg.out)
        self.t_process = time.time()
        self.precision = Precision(cfg.precision, self.device)  # checks first
        self.scaler = self.precision.scaler
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        resume_ckpt = load_resume_checkpoint(self.out, task.checkpoint_format) if resume else None
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in (self.out, self.out / "checkpoints"):  # left by a killed writer
                remove_stale_tmp(stale)
        task.setup(Runtime(ctx=ctx, device=self.device, precision=self.precision, out=self.out))
        self.batches = task.train_batches()
        self.per_update = ctx.world_size * cfg.accum_steps
        self.updates_per_epoch = self.batches.num_batches // self.per_update
        if self.updates_per_epoch == 0:
            raise ValueError(
                f"the training data makes {self.batches.num_batches} batches, fewer than one update "
                f"needs (world_size {ctx.world_size} x accum_steps {cfg.accum_steps})"
            )

        self.model = task.build_model().to(self.device)
        if ctx.rank:  # distinct dropout masks per process; the weights are already equal
            torch.manual_seed(cfg.seed + ctx.rank)
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
        ) if ctx.distributed else None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.schedule = LRSchedule(cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps,
                                   cfg.min_lr_ratio, cfg.lr_decay)
        self.nonfinite = NonFinitePolicy(cfg.nonfinite_loss, cfg.max_skipped_updates, self.out / "last.pt")
        self.retention = CheckpointRetention(self.out, cfg.keep_checkpoints)
        self.signals = StopSignals()
        self._interrupted = 0
        self.state = TrainState()
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        if ctx.is_main:
            resume_step = self.state.step if resume_ckpt is not None else None
            self.train_log = CsvLog(self.out / "train_log.csv", TRAIN_FIELDS, resume_step)
            self.eval_log = CsvLog(self.out / "eval_log.csv", eval_fields(task.metrics), resume_step)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        logger.info("model: %s, %.1fM parameters, device %s, %d process(es), precision %s, "
                    "%d updates per epoch", getattr(self.model, "config", type(self.model).__name__),
                    self.n_params / 1e6, self.device, ctx.world_size, self.precision.name,
                    self.updates_per_epoch)

    # ----------------------------------------------------------------- state

    def _payload(self, full: bool) -> Dict[str, Any]:
        payload = {
            **self.task.checkpoint_extras(), "train_config": self.cfg.to_dict(),
            "model": self.model.state_dict(), "step": self.state.step, "epoch": self.state.epoch,
            "metrics": self.state.history[-1] if self.state.history else {},
        }
        if full:
            payload.update(
                optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                schedule=self.schedule.state_dict(), state=asdict(self.state),
                world_size=self.ctx.world_size, accum_steps=self.cfg.accum_steps,
                elapsed=self._elapsed(),
            )
        return payload

    def _restore(self, ckpt: Dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.state = TrainState(**ckpt["state"])
        self.state.elapsed = float(ckpt["elapsed"])
        if ckpt["world_size"] == self.ctx.world_size:
            set_rng_state(ckpt["rng"][self.ctx.rank])
            if "task_state" in ckpt:  # absent in checkpoints written before fastseq.training
                self.task.load_train_state(ckpt["task_state"][self.ctx.rank])
        else:
            logger.warning("resuming %d process(es) from a %d-process checkpoint: dropout masks "
                           "will differ from the original run", self.ctx.world_size, ckpt["world_size"])
        logger.info("resumed from step %d (epoch %d, %d batches into it)", self.state.step,
                    self.state.epoch + 1, self.state.batches_done)

    def _epochs_done(self) -> float:
        """Epochs trained so far, fractional inside an epoch."""
        st = self.state
        return st.epoch + st.batches_done / (self.updates_per_epoch * self.per_update)

    def _elapsed(self) -> float:
        return self.state.elapsed + time.time() - self.t_process

    def _save_last(self) -> None:
        # Collective: every rank calls it; rank 0 stores every rank's states.
        ranks = self.ctx.gather({"rng": rng_state(), "task": self.task.train_state()})
        if self.ctx.is_main:
            save_checkpoint(self.out / "last.pt",
                            {**self._payload(full=True), "rng": [r["rng"] for r in ranks],
                             "task_state": [r["task"] for r in ranks]},
                            keep_previous=self.out / "last.prev.pt", format=self.task.checkpoint_format)

    # ----------------------------------------------------------------- loop

    def run(self) -> Dict[str, Any]:
        cfg, st = self.cfg, self.state
        with self.signals:
            stop = st.stopped_early or self._budget_spent()
            while st.epoch < cfg.epochs and not stop:
                stop = self._epoch()
                if self._interrupted:
                    break
                if st.batches_done >= self.updates_per_epoch * self.per_update:  # epoch complete
                    st.epoch += 1
                    st.batches_done = 0
                    if not cfg.eval_every:
                        stop = self._evaluate() or stop
            if not self._interrupted and self.ctx.any(bool(self.signals.received)):  # during an evaluation
                self._interrupted = self.signals.received or int(signal.SIGTERM)
            if self._interrupted:
                self._save_last()  # collective: every rank learnt of the signal together
                if self.ctx.is_main:
                    for log in (self.train_log, self.eval_log):
                        log.close()
                raise TrainingInterrupted(self._interrupted, st.step, self.out / "last.pt")
            if st.history == [] or st.history[-1]["step"] != st.step:
                self._evaluate()  # the final state is always evaluated and checkpointed
        self.ctx.barrier()
        return self._finish() if self.ctx.is_main else {}

    def _epoch(self) -> bool:
        """Updates until the end of the epoch; True if training must stop."""
        cfg, ctx, st = self.cfg, self.ctx, self.state
        remaining = self.updates_per_epoch - st.batches_done // self.per_update
        it = self.batches.iterate(st.epoch, start=st.batches_done, rank=ctx.rank, world_size=ctx.world_size)
        bar = tqdm(total=self.updates_per_epoch, initial=self.updates_per_epoch - remaining,
                   desc=f"epoch {st.epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and ctx.is_main),
                   dynamic_ncols=True, leave=False)
        self.model.train()
        try:
            for micro in _group(it, cfg.accum_steps):
                if remaining == 0:
                    break
                loss, tokens, lr, dt = self._update(micro)
                remaining -= 1
                st.batches_done += self.per_update
                st.train_time += dt
                bar.update()
                updated = math.isfinite(loss)  # False: skipped for a non-finite loss
                if updated:
                    st.step += 1
                    st.tokens += tokens
                    if ctx.is_main:
                        self.train_log.write(step=st.step, epoch=self._epochs_done(), loss=loss, lr=lr,
                                             tokens=tokens, tokens_per_s=tokens / max(dt, 1e-9),
                                             elapsed_s=self._elapsed())
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{st.tokens / max(st.train_time, 1e-9):.0f}",
                                        lr=f"{lr:.2e}", refresh=False)
                # One collective per update: budget spent, or a signal received, on any rank.
                budget, signalled = ctx.all_reduce_sum([float(self._budget_spent()),
                                                        float(self.signals.received)])
                if signalled:
                    self._interrupted = self.signals.received or int(signal.SIGTERM)  # maybe another rank's
                    return True
                if not updated:
                    continue
                stop = budget > 0
                if cfg.eval_every and due(st.step, cfg.eval_every):
                    stop = self._evaluate() or stop
                elif due(st.step, cfg.save_every):
                    self._save_last()
                if stop:
                    return True
        finally:
            bar.close()
        return False

    def _update(self, micro: List[Any]) -> Tuple[float, int, float, float]:
        """One optimizer update over this process's micro-batches.

        Returns (mean training loss of the global batch, its tokens, lr, seconds)."""
        cfg, ctx, task = self.cfg, self.ctx, self.task
        t0 = time.time()
        lr = self.schedule(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_local = sum(task.num_tokens(b) for b in micro)
        (n_global,) = ctx.all_reduce_sum([float(n_local)])
        net = self.ddp if self.ddp is not None else self.model
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with (net.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()):
                loss, n_tok = task.loss(net, batch)
                # Sum over this micro-batch's tokens / tokens of the global batch; DDP
                # averages over processes, hence * world_size.
                self.scaler.scale(loss * (n_tok * ctx.world_size / n_global)).backward()
            loss_sum += float(loss.detach()) * n_tok
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm))
        # Gradients are already averaged over processes, and the loss sum is reduced
        # here, so every rank takes the same decision below.
        (loss_total,) = ctx.all_reduce_sum([loss_sum])
        loss_mean = loss_total / n_global
        # Under fp16, an overflowing gradient with a finite loss is the GradScaler's
        # normal business: its step() skips the update and lowers the scale.
        scaler_overflow = self.scaler.is_enabled() and math.isfinite(loss_mean)
        if math.isfinite(loss_mean) and (math.isfinite(grad_norm) or scaler_overflow):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_in_a_row = 0
            return loss_mean, int(n_global), lr, time.time() - t0
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()
        self.nonfinite.record(self.state, loss_mean, grad_norm, self.per_update)
        return float("nan"), int(n_global), lr, time.time() - t0

    def _budget_spent(self) -> bool:
        cfg = self.cfg
        if cfg.max_steps and self.state.step >= cfg.max_steps:
            return True
        return bool(cfg.max_minutes) and self._elapsed() >= 60.0 * cfg.max_minutes

    # ----------------------------------------------------------------- evaluation

    def _evaluate(self) -> bool:
        """Validate (rank 0), update the schedule and checkpoints; True to stop early."""
        st = self.state
        decision = None
        if self.ctx.is_main:
            decision = self._validate_and_save()
        stop, plateau, record = self.ctx.broadcast(decision)
        if plateau:
            self.schedule.plateau()
        if not self.ctx.is_main:
            st.history.append(record)
        st.stopped_early = stop
        self._save_last()
        return stop

    def _validate_and_save(self) -> Tuple[bool, bool, Dict[str, float]]:
        cfg, st, task = self.cfg, self.state, self.task
        t0 = time.time()
        metrics = task.validate(self.model)
        score, plateau, stop = judge(st, task.score(metrics), metrics.get("val_loss", math.nan),
                                     cfg.patience)
        lr = self.schedule(st.step) * (cfg.lr_decay if plateau else 1.0)
        record = {"epoch": self._epochs_done(), "step": st.step, **metrics, "lr": lr,
                  "elapsed_s": self._elapsed()}
        st.history.append(record)
        self.eval_log.write(**record)
        self.retention.add(st, score, lambda path: save_checkpoint(
            path, self._payload(full=False), format=task.checkpoint_format))
        msg = (f"step {st.step}: {task.describe(metrics)}, "
               f"{st.tokens / max(st.train_time, 1e-9):.0f} tok/s, {self._elapsed():.0f}s "
               f"(eval {time.time() - t0:.0f}s)" + (", early stop" if stop else ""))
        tqdm.write(msg) if cfg.progress else logger.info("%s", msg)
        return stop, plateau, record

    # ----------------------------------------------------------------- end

    def _finish(self) -> Dict[str, Any]:
        st = self.state
        for log in (self.train_log, self.eval_log):
            log.close()
        metric, title = self.task.plot_metric or (None, None)
        curves = plot_curves(self.out, metric=metric, metric_title=title)
        best = load_checkpoint(self.out / "best.pt", format=self.task.checkpoint_format)
        self.model.load_state_dict(best["model"])
        result: Dict[str, Any] = {
            "steps": st.step, "epochs": round(self._epochs_done(), 2), "train_time_s": st.train_time,
            "wall_time_s": self._elapsed(), "tokens_per_s": st.tokens / max(st.train_time, 1e-9),
            "best_step": best["step"], "best_epoch": best["epoch"], "device": str(self.device),
            "world_size": self.ctx.world_size, "precision": self.precision.name,
            "parameters": self.n_params, "stopped_early": st.stopped_early,
            "skipped_updates": st.skipped_updates, "history": st.history, "curves": str(curves),
        }
        result.update(self.task.finish(self.model, best))
        with atomic_write(self.out / "metrics.json") as f:
            f.write(json.dumps({"config": self.cfg.to_dict(), **result}, indent=2).encode("utf-8"))
        return result
