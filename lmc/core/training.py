"""Training and evaluation: a plain loop over tensors already on the device."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lmc.core.data import Dataset
from lmc.errors import ConfigError
from lmc.io import CheckpointDir
from lmc.settings import NonNegativeFloat, PositiveFloat, PositiveInt

__all__ = ["Objective", "TrainConfig", "TrainingDiverged", "check_thread_safe", "concurrently", "evaluate",
           "seeded_init", "train", "train_pair"]


@dataclass
class TrainConfig:
    """A training recipe. These defaults are the ones every ``train=<recipe>`` file starts from
    (``conf/train/*.yaml`` sets what its recipe chooses); they train MNIST-1D's MLP to ~67% test accuracy."""

    epochs: PositiveInt = 30  # passes over the training set
    batch_size: PositiveInt = 128  # examples per optimiser step
    lr: PositiveFloat = 1e-3  # peak learning rate
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: NonNegativeFloat = 0.9  # SGD momentum (ignored by Adam)
    weight_decay: NonNegativeFloat = 0.0  # L2 (sgd, adam) or decoupled (adamw) weight decay
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # stepped every batch
    warmup_epochs: NonNegativeFloat = 0.0  # linear warm-up from 0 to lr
    label_smoothing: NonNegativeFloat = 0.0  # cross-entropy label smoothing
    nesterov: bool = True  # Nesterov momentum for SGD
    bf16: bool = False  # bf16 autocast for the forward pass (CUDA only; ignored on CPU)
    channels_last: bool = False  # channels-last memory format for 4-D inputs and weights (CUDA only)
    compile: bool = False  # torch.compile the model for the training steps
    concurrent_pair: bool = False  # train the models of a pair at once (two threads, one CUDA stream each);
    # bitwise equal to sequential training; models with dropout (global random numbers) are refused
    checkpoint_every: int = 1  # epochs between training checkpoints (run store only; not part of the model hash)
    keep_checkpoints: list[int | str] = field(default_factory=list)  # epochs (3 or "3ep") or steps ("100st")
    # whose checkpoints are kept for later analyses
    stop_loss: PositiveFloat | None = None  # stop after the first epoch whose mean training loss is below this
    # (Entezari et al.'s --stopcond 0.01); `epochs` stays the horizon of the lr schedule

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):  # also when built in Python, without lmc.settings.parse
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"unknown train.optimizer '{self.optimizer}'; valid: adam, adamw, sgd")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"unknown train.schedule '{self.schedule}'; valid: cosine, linear, constant")
        if self.compile and self.concurrent_pair:
            raise ConfigError("train.compile=true cannot be combined with train.concurrent_pair=true "
                              "(torch.compile is not thread-safe); set one of them to false")
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every > 0):
            raise ConfigError(f"train.checkpoint_every must be a positive integer (epochs), "
                              f"got {self.checkpoint_every}")
        if self.stop_loss is not None and not self.stop_loss > 0:
            raise ConfigError(f"train.stop_loss must be positive (or null: train all epochs), got {self.stop_loss}")
        self.keep_steps(1)  # validates keep_checkpoints

    def keep_steps(self, steps_per_epoch: int) -> set[int]:
        """``keep_checkpoints`` as optimiser steps: ``3`` or ``"3ep"`` → end of epoch 3, ``"100st"`` → step 100."""
        steps = set()
        for point in self.keep_checkpoints or ():
            text = str(point).strip()
            unit, num = ("st", text[:-2]) if text.endswith("st") else ("ep", text.removesuffix("ep"))
            if not num.isdigit() or int(num) <= 0:
                raise ConfigError(f"bad train.keep_checkpoints entry '{point}'; valid: epochs (3 or '3ep') "
                                  f"or steps ('100st'), positive")
            steps.add(int(num) * (steps_per_epoch if unit == "ep" else 1))
        return steps


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Objective:
    """What :func:`train` minimises at each step, with hooks at the start and end of every epoch. This one
    is the model's own cross-entropy (plain training); a subclass replaces the loss (the star model of
    :mod:`lmc.core.star`, a loss through interpolated weights) and may keep state of its own, which the
    training checkpoints carry (``state_dict``/``load_state_dict``), so that a resumed run continues it."""

    def loss(self, forward: Callable, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """The step's loss on the batch ``(x, y)``; ``forward`` is the model (or its compiled version)."""
        return F.cross_entropy(forward(x), y, label_smoothing=label_smoothing)

    def epoch_start(self, epoch: int) -> None:
        """Before epoch ``epoch``'s first step (0-based); not called again when a run resumes mid-epoch."""

    def epoch_end(self, epoch: int) -> None:
        """After epoch ``epoch``'s last step, before its record and checkpoint."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass


def seeded_init(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with the global torch RNG seeded by ``seed`` (restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_epochs * total_steps / cfg.epochs)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if cfg.schedule == "linear":
            return 1 - t
        return 1.0

    return factor


def _fast_path(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """The training step's forward function, autocast context and input memory format (GPU options)."""
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cfg.channels_last and cuda else None
    if memory_format is not None:
        model.to(memory_format=memory_format)
    forward = torch.compile(model) if cfg.compile else model
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and cuda)
    return forward, autocast, memory_format


def train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    data_seed: int,
    aug_seed: int | None = None,
    progress: bool | str = True,
    checkpoints: CheckpointDir | None = None,
    stop_step: int | None = None,
    start: Mapping | None = None,
    objective: Objective | None = None,
) -> list[dict]:
    """Train ``model`` in place on ``data`` (tensors already on the model's device).

    The order of examples is drawn from a generator seeded by ``data_seed`` alone, augmentation (and
    any other randomness inside the step) from ``aug_seed`` (default ``data_seed``), so the model's
    initialisation, its data order and its augmentation are independent choices. If ``data.augment``
    is set, every batch is augmented on the device with draws from the augmentation generator. Returns one record
    per epoch (``epoch``, ``loss``: mean training loss, ``lr``).

    With ``cfg.stop_loss``, training stops after the first epoch whose mean training loss (over the epoch's
    batches, in train mode, as Entezari et al.'s trainer) is below it; that epoch's record has
    ``stopped: True`` and ``len(history)`` is the number of epochs trained. The learning-rate schedule keeps
    ``cfg.epochs`` as its horizon, so a run that stops early has not annealed its learning rate to the end.

    With ``checkpoints``, the full training state (model, optimiser, scheduler, generators, RNGs,
    step, history) is written every ``cfg.checkpoint_every`` epochs, at ``cfg.keep_checkpoints`` (kept)
    and at the last step; training resumes from the newest checkpoint found there, and ends bitwise
    identical (on the CPU) to an uninterrupted run. ``stop_step`` stops after that many optimiser
    steps (a spawn parent); ``start`` is such a parent's final state, from which this run continues
    with its own data-order and augmentation seeds (a spawned child). ``objective`` replaces the loss
    of a step (default: the model's cross-entropy, :class:`Objective`); its state is checkpointed too.
    """
    objective = Objective() if objective is None else objective
    x, y = data.x_train, data.y_train
    n = len(y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    last_step = total_steps if stop_step is None else min(stop_step, total_steps)
    keep_steps = cfg.keep_steps(steps_per_epoch)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, total_steps))
    aug_seed = data_seed if aug_seed is None else aug_seed
    order_gen = torch.Generator(device="cpu").manual_seed(data_seed)
    augment = data.augment
    aug_gen = torch.Generator(device=x.device).manual_seed(aug_seed)
    forward, autocast, memory_format = _fast_path(model, cfg, x.device)
    history: list[dict] = []
    step, epoch_sum, epoch_seen = 0, 0.0, 0
    state = checkpoints.latest() if checkpoints is not None else None
    resume = state is not None
    if state is None and start is not None:
        state = start
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = state["step"], list(state["history"])
        if resume:  # the same run, continued: its generators and RNGs as they were
            order_gen.set_state(state["order_gen"])
            aug_gen.set_state(state["aug_gen"])
            epoch_sum, epoch_seen = state["epoch_sum"], state["epoch_seen"]
            objective.load_state_dict(state.get("objective", {}))
    if resume and history and history[-1].get("stopped") and history[-1]["epoch"] * steps_per_epoch == step:
        last_step = step  # this run had already stopped at its loss threshold
    start_epoch, start_i = divmod(step, steps_per_epoch)
    desc = progress if isinstance(progress, str) else "train"
    bar = tqdm(range(start_epoch, cfg.epochs), desc=desc, disable=not progress or step >= last_step, leave=False)
    model.train()
    with _rng_scope(aug_seed, x.device, state["rng"] if resume else None):
        # first optimiser step whose loss was not finite (-1: none); kept on the device, read once per epoch
        first_bad = torch.full((), -1, dtype=torch.long, device=x.device)

        def save(epoch_start_gen: torch.Tensor, epoch_sum: float, epoch_seen: int) -> None:
            at_epoch_end = step % steps_per_epoch == 0
            checkpoints.write(step, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                # the order generator as it was before drawing the current epoch's order
                "order_gen": order_gen.get_state() if at_epoch_end else epoch_start_gen,
                "aug_gen": aug_gen.get_state(), "rng": _rng_state(x.device), "step": step, "history": history,
                "epoch_sum": epoch_sum, "epoch_seen": epoch_seen, "objective": objective.state_dict(),
            }, keep=step in keep_steps)

        def check_finite(loss_sum: float, epoch: int) -> None:
            if not math.isfinite(loss_sum):  # raised before any checkpoint of the diverged state
                raise TrainingDiverged(f"training loss became {loss_sum} at step {first_bad.item()} "
                                       f"(epoch {epoch + 1}); lower train.lr?")

        if checkpoints is not None and state is None and step >= last_step:
            save(order_gen.get_state(), 0.0, 0)  # stopped before the first step (a spawn parent at step 0)
        for epoch in bar:
            if step >= last_step:
                break
            epoch_start_gen = order_gen.get_state()
            order = torch.randperm(n, generator=order_gen).to(x.device)
            total = torch.zeros((), device=x.device)
            first_i = start_i if epoch == start_epoch else 0
            if first_i == 0:
                objective.epoch_start(epoch)
            for i in range(first_i, steps_per_epoch):
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                xb = x[idx] if augment is None else augment(x[idx], aug_gen)
                if memory_format is not None:
                    xb = xb.contiguous(memory_format=memory_format)
                with autocast():
                    loss = objective.loss(forward, xb, y[idx], cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.detach() * len(idx)
                epoch_seen += len(idx)
                step += 1
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
                if i + 1 < steps_per_epoch and (step in keep_steps or step == last_step):
                    # a kept step or the spawn point, mid-epoch: the partial sum is folded here whether or not
                    # this run checkpoints, so a run resumed from here adds the same numbers in the same order
                    epoch_sum += total.item()
                    total.zero_()
                    if checkpoints is not None:
                        check_finite(epoch_sum, epoch)
                        save(epoch_start_gen, epoch_sum, epoch_seen)
                if step >= last_step:
                    break
            mean_loss = (epoch_sum + total.item()) / epoch_seen
            check_finite(mean_loss, epoch)
            if step % steps_per_epoch:
                break  # stopped inside an epoch (spawn parent), checkpointed above
            objective.epoch_end(epoch)
            history.append({"epoch": epoch + 1, "loss": mean_loss, "lr": sched.get_last_lr()[0]})
            if cfg.stop_loss is not None and mean_loss < cfg.stop_loss:
                history[-1]["stopped"] = True
                last_step = step
            epoch_sum, epoch_seen = 0.0, 0
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            if checkpoints is not None and (
                (epoch + 1) % cfg.checkpoint_every == 0 or step in keep_steps or step == last_step
            ):
                save(epoch_start_gen, 0.0, 0)
    if memory_format is not None:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history


def concurrently(jobs: Sequence[Callable[[], object]], enabled: bool, device: torch.device) -> list:
    """Run ``jobs`` one after the other, or with ``enabled`` at the same time: one thread per job, each
    issuing its work on its own CUDA stream (on a CUDA ``device``), so a GPU that one small model leaves
    idle can overlap two trainings. Jobs must share no state."""

    def one(job):
        stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        if stream is None:
            return job()
        stream.wait_stream(torch.cuda.current_stream(device))  # after the work already queued (init, data)
        with torch.cuda.stream(stream):
            out = job()
        stream.synchronize()
        return out

    if not enabled:
        return [one(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return [f.result() for f in [pool.submit(one, job) for job in jobs]]


def check_thread_safe(model: nn.Module, which: str) -> None:
    """ConfigError for ``train.concurrent_pair=true`` if ``model`` has dropout: its forward pass draws global
    random numbers, which two training threads would interleave differently on every run."""
    drop = next((f"{name} ({type(m).__name__}, p={m.p})" for name, m in model.named_modules()
                 if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0), None)
    if drop:
        raise ConfigError(f"train.concurrent_pair=true cannot train model {which}: its module {drop} draws "
                          "global random numbers, which two threads would interleave differently on "
                          "every run; set train.concurrent_pair=false")


def train_pair(
    models: Sequence[nn.Module],
    datas: Sequence[Dataset],
    cfg: TrainConfig,
    seeds: Sequence[int],
    progress: bool = True,
) -> list[list[dict]]:
    """:func:`train` each model on its data with its seed (data order and augmentation), one after the
    other or, with ``cfg.concurrent_pair``, at the same time (:func:`concurrently`). The trainings share
    nothing, so the results equal the sequential ones (bit for bit on CPU). A model with dropout draws
    from the global RNG, which two threads would share in an order that changes from run to run, so
    ``cfg.concurrent_pair`` refuses it."""
    if cfg.concurrent_pair:
        for i, model in enumerate(models):
            check_thread_safe(model, str(i))
    jobs = [functools.partial(train, m, d, cfg, data_seed=s, aug_seed=s, progress=progress and f"train {i} (seed {s})")
            for i, (m, d, s) in enumerate(zip(models, datas, seeds))]
    return concurrently(jobs, cfg.concurrent_pair, datas[0].x_train.device)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextmanager
def _rng_scope(seed: int, device: torch.device, state: Mapping | None = None):
    """Global torch/numpy/python RNGs seeded by ``seed`` (or set to a checkpoint's ``state``) for the
    duration of training, so training depends only on its seeds; the caller's RNG states are restored."""
    saved = _rng_state(device)
    try:
        if state is None:
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
        else:
            torch.set_rng_state(state["torch"])
            np.random.set_state(state["numpy"])
            random.setstate(state["python"])
            if "cuda" in state and device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda"], device)
        yield
    finally:
        torch.set_rng_state(saved["torch"])
        np.random.set_state(saved["numpy"])
        random.setstate(saved["python"])
        if "cuda" in saved:
            torch.cuda.set_rng_state(saved["cuda"], device)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 8192,
    params: dict[str, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` (or of ``model`` with ``params`` swapped in,
    via :func:`torch.func.functional_call`) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        out = model(xb) if params is None else torch.func.functional_call(model, params, (xb,))
        loss_sum += F.cross_entropy(out.float(), yb, reduction="sum").double()
        correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    return loss_sum.item() / len(y), correct.item() / len(y)
