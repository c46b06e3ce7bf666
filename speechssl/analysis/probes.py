"""Linear probes: how much of a label a linear map can read off frozen features.

A probe is multinomial logistic regression (softmax over the classes, one weight matrix and a bias) on features
standardised with the training set's mean and standard deviation, fitted by full-batch L-BFGS from zero weights,
so the same data always gives the same probe. The penalty ``l2 / (2 N) * |W|^2`` is added to the mean
cross-entropy (N training rows): scikit-learn's ``LogisticRegression(C=1 / l2)``.

- ``fit_probe(x, y, num_classes)`` -> :class:`LinearProbe`;
- ``probe_accuracy(x_train, y_train, x_test, y_test)``: accuracy on the test rows of the probe fitted on the
  training rows;
- ``chance_accuracy(y_train, y_test)``: accuracy of always answering the training set's most frequent class,
  the level a probe on features that carry nothing about the label stays at.

Example::

    acc = probe_accuracy(frames_train, phones_train, frames_test, phones_test)   # [N, D] float, [N] int
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LinearProbe", "fit_probe", "probe_accuracy", "chance_accuracy"]

_STD_FLOOR = 1e-5  # a constant feature is left at zero instead of being blown up


@dataclass
class LinearProbe:
    """``logits = ((x - mean) / std) @ weight.T + bias``: weight [C, D], bias [C], mean and std [D]."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def logits(self, x) -> torch.Tensor:
        """x [N, D] -> [N, C]."""
        z = (_as_float(x) - self.mean) / self.std
        return z @ self.weight.T + self.bias

    def predict(self, x) -> np.ndarray:
        """x [N, D] -> class ids [N]."""
        with torch.no_grad():
            return self.logits(x).argmax(-1).numpy()


def _as_float(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.detach().float().cpu()


def _as_ids(y, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)).long().flatten()
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name}: class ids must be >= 0 (leave unlabelled rows out before probing)")
    return t


def fit_probe(x, y, num_classes: int | None = None, *, l2: float = 1.0, max_iter: int = 100) -> LinearProbe:
    """The probe fitted on features ``x`` [N, D] and class ids ``y`` [N] (``num_classes``: at least max(y) + 1).

    ``max_iter``: L-BFGS iterations (it stops earlier once the gradient is flat).
    """
    x, y = _as_float(x), _as_ids(y, "fit_probe")
    if x.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"fit_probe: x must be [N, D] with one class id per row and N > 0, got x "
                         f"{tuple(x.shape)} and y {tuple(y.shape)}")
    c = max(int(num_classes or 0), int(y.max()) + 1)
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(_STD_FLOOR)
    z = (x - mean) / std
    weight = torch.zeros(c, x.shape[1], requires_grad=True)
    bias = torch.zeros(c, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)
    penalty = float(l2) / (2.0 * x.shape[0])

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight.T + bias, y) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, std)


def probe_accuracy(x_train, y_train, x_test, y_test, *, l2: float = 1.0, max_iter: int = 100) -> float:
    """Accuracy on (``x_test`` [M, D], ``y_test`` [M]) of the probe fitted on (``x_train``, ``y_train``); a test
    class never seen in training counts as an error. NaN without test rows."""
    y_test = _as_ids(y_test, "probe_accuracy")
    if y_test.numel() == 0:
        return float("nan")
    probe = fit_probe(x_train, y_train, int(y_test.max()) + 1, l2=l2, max_iter=max_iter)
    return float((torch.from_numpy(probe.predict(x_test)) == y_test).double().mean())


def chance_accuracy(y_train, y_test) -> float:
    """Accuracy on ``y_test`` of always answering the most frequent class of ``y_train``; NaN without rows."""
    y_train, y_test = _as_ids(y_train, "chance_accuracy"), _as_ids(y_test, "chance_accuracy")
    if y_train.numel() == 0 or y_test.numel() == 0:
        return float("nan")
    majority = int(torch.bincount(y_train).argmax())
    return float((y_test == majority).double().mean())
