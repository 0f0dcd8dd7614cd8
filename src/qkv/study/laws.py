"""The fits of ``qkv study scaling``: isoFLOP valleys and the parametric law L(N, D) = E + A/N^α + B/D^β.

Two ways to read a grid of runs (models of N parameters trained on D tokens, each at one of a few compute budgets
C), as Hoffmann et al. 2022 ("Chinchilla") do:

- **isoFLOP valleys** (their approach 2): at one budget, loss against log N is a valley; a parabola through it
  gives the best size N_opt(C) and its tokens D_opt(C); across budgets, N_opt = k_N · C^a and D_opt = k_D · C^b
  are straight lines in log-log (:func:`isoflop_valley`, :func:`power_law`, :func:`valley_exponents`), with
  intervals by refitting each budget's valley on its runs drawn with replacement
  (:func:`bootstrap_valley_exponents`);
- **the parametric law** (their approach 3): L(N, D) = E + A/N^α + B/D^β fitted to every run at once. Fitted as
  Besiroglu et al. 2024 redid it: log L̂ = LSE(a − α log N, b − β log D, e) with A = e^a, B = e^b, E = e^e,
  the Huber loss (δ = 1e-3) of log L̂ − log L summed over runs, minimised by L-BFGS from every start of a grid,
  the best kept (:func:`fit_law`); intervals by refitting on runs drawn with replacement (:func:`bootstrap_law`).

Everything here is numpy and ``scipy.optimize`` (the ``study`` extra); nothing trains.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..extras import require

__all__ = ["Law", "CHINCHILLA", "fit_law", "bootstrap_law", "isoflop_valley", "Valley", "power_law", "PowerLaw",
           "valley_exponents", "valleys_fitted", "bootstrap_valley_exponents", "huber", "START_GRID"]

HUBER_DELTA = 1e-3

# starts for L-BFGS: α, β ∈ {0, 0.5, 1, 1.5, 2}, e ∈ {-1, 0, 1}, a, b ∈ {0, 5, ..., 25} as Chinchilla's grid
# (e thinned from five values to three: the valley of e is broad and every fit here found the same optimum)
START_GRID = tuple(itertools.product((0.0, 5.0, 10.0, 15.0, 20.0, 25.0), (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                                     (-1.0, 0.0, 1.0), (0.0, 0.5, 1.0, 1.5, 2.0), (0.0, 0.5, 1.0, 1.5, 2.0)))


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A/N^α + B/D^β, with the fit's objective (summed Huber loss; NaN for a law not fitted here)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimum(self, c6: np.ndarray | float) -> tuple[np.ndarray | float, np.ndarray | float]:
        """The N and D that minimise L under N·D = c6 (C = 6ND): N_opt = G (C/6)^(β/(α+β)), D_opt = (C/6)/N_opt,
        G = (αA / βB)^(1/(α+β)) (Chinchilla, eq. 4)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n = g * np.power(c6, self.beta / (self.alpha + self.beta))
        return n, c6 / n

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# Hoffmann et al. 2022, approach 3 (eq. 10): the plan's prior before this corpus has been measured
CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r and its derivative: r²/2 inside |r| <= δ, δ(|r| - δ/2) outside."""
    inside = np.abs(r) <= delta
    return np.where(inside, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)), np.where(inside, r, delta * np.sign(r))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
               ) -> tuple[float, np.ndarray]:
    """Σ Huber(LSE(a − α log N, b − β log D, e) − log L) and its gradient in θ = (a, b, e, α, β)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, runs)
    top = terms.max(0)
    weights = np.exp(terms - top)
    total = weights.sum(0)
    predicted = top + np.log(total)
    weights /= total  # softmax: ∂LSE/∂term
    value, slope = huber(predicted - log_l, delta)
    grad = np.array([(slope * weights[0]).sum(), (slope * weights[1]).sum(), (slope * weights[2]).sum(),
                     -(slope * weights[0] * log_n).sum(), -(slope * weights[1] * log_d).sum()])
    # scaled by 1/δ: the sum is then about Σ|r| (order 0.1, not 1e-5), so L-BFGS's tolerances, which are
    # absolute below 1, mean something
    return float(value.sum()) / delta, grad / delta


def _grid_values(starts: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
                 ) -> np.ndarray:
    """The objective at every start at once: (starts, 5) → (starts,)."""
    a, b, e, alpha, beta = (starts[:, i:i + 1] for i in range(5))
    predicted = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    return huber(predicted - log_l, delta)[0].sum(1)


