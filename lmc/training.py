"""Training and evaluation: a plain loop over tensors already on the device."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lmc.data import Dataset
from lmc.errors import ConfigError

__all__ = ["TrainConfig", "TrainingDiverged", "evaluate", "seeded_init", "train", "train_pair"]


@dataclass
class TrainConfig:
    epochs: int = 60  # passes over the training set
    batch_size: int = 128  # examples per optimiser step
    lr: float = 1e-3  # peak learning rate
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9  # SGD momentum (ignored by Adam)
    weight_decay: float = 0.0  # L2 (sgd, adam) or decoupled (adamw) weight decay
    schedule: str = "cosine"  # cosine | linear | constant, stepped every batch
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr
    label_smoothing: float = 0.0
    nesterov: bool = True  # Nesterov momentum for SGD
    bf16: bool = False  # bf16 autocast for the forward pass (CUDA only; ignored on CPU)
    channels_last: bool = False  # channels-last memory format for 4-D inputs and weights (CUDA only)
    compile: bool = False  # torch.compile the model for the training steps
    concurrent_pair: bool = False  # train_pair: train both models at once (two threads, one CUDA stream each)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs must be a positive integer, got {self.epochs}")
        if self.batch_size <= 0:
            raise ConfigError(f"train.batch_size must be a positive integer, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"unknown train.optimizer '{self.optimizer}'; valid: adam, adamw, sgd")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"unknown train.schedule '{self.schedule}'; valid: cosine, linear, constant")
        if self.compile and self.concurrent_pair:
            raise ConfigError("train.compile=true cannot be combined with train.concurrent_pair=true "
                              "(torch.compile is not thread-safe); set one of them to false")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


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
    progress: bool | str = True,
    aug_seed: int | None = None,
) -> list[dict]:
    """Train ``model`` in place on ``data`` (tensors already on the model's device).

    The order of examples is drawn from a generator seeded by ``data_seed`` alone, so the model's
    initialisation and its data order are independent choices. Returns one record per epoch
    (``epoch``, ``loss``: mean training loss, ``lr``).

    If ``data.augment`` is set, every batch is augmented on the device with draws from its own
    generator seeded by ``aug_seed`` (default: ``data_seed``), independent of the data order.
    """
    x, y = data.x_train, data.y_train
    n = len(y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, steps_per_epoch * cfg.epochs))
    order_gen = torch.Generator(device="cpu").manual_seed(data_seed)
    augment = data.augment
    aug_gen = None if augment is None else torch.Generator(device=x.device).manual_seed(
        data_seed if aug_seed is None else aug_seed)
    forward, autocast, memory_format = _fast_path(model, cfg, x.device)
    history = []
    desc = progress if isinstance(progress, str) else "train"
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False)
    model.train()
    # first optimiser step whose loss was not finite (-1: none); kept on the device, read once per epoch
    first_bad = torch.full((), -1, dtype=torch.long, device=x.device)
    for epoch in bar:
        order = torch.randperm(n, generator=order_gen).to(x.device)
        total = torch.zeros((), device=x.device)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = x[idx] if augment is None else augment(x[idx], aug_gen)
            if memory_format is not None:
                xb = xb.contiguous(memory_format=memory_format)
            with autocast():
                loss = F.cross_entropy(forward(xb), y[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                    epoch * steps_per_epoch + i + 1, first_bad)
        mean_loss = total.item() / n
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss became {mean_loss} at step {first_bad.item()} "
                                   f"(epoch {epoch + 1}); lower train.lr?")
        history.append({"epoch": epoch + 1, "loss": mean_loss, "lr": sched.get_last_lr()[0]})
        bar.set_postfix(loss=f"{mean_loss:.3f}")
    if memory_format is not None:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history


def train_pair(
    models: Sequence[nn.Module],
    datas: Sequence[Dataset],
    cfg: TrainConfig,
    seeds: Sequence[int],
    progress: bool = True,
) -> list[list[dict]]:
    """:func:`train` each model on its data with its seed (data order and augmentation), one after the
    other, or with ``cfg.concurrent_pair`` at the same time: one thread per model, each issuing its
    work on its own CUDA stream, so a GPU that one small model leaves idle can overlap the two. The
    trainings share nothing, so the results equal the sequential ones (bit for bit on CPU)."""

    def one(i: int) -> list[dict]:
        label = progress and f"train {'ab'[i]} (seed {seeds[i]})"
        device = datas[i].x_train.device
        stream = torch.cuda.Stream(device) if cfg.concurrent_pair and device.type == "cuda" else None
        if stream is not None:  # start after the work already queued (init, data) on the default stream
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            history = train(models[i], datas[i], cfg, data_seed=seeds[i], aug_seed=seeds[i], progress=label)
        if stream is not None:
            stream.synchronize()
        return history

    if not cfg.concurrent_pair:
        return [one(i) for i in range(len(models))]
    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        return [f.result() for f in [pool.submit(one, i) for i in range(len(models))]]


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
