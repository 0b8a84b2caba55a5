"""Local training with torch: start from the global weights, run the round's epochs of SGD,
return the new weights. With ``prox_mu > 0`` it adds FedProx's proximal term
``mu/2 * ||w - w_global||^2``, which keeps a device with skewed data near the global model.
With ``qat=True`` the forward pass is fake-quantized as the published int8 model will compute it
(`models.qat`), while the weights trained, returned and sent stay plain float32.

Early stopping (``hyper.early_stop_patience > 0``): a seeded ``val_fraction`` of the local data
is held out; after each epoch the loss on it is measured, and training stops once it has not
improved for ``early_stop_patience`` epochs in a row. The weights returned are those of the
best epoch, so a device whose data is exhausted sends the model before it overfitted. A data
set too small to hold out one example (or to keep one for training) trains without it."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedge.envelopes import ModelArch, TrainHyper
from models.qat import enable_qat
from models.torch_state import load_numpy_state, to_numpy_state
from models.zoo import build_model

__all__ = ["TrainResult", "train_local"]


@dataclass(frozen=True)
class TrainResult:
    weights: dict[str, np.ndarray]
    num_samples: int
    loss: float
    accuracy: float
    seconds: float
    epochs: int = 0  # epochs run (fewer than asked after an early stop)
    val_loss: float | None = None  # best held-out loss, with early stopping


def train_local(
    arch: ModelArch,
    weights: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    hyper: TrainHyper,
    seed: int,
    *,
    qat: bool = False,
    mask: Mapping[str, np.ndarray] | None = None,
    trainable: Collection[str] | None = None,
) -> TrainResult:
    """``mask`` (tensor name -> boolean live flags, ``fedge.masks``): the weights it prunes
    are zero from the start and again after every optimizer step, so they come back exactly
    zero whatever momentum, weight decay or the proximal term did.

    ``trainable`` (a fine-tuning round's tensors, ``fedge.trainable``): every other parameter
    has ``requires_grad`` off (no gradient, no optimizer step, no weight decay), and every
    other tensor (buffers too) is returned exactly as in ``weights``."""
    t0 = time.perf_counter()
    model = build_model(arch.name, arch.input_dim, arch.num_classes)
    load_numpy_state(model, weights)
    masked = _Masked(model, mask) if mask else None
    if trainable is not None:
        _freeze(model, trainable)
    if qat:
        enable_qat(model)  # keeps state_dict keys, so the delta below is unchanged in shape
    model.train()
    anchor = [p.detach().clone() for p in model.parameters()] if hyper.prox_mu > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _SGD(params, hyper.lr, hyper.momentum, hyper.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    stopper = _EarlyStop.maybe(hyper, len(yt), gen)
    if stopper is not None:
        (xt, yt), held_out = stopper.split(xt, yt)
    n = len(yt)
    total_loss, total_correct, seen = 0.0, 0, 0
    epochs = 0
    for _ in range(hyper.epochs):
        epochs += 1
        order = torch.randperm(n, generator=gen)
        total_loss, total_correct, seen = 0.0, 0, 0
        for start in range(0, n, hyper.batch_size):
            idx = order[start : start + hyper.batch_size]
            xb, yb = xt[idx], yt[idx]
            model.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            if anchor is not None:
                prox = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + 0.5 * hyper.prox_mu * prox
            loss.backward()
            opt.step()
            if masked is not None:
                masked.apply()
            total_loss += float(loss.detach()) * len(yb)
            total_correct += int((logits.detach().argmax(1) == yb).sum())
            seen += len(yb)
        if stopper is not None and stopper.should_stop(model, loss_fn, *held_out):
            break
    out = stopper.best if stopper is not None and stopper.best else to_numpy_state(model)
    if trainable is not None:
        out = {k: (v if k in trainable else _exact(weights[k], v)) for k, v in out.items()}
    return TrainResult(
        weights=out,
        num_samples=n,
        loss=total_loss / max(seen, 1),
        accuracy=total_correct / max(seen, 1),
        seconds=time.perf_counter() - t0,
        epochs=epochs,
        val_loss=stopper.best_loss if stopper is not None and stopper.best else None,
    )


def _exact(base: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.array(base, dtype=like.dtype)


def _freeze(model: nn.Module, trainable: Collection[str]) -> None:
    names = set(model.state_dict())
    unknown = sorted(set(trainable) - names)
    if unknown:
        raise ValueError(f"trainable names tensors the model does not have: {unknown[:5]}")
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


class _Masked:
    """Multiplies the masked parameters by their live flags (in place, no autograd)."""

    def __init__(self, model: nn.Module, mask: Mapping[str, np.ndarray]) -> None:
        params = dict(model.named_parameters())
        unknown = sorted(set(mask) - set(params))
        if unknown:
            raise ValueError(f"mask names tensors the model does not have: {unknown}")
        self.pairs = [
            (params[k], torch.from_numpy(np.asarray(v, dtype=np.float32))) for k, v in mask.items()
        ]
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for p, flags in self.pairs:
            p.mul_(flags)


class _EarlyStop:
    """Held-out loss after each epoch; keeps the best epoch's weights."""

    def __init__(self, patience: int, n_val: int, order: torch.Tensor) -> None:
        self.patience, self.n_val, self.order = patience, n_val, order
        self.best: dict[str, np.ndarray] = {}
        self.best_loss = float("inf")
        self.bad = 0

    @classmethod
    def maybe(cls, hyper: TrainHyper, n: int, gen: torch.Generator) -> _EarlyStop | None:
        if not hyper.early_stop_patience:
            return None
        n_val = int(n * hyper.val_fraction)
        if n_val < 1 or n - n_val < 1:
            return None
        return cls(hyper.early_stop_patience, n_val, torch.randperm(n, generator=gen))

    def split(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        val, train = self.order[: self.n_val], self.order[self.n_val :]
        return (x[train], y[train]), (x[val], y[val])

    @torch.no_grad()
    def should_stop(
        self, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> bool:
        model.eval()
        loss = float(loss_fn(model(x), y))
        model.train()
        if loss < self.best_loss:  # a NaN loss is never better
            self.best_loss, self.bad = loss, 0
            self.best = to_numpy_state(model)
            return False
        self.bad += 1
        return self.bad >= self.patience


class _SGD:
    """torch.optim.SGD's update rule (dampening 0, no Nesterov), written out: the first
    ``torch.optim`` step imports torch's compiler stack (about +70 MB RSS measured), which a
    device that trains a small model for a few steps does not need."""

    def __init__(
        self, params: Sequence[torch.Tensor], lr: float, momentum: float, wd: float
    ) -> None:
        self.params, self.lr, self.momentum, self.wd = params, lr, momentum, wd
        self.bufs: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=self.wd) if self.wd else p.grad
            if self.momentum:
                buf = self.bufs[i]
                if buf is None:
                    buf = self.bufs[i] = d.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(d)
                d = buf
            p.add_(d, alpha=-self.lr)