def _best_per_exponents(starts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each distinct (α, β) among ``starts``, the start with the lowest ``value``."""
    best: dict[tuple[float, float], int] = {}
    for i, (alpha, beta) in enumerate(starts[:, 3:].tolist()):
        if (alpha, beta) not in best or values[i] < values[best[alpha, beta]]:
            best[alpha, beta] = i
    return starts[sorted(best.values())]


def fit_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *,
            starts: Sequence[Sequence[float]] = START_GRID, delta: float = HUBER_DELTA) -> Law:
    """Fit L(N, D) = E + A/N^α + B/D^β to runs (N parameters, D tokens, loss), Besiroglu et al.'s way: Huber(δ) on
    log L, L-BFGS from starts (a, b, e, α, β) of the grid ``starts``, the lowest result kept. α, β are kept in
    [0, 3]. A grid of more than 25 starts is thinned first: every start is scored at once and, for each (α, β) of
    the grid, L-BFGS starts from its best (a, b, e) only — the exponents stay diverse (the 30 best starts overall
    all sat in one wrong basin, α at its bound), and the whole grid one by one took 12 minutes for the same optimum.
    Raises ValueError with fewer than 5 runs (5 unknowns)."""
    optimize = require("scipy.optimize", "the scaling study's fits")
    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=np.float64)) for x in (n, d, loss))
    if len(log_l) < 5:
        raise ValueError(f"fitting L(N, D) takes at least 5 runs (5 unknowns), got {len(log_l)}")
    bounds = [(None, None), (None, None), (None, None), (0.0, 3.0), (0.0, 3.0)]
    starts = np.asarray(starts, dtype=np.float64)
    if len(starts) > 25:
        starts = _best_per_exponents(starts, _grid_values(starts, log_n, log_d, log_l, delta))
    best = None
    for start in starts:
        found = optimize.minimize(_objective, np.asarray(start, dtype=np.float64), args=(log_n, log_d, log_l, delta),
                                  jac=True, method="L-BFGS-B", bounds=bounds,
                                  options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-9})
        if np.all(np.isfinite(found.x)) and (best is None or found.fun < best.fun):
            best = found
    a, b, e, alpha, beta = best.x
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta),
               objective=float(best.fun))


def bootstrap_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float], law: Law, *, samples: int = 200,
                  seed: int = 0, coverage: float = 0.9) -> dict[str, tuple[float, float]]:
    """Intervals over runs: refit on ``samples`` draws of the runs with replacement (each refit starts at
    ``law``, the fit to all runs), → {name: (low, high)} covering ``coverage`` of the refits, for E, A, B, α, β
    and a = β/(α+β), the exponent of N_opt ∝ C^a."""
    rng = np.random.default_rng(seed)
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    starts = [(math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta)]
    rows = []
    for _ in range(samples):
        pick = rng.integers(0, len(n), len(n))
        if len(np.unique(pick)) < 5:
            continue
        fitted = fit_law(n[pick], d[pick], loss[pick], starts=starts)
        rows.append((fitted.E, fitted.A, fitted.B, fitted.alpha, fitted.beta,
                     fitted.beta / (fitted.alpha + fitted.beta) if fitted.alpha + fitted.beta > 0 else math.nan))
    values = np.array(rows)
    tail = 100 * (1 - coverage) / 2
    names = ("E", "A", "B", "alpha", "beta", "a = beta/(alpha+beta)")
    return {name: (float(np.nanpercentile(values[:, i], tail)), float(np.nanpercentile(values[:, i], 100 - tail)))
            for i, name in enumerate(names)}


@dataclass(frozen=True)
class Valley:
    """One budget's isoFLOP valley: the parabola loss = p0 + p1 x + p2 x² in x = ln N and its minimum."""

    flops: float
    n_opt: float
    d_opt: float
    loss: float
    curvature: float  # p2: > 0 for a valley
    inside: bool  # the minimum lies between the smallest and the largest N of the budget


def isoflop_valley(flops: float, n: Sequence[float], d: Sequence[float], loss: Sequence[float]) -> Valley:
    """Fit a parabola in ln N through one budget's runs (at least 3) → its minimum: N_opt, the tokens D_opt a
    model of that size reads at this budget (ln D interpolated in ln N between the runs, extrapolated linearly
    past them) and the loss there. A parabola that opens downwards (no valley) gives NaN for all three."""
    x = np.log(np.asarray(n, dtype=np.float64))
    order = np.argsort(x)
    x, log_d, y = x[order], np.log(np.asarray(d, dtype=np.float64))[order], np.asarray(loss, dtype=np.float64)[order]
    if len(x) < 3:
        raise ValueError(f"a parabola through an isoFLOP valley takes at least 3 runs, got {len(x)}")
    p2, p1, p0 = np.polyfit(x, y, 2)
    if p2 <= 0:
        return Valley(flops, math.nan, math.nan, math.nan, float(p2), False)
    best = -p1 / (2 * p2)
    slope = np.polyfit(x, log_d, 1)[0]
    log_d_best = np.interp(best, x, log_d) if x[0] <= best <= x[-1] else (
        log_d[0] + slope * (best - x[0]) if best < x[0] else log_d[-1] + slope * (best - x[-1]))
    return Valley(float(flops), float(math.exp(best)), float(math.exp(log_d_best)),
                  float(p0 + p1 * best + p2 * best ** 2), float(p2), bool(x[0] <= best <= x[-1]))


@dataclass(frozen=True)
class PowerLaw:
    """y = k · x^exponent, fitted as a line in log-log."""

    k: float
    exponent: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.k * np.power(x, self.exponent)

    def inverse(self, y: np.ndarray | float) -> np.ndarray | float:
        return np.power(np.asarray(y, dtype=np.float64) / self.k, 1.0 / self.exponent)


def power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """The least-squares line through (ln x, ln y) → y = k x^exponent (at least 2 finite points)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if keep.sum() < 2:
        raise ValueError(f"a power law takes at least 2 positive points, got {int(keep.sum())}")
    exponent, log_k = np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)
    return PowerLaw(float(math.exp(log_k)), float(exponent))


def valleys_fitted(valleys: Sequence[Valley]) -> list[Valley]:
    """The valleys the power laws of :func:`valley_exponents` go through: those with a finite minimum; when 2 or
    more have theirs inside the sizes run, those only (a minimum past the sizes is the parabola extrapolated)."""
    found = [v for v in valleys if math.isfinite(v.n_opt)]
    inside = [v for v in found if v.inside]
    return inside if len(inside) >= 2 else found


def valley_exponents(budgets: Sequence[tuple[float, Sequence[float], Sequence[float], Sequence[float]]]
                     ) -> tuple[list[Valley], PowerLaw | None, PowerLaw | None]:
    """One (flops, n, d, loss) per budget → (each budget's :func:`isoflop_valley`, N_opt ∝ C^a, D_opt ∝ C^b).

    The power laws go through :func:`valleys_fitted`; None without 2 of them."""
    valleys = [isoflop_valley(c, n, d, loss) for c, n, d, loss in budgets]
    found = valleys_fitted(valleys)
    if len(found) < 2:
        return valleys, None, None
    flops = [v.flops for v in found]
    return valleys, power_law(flops, [v.n_opt for v in found]), power_law(flops, [v.d_opt for v in found])


def bootstrap_valley_exponents(budgets: Sequence[tuple[float, Sequence[float], Sequence[float], Sequence[float]]],
                               *, samples: int = 200, seed: int = 0, coverage: float = 0.9
                               ) -> dict[str, tuple[float, float]]:
    """Intervals over runs for the isoFLOP exponents: each budget's runs drawn with replacement (a draw with
    fewer than 3 distinct sizes in some budget is drawn again), the valleys and :func:`valley_exponents` refitted
    ``samples`` times → {"a": (low, high), "b": (low, high)} covering ``coverage`` of the refits (NaN, NaN when
    no refit gave exponents)."""
    rng = np.random.default_rng(seed)
    arrays = [(c, *(np.asarray(x, dtype=np.float64) for x in (n, d, loss))) for c, n, d, loss in budgets]
    rows = []
    for _ in range(samples):
        drawn = []
        for c, n, d, loss in arrays:
            pick = rng.integers(0, len(n), len(n))
            while len(np.unique(n[pick])) < 3:
                pick = rng.integers(0, len(n), len(n))
            drawn.append((c, n[pick], d[pick], loss[pick]))
        _, n_law, d_law = valley_exponents(drawn)
        if n_law is not None and d_law is not None:
            rows.append((n_law.exponent, d_law.exponent))
    if not rows:
        return {"a": (math.nan, math.nan), "b": (math.nan, math.nan)}
    values, tail = np.array(rows), 100 * (1 - coverage) / 2
    return {name: (float(np.percentile(values[:, i], tail)), float(np.percentile(values[:, i], 100 - tail)))
            for i, name in enumerate(("a", "b"))}
