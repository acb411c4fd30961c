"""Training the route head: a multinomial logistic regression, pure numpy.

The head is trained when routes load, on every route's example utterances (and, by default,
each route's name as one more example: ``lost_or_stolen_card`` -> "lost or stolen card"), with
L2 regularisation and a compact full-batch L-BFGS. A second regression on the same texts' words
(``lexical``: TF-IDF of words and word pairs) is its lexical view. Training is deterministic
(zero start, fixed iteration rules) and takes a few seconds for 150 routes x 1,500 utterances
on two cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .lexical import LexicalHead, Vocabulary

__all__ = ["GTOL", "MAX_ITER", "MEMORY", "name_text", "train_head", "train_lexical"]

MAX_ITER = 300
GTOL = 1e-5
MEMORY = 10


def name_text(name: str) -> str:
    """A route name as a training example: ``lost_or_stolen-card`` -> ``lost or stolen card``."""
    return " ".join(name.replace("_", " ").replace("-", " ").split()) or name


# --- the optimiser -------------------------------------------------------------------------


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # numpy's own loop: a BLAS level-1 call can be 20x slower when other processes load
    # the cores and OpenBLAS threads wait for each other.
    return float(np.einsum("i,i->", a, b))


def _lbfgs(
    fun: Any, x0: np.ndarray, *, max_iter: int, gtol: float, memory: int = MEMORY
) -> tuple[np.ndarray, int]:
    """Minimise a smooth convex ``fun(x) -> (value, gradient)``: L-BFGS with Armijo
    backtracking. Stops at ``max_iter``, when the largest gradient entry is ``<= gtol``, or
    when a line search finds no decrease (float32 noise near the optimum)."""
    x = x0
    value, grad = fun(x)
    steps: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1 / y.s)
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007 - reported to the caller
        if float(np.max(np.abs(grad))) <= gtol:
            break
        q = -grad
        if steps:
            alphas: list[float] = []
            for s, y, rho in reversed(steps):
                a = rho * _dot(s, q)
                alphas.append(a)
                q -= a * y
            s, y, rho = steps[-1]
            q *= 1.0 / (rho * _dot(y, y))
            for (s, y, rho), a in zip(steps, reversed(alphas), strict=True):
                q += (a - rho * _dot(y, q)) * s
        slope = _dot(grad, q)
        if slope >= 0:  # not a descent direction: restart from the gradient
            steps.clear()
            q = -grad
            slope = -_dot(grad, grad)
        step = 1.0 if steps else min(1.0, 1.0 / max(float(np.max(np.abs(grad))), 1e-12))
        for _ in range(40):
            candidate = x + step * q
            new_value, new_grad = fun(candidate)
            if new_value <= value + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break
        s, y = candidate - x, new_grad - grad
        ys = _dot(y, s)
        if ys > 1e-12:
            steps.append((s, y, 1.0 / ys))
            if len(steps) > memory:
                steps.pop(0)
        x, value, grad = candidate, new_value, new_grad
    return x, iteration


# --- the regressions -----------------------------------------------------------------------


def train_head(
    features: np.ndarray,
    labels: np.ndarray,
    n_routes: int,
    *,
    l2: float,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int = MAX_ITER,
    gtol: float = GTOL,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Multinomial logistic regression: minimise mean cross-entropy + ``l2``/2 ||W||^2 (the
    bias is not penalised). Returns ``(W (D, R) float32, b (R,) float32, iterations)``.

    Matrix products run in float32, the optimiser state in float64. Deterministic for the
    same inputs on the same machine."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.intp)
    n, dim = x.shape
    if n == 0:
        raise ValueError("the head needs at least one training example")
    rows = np.arange(n)
    size = dim * n_routes

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        weights = w[:size].reshape(dim, n_routes)
        z = x @ weights.astype(np.float32)
        z += w[size:].astype(np.float32)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=1)
        loss = float(np.mean(np.log(total.astype(np.float64)) - z[rows, y]))
        loss += 0.5 * l2 * float(np.sum(weights * weights))
        g = e / total[:, None]
        g[rows, y] -= 1.0
        g /= n
        grad_w = (x.T @ g).astype(np.float64) + l2 * weights
        return loss, np.concatenate([grad_w.ravel(), g.sum(axis=0, dtype=np.float64)])

    if init is None:
        x0 = np.zeros(size + n_routes)
    else:
        x0 = np.concatenate([np.asarray(init[0], np.float64).ravel(), np.asarray(init[1])])
    w, iterations = _lbfgs(fun, x0, max_iter=max_iter, gtol=gtol)
    weights = w[:size].reshape(dim, n_routes).astype(np.float32)
    bias = w[size:].astype(np.float32)
    return weights, bias, iterations


def train_lexical(
    texts: Sequence[str],
    labels: np.ndarray,
    n_routes: int,
    *,
    l2: float,
    weight: float,
) -> LexicalHead:
    """The lexical view: a regression on the TF-IDF rows of ``texts``, vocabulary fitted on
    them."""
    vocabulary = Vocabulary.fit(texts)
    weights, bias, _ = train_head(vocabulary.transform(texts), labels, n_routes, l2=l2)
    return LexicalHead(vocabulary, weights, bias, weight)
