"""Where a curve y(T) crosses a level, interpolated in log T.

These one-dimensional primitives define the crossover temperatures (see
`analysis.crossover`) and the default "lazy" fit range (see `analysis.fits`), so both
use the same definition. Inputs are numpy arrays sorted by increasing T > 0; NaN points
are skipped. Results are NaN when the curve does not cross inside the grid.
"""

from __future__ import annotations

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


def plateau_departure(
    T: np.ndarray,
    y: np.ndarray,
    rel_departure: float | None = 0.1,
    abs_departure: float | None = None,
    n_plateau: int = 3,
) -> tuple[float, float]:
    """T at which ``y`` first departs from its small-T plateau, and the plateau.

    The plateau is the mean of ``y`` over the ``n_plateau`` smallest T with finite
    values. The departure is ``y - plateau`` signed along the first point that departs by
    more than the threshold (up or down), so noise averages out; the threshold is
    ``abs_departure`` if given, otherwise ``rel_departure * |plateau|``. The crossing of
    the threshold is searched above the plateau points and interpolated in log T (see
    `first_crossing`). Returns ``(T_departure, plateau)``; T_departure is NaN if there
    are fewer than ``n_plateau + 1`` points or the curve never departs.
    """
    T, y = _finite(T, y)
    if len(T) < n_plateau + 1 or n_plateau < 1:
        return float("nan"), float("nan")
    plateau = float(np.mean(y[:n_plateau]))
    threshold = abs_departure if abs_departure is not None else rel_departure * abs(plateau)
    if not threshold > 0:
        return float("nan"), plateau
    # The departure is signed along the direction of the first large departure, so that
    # noise around the plateau averages out instead of adding up as |y - plateau| would.
    outside = np.flatnonzero(np.abs(y[n_plateau:] - plateau) >= threshold)
    if len(outside) == 0:
        return float("nan"), plateau
    direction = np.sign(y[n_plateau + outside[0]] - plateau)
    # Start the scan at the last plateau point so that a departure right after the
    # plateau is interpolated from it.
    return first_crossing(T, direction * (y - plateau), threshold, start=n_plateau - 1), plateau


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
