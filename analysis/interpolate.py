"""Where a curve y(T) crosses a level, interpolated in log T.

These one-dimensional primitives define the crossover temperatures (see
`analysis.crossover`) and the default "lazy" fit range (see `analysis.fits`), so both
use the same definition. Inputs are numpy arrays sorted by increasing T > 0; NaN points
are skipped. Results are NaN when the curve does not cross inside the grid.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def first_crossing(T: np.ndarray, y: np.ndarray, level: float, start: int = 0) -> float:
    """Smallest T at which ``y`` reaches ``level`` from below.

    Scans the finite points from index ``start`` (counted among finite points) upwards;
    at the first point with ``y >= level`` it interpolates between that point and the
    previous one, linearly in (log T, log y) when both y are > 0 (exact for power laws)
    and in (log T, y) otherwise. NaN if the first scanned point already reaches the
    level (the crossing is below the grid) or no point does (above the grid).
    """
    T, y = _finite(T, y)
    if level <= 0 or not np.isfinite(level):
        raise ValueError(f"level must be a finite number > 0, got {level!r}")
    above = np.flatnonzero(y[start:] >= level)
    if len(above) == 0:
        return float("nan")
    i = start + int(above[0])
    if i == start:
        return float("nan")
    x0, x1 = np.log(T[i - 1]), np.log(T[i])
    y0, y1 = y[i - 1], y[i]
    if y0 > 0 and y1 > 0:
        y0, y1, target = np.log(y0), np.log(y1), np.log(level)
    else:
        target = level
    frac = 0.0 if y1 == y0 else (target - y0) / (y1 - y0)
    return float(np.exp(x0 + frac * (x1 - x0)))


class Departure(NamedTuple):
    """What `plateau_departure` returns: T_departure, the plateau, and the sign of the
    first point past the threshold (+1 above the plateau, -1 below; 0 where y never
    departs)."""

    T: float
    plateau: float
    sign: int


def plateau_departure(
    T: np.ndarray,
    y: np.ndarray,
    rel_departure: float | None = 0.1,
    abs_departure: float | None = None,
    n_plateau: int = 3,
    below: float = float("nan"),
) -> Departure:
    """T at which ``y`` first departs from its small-T plateau, the plateau, and which way.

    The plateau is the mean of ``y`` over the ``n_plateau`` smallest T with finite
    values. The departure d = ``y - plateau`` is signed along the first point that departs
    by more than the threshold (up or down), so noise averages out; the threshold is
    ``abs_departure`` if given, otherwise ``rel_departure * |plateau|``. The crossing is
    searched from the last plateau point up. With i the first point at or over the
    threshold, it lies on the power law through the departures at i and i + 1 (exact for
    a power-law departure), kept between T[i - 1] and T[i]; where there is no i + 1 or d
    does not grow from i to i + 1, it is interpolated linearly in (log T, d) from i - 1.
    Neither rule reads d at i - 1 in log space, so T_departure moves continuously with
    the point below the threshold, whose departure is mostly noise around 0 (and often
    negative). Returns `Departure` ``(T_departure, plateau, sign)``; T_departure is NaN
    if there are fewer than ``n_plateau + 1`` points or the curve never departs, and
    ``below`` if it already departs at the last plateau point (the crossing is below the
    grid). The sign is read at that first departed point, not at T_departure: clipped
    to T[i - 1], T_departure can fall on the point below the threshold.
    """
    T, y = _finite(T, y)
    if len(T) < n_plateau + 1 or n_plateau < 1:
        return Departure(float("nan"), float("nan"), 0)
    plateau = float(np.mean(y[:n_plateau]))
    threshold = abs_departure if abs_departure is not None else rel_departure * abs(plateau)
    if not threshold > 0:
        return Departure(float("nan"), plateau, 0)
    outside = np.flatnonzero(np.abs(y[n_plateau:] - plateau) >= threshold)
    if len(outside) == 0:
        return Departure(float("nan"), plateau, 0)
    sign = int(np.sign(y[n_plateau + outside[0]] - plateau))
    d = sign * (y - plateau)
    i = n_plateau - 1 + int(np.flatnonzero(d[n_plateau - 1 :] >= threshold)[0])
    if i == n_plateau - 1:
        return Departure(below, plateau, sign)
    x = np.log(T)
    if i + 1 < len(T) and d[i + 1] > d[i]:
        slope = (np.log(d[i + 1]) - np.log(d[i])) / (x[i + 1] - x[i])
        x_c = x[i] + (np.log(threshold) - np.log(d[i])) / slope
    else:
        x_c = x[i - 1] + (threshold - d[i - 1]) / (d[i] - d[i - 1]) * (x[i] - x[i - 1])
    return Departure(float(np.exp(np.clip(x_c, x[i - 1], x[i]))), plateau, sign)


def _finite(T: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    T = np.asarray(T, dtype=float)
    y = np.asarray(y, dtype=float)
    if T.shape != y.shape or T.ndim != 1:
        raise ValueError(f"T and y must be 1-d of the same length, got {T.shape} and {y.shape}")
    keep = np.isfinite(T) & np.isfinite(y) & (T > 0)
    T, y = T[keep], y[keep]
    if np.any(np.diff(T) <= 0):
        raise ValueError("T must be strictly increasing")
    return T, y
