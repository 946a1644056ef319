"""Synthetic results cubes with known power laws, written to Zarr like the engine's.

Every builder takes a seeded numpy Generator, so the cubes are deterministic. Values
follow the laws of `Laws` times log-normal seed noise; cells flagged diverged,
unfinished or missing get absurd values (1e6) so that a statistic that averages them in
is visibly wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ensemble.schema import (
    CELL_VARS,
    CHECKPOINT_VARS,
    CONVERGED,
    COORDS,
    DIMS,
    DIVERGED,
    LAYER_VARS,
    MISSING,
    OUTCOME_FLAGS,
    PERCEPTRON_VARS,
    UNFINISHED,
    checkpoint_steps,
)

ABSURD = 1e6


@dataclass(frozen=True)
class Laws:
    """Known laws of the synthetic T-sweep (at every alpha).

    rel_change = A_rel T^delta P^gamma, t_star = A_t T^c P^b, test error
    err0 (P/1024)^-0.3 (1 + (T/T_c(P))^2) with T_c(P) = T_c0 (P/1024)^-a, a = gamma/delta,
    each times exp(sigma * N(0, 1)) per seed (sigma_err for the test error).
    """

    delta: float = 0.5
    gamma: float = 0.35
    c: float = 1.0
    b: float = 1.4
    A_rel: float = 0.01
    A_t: float = 125.0
    T_c0: float = 2.0**-4
    err0: float = 0.1
    sigma: float = 0.1
    sigma_err: float = 0.02

    @property
    def a(self) -> float:
        return self.gamma / self.delta

    def T_c(self, P: np.ndarray) -> np.ndarray:
        return self.T_c0 * (np.asarray(P) / 1024.0) ** -self.a


def group_attrs(experiment: str, **overrides: object) -> dict:
    attrs = dict(
        experiment=experiment,
        sweep="synthetic",
        dataset="mnist",
        arch="fc",
        h=128,
        L=5,
        activation="relu",
        B=16,
        pte=32768,
        d=0,
        chi=0.0,
        max_steps=1_000_000,
        dtype="float32",
        tf32=False,
        package_version="0.1.0",
        git_commit="0000000",
        torch_version="none",
        device="synthetic",
        created="2024-01-01T00:00:00",
    )
    attrs.update(overrides)
    return attrs


def cube_dataset(
    alpha: np.ndarray,
    T: np.ndarray,
    P: np.ndarray,
    n_seed: int,
    values: dict[str, np.ndarray],
    outcome: np.ndarray,
    attrs: dict,
    perceptron: bool = False,
    checkpoints: bool = True,
) -> xr.Dataset:
    """A Dataset following `ensemble.schema`; unspecified variables are NaN, and cells
    not converged get ABSURD values in every variable (missing ones also done=False).
    With ``checkpoints=False`` the checkpoint variables are all NaN (no dynamics)."""
    h = 1 if perceptron else attrs["h"]
    shape = (len(alpha), len(T), len(P), n_seed)
    steps = np.array(checkpoint_steps())
    coords = {
        "alpha": ("alpha", np.asarray(alpha, float)),
        "T": ("T", np.asarray(T, float)),
        "P": ("P", np.asarray(P, np.int64)),
        "seed": ("seed", np.arange(n_seed)),
        "dt": ("T", np.asarray(T, float) * h * attrs["B"]),
        "layer": ("layer", np.array(["w0", "w1", "w_out"], dtype=object)),
        "checkpoint": ("checkpoint", np.arange(len(steps))),
        "checkpoint_step": ("checkpoint", steps),
    }
    spoiled = outcome != CONVERGED
    data: dict = {}
    names = dict(CELL_VARS) | (dict(PERCEPTRON_VARS) if perceptron else {})
    for name, (long_name, units) in names.items():
        v = np.asarray(values.get(name, np.full(shape, np.nan)), float).copy()
        v[spoiled] = ABSURD
        data[name] = (DIMS, v, {"long_name": long_name, "units": units})
    for name, (long_name, units) in LAYER_VARS.items():
        base = "dw2" if name == "dw2_layer" else "w0_2"
        v = np.repeat(data[base][1][..., None] / 3.0, 3, axis=-1)
        data[name] = ((*DIMS, "layer"), v, {"long_name": long_name, "units": units})
    dt = np.asarray(T, float)[None, :, None, None, None] * h * attrs["B"]
    t_ckpt = dt * steps
    t_star = data["t_star"][1][..., None]
    ckpt = {
        "ckpt_t": np.broadcast_to(t_ckpt, (*shape, len(steps))),
        "ckpt_train_loss": np.where(t_ckpt <= t_star, 1.0 / (1.0 + 10 * t_ckpt / t_star), np.nan),
        "ckpt_test_error": 0.5 / (1.0 + t_ckpt / t_star) + 0.05,
    }
    for name, (long_name, units) in CHECKPOINT_VARS.items():
        v = np.array(ckpt[name], float) if checkpoints else np.full((*shape, len(steps)), np.nan)
        v[spoiled] = ABSURD
        data[name] = ((*DIMS, "checkpoint"), v, {"long_name": long_name, "units": units})
    data["done"] = (DIMS, outcome != MISSING, {"long_name": "cell computed", "units": "1"})
    data["outcome"] = (
        DIMS,
        outcome.astype(np.int8),
        {
            "long_name": "outcome of training",
            "units": "1",
            "flag_values": list(OUTCOME_FLAGS),
            "flag_meanings": " ".join(OUTCOME_FLAGS.values()),
        },
    )
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    for name, attr in COORDS.items():
        ds[name].attrs.update(attr)
    return ds


def lognormal(rng: np.random.Generator, sigma: float, shape: tuple) -> np.ndarray:
    return np.exp(sigma * rng.standard_normal(shape))


def tsweep_dataset(
    rng: np.random.Generator,
    laws: Laws = Laws(),
    *,
    experiment: str = "fc_mnist_tsweep",
    alpha: tuple = (2.0**15,),
    T: np.ndarray | None = None,
    P: tuple = (1024, 2048, 4096, 8192, 16384),
    n_seed: int = 8,
    n_spoiled: int = 12,
) -> xr.Dataset:
    """A lazy-regime T-sweep following `laws`, with ``n_spoiled`` random cells flagged
    diverged, unfinished or missing (absurd values)."""
    T = 2.0 ** np.arange(-13, -1) if T is None else np.asarray(T, float)
    a_, T_, P_ = np.meshgrid(np.asarray(alpha), T, np.asarray(P, float), indexing="ij")
    a_, T_, P_ = a_[..., None], T_[..., None], P_[..., None]
    shape = (len(alpha), len(T), len(P), n_seed)
    attrs = group_attrs(experiment)
    dt = T_ * attrs["h"] * attrs["B"]
    rel = laws.A_rel * T_**laws.delta * P_**laws.gamma * lognormal(rng, laws.sigma, shape)
    t_star = laws.A_t * T_**laws.c * P_**laws.b * lognormal(rng, laws.sigma, shape)
    err = (
        laws.err0
        * (P_ / 1024.0) ** -0.3
        * (1 + (T_ / laws.T_c(P_)) ** 2)
        * lognormal(rng, laws.sigma_err, shape)
    )
    w0_2 = np.full(shape, 166016.0)
    values = {
        "test_error": np.minimum(err, 0.5),
        "train_loss": np.zeros(shape),
        "n_unfitted": np.zeros(shape),
        "steps": np.ceil(t_star / dt),
        "t_star": t_star,
        "rel_change": rel,
        "w0_2": w0_2,
        "dw2": rel**2 * w0_2,
        "seconds": np.full(shape, 1.5),
    }
    outcome = np.full(shape, CONVERGED)
    cells = rng.choice(outcome.size, size=n_spoiled, replace=False)
    flags = [DIVERGED, UNFINISHED, MISSING]
    outcome.flat[cells] = [flags[i % 3] for i in range(n_spoiled)]
    return cube_dataset(np.asarray(alpha), T, np.asarray(P), n_seed, values, outcome, attrs)


def phase_dataset(rng: np.random.Generator, *, experiment: str = "fc_mnist_phase") -> xr.Dataset:
    """A (alpha, T) phase diagram at P = 1024 with diverged (large T, small alpha),
    unfinished (smallest alpha and T), missing (one cell) and partial cells."""
    alpha = 2.0 ** np.arange(-4, 9, 2)
    T = 2.0 ** np.arange(-12, -1, 2)
    P, n_seed = (1024,), 3
    shape = (len(alpha), len(T), 1, n_seed)
    a_, T_ = np.meshgrid(alpha, T, indexing="ij")
    a_, T_ = a_[:, :, None, None], T_[:, :, None, None]
    attrs = group_attrs(experiment, activation="gelu")
    noise = lognormal(rng, 0.05, shape)
    err = (0.02 + 0.03 / (1 + np.log2(a_) ** 2 / 20) + 0.01 * np.log2(T_ / T_.min())) * noise
    rel = 0.05 * T_**0.5 * a_**-0.5 * noise
    t_star = 200.0 * T_ * 1024**1.4 * (1 + 1 / a_) * noise
    values = {
        "test_error": err,
        "rel_change": rel,
        "t_star": t_star,
        "steps": t_star / (T_ * 128 * 16),
        "train_loss": np.zeros(shape),
    }
    outcome = np.full(shape, CONVERGED)
    outcome[(np.log2(T_) >= -4) & (np.log2(a_) <= 0) & np.ones(shape, bool)] = DIVERGED
    outcome[0, 0] = UNFINISHED
    outcome[-1, -1] = MISSING
    outcome[2, 3, 0, 0] = DIVERGED  # a partial cell: one seed of three diverged
    return cube_dataset(alpha, T, np.asarray(P), n_seed, values, outcome, attrs, checkpoints=False)


NTK_LAW = (2.0**3, 0.25, 0.4)
"""(alpha* at T = 2^-8 and P = 1024, its T exponent, its P exponent) of
`ntk_phase_dataset`."""


def ntk_phase_dataset(seed: int, noise: float = 0.0, P=(1024,)) -> tuple[xr.Dataset, np.ndarray]:
    """`phase_dataset` (alpha = 2^-4 .. 2^8, T = 2^-12 .. 2^-2) at each P with an NTK
    change (alpha*(T, P) / alpha)^2 times log-normal seed noise (sd ``noise`` in ln),
    alpha*(T, P) = A (T / 2^-8)^s (P / 1024)^k with (A, s, k) = NTK_LAW: inside the grid
    at every T for P <= 2048. Returns the Dataset and alpha* over (T, P)."""
    one = phase_dataset(np.random.default_rng(seed))
    ds = xr.concat([one.assign_coords(P=[p]) for p in P], "P")
    a0, slope, k = NTK_LAW
    star = a0 * (ds["T"] / 2.0**-8) ** slope * (ds["P"] / 1024) ** k
    eps = np.random.default_rng(seed + 1).normal(0, noise, ds["rel_change"].shape)
    change = ((star / ds["alpha"]) ** 2).broadcast_like(ds["rel_change"]) * np.exp(eps)
    return ds.assign(ntk_change=change), star.transpose("T", "P").values


def optimum_dataset(
    rng: np.random.Generator, k: float = 0.5, *, n_seed: int = 4, sigma: float = 0.01
) -> xr.Dataset:
    """A phase diagram at P = 256 whose test error is lowest at T_opt = 2^-8 alpha^k
    (alpha <= 1: an interior optimum, parabolic in log2 T), rising with T for the lazy
    alpha = 2^8 (a small-T edge), and for alpha = 2^-10 (T_opt 2^-13) diverged beyond T = 2^-14 (the
    optimum at the stability edge)."""
    alpha = np.array([2.0**-10, 2.0**-6, 2.0**-4, 2.0**-2, 1.0, 2.0**8])
    T = 2.0 ** np.arange(-16, -3, 1.0)
    shape = (len(alpha), len(T), 1, n_seed)
    a_, T_ = np.meshgrid(alpha, T, indexing="ij")
    a_, T_ = a_[:, :, None, None], T_[:, :, None, None]
    opt = np.where(a_ <= 1, 2.0**-8 * a_**k, 2.0**-20)
    err = 0.1 + 0.004 * (np.log2(T_) - np.log2(opt)) ** 2
    err = err * lognormal(rng, sigma, shape)
    values = {
        "test_error": err,
        "rel_change": 0.05 * np.ones(shape),
        "t_star": 10.0 * np.ones(shape),
        "steps": 10.0 / (T_ * 128 * 16) * np.ones(shape),
        "train_loss": np.zeros(shape),
    }
    outcome = np.full(shape, CONVERGED)
    outcome[(a_ == alpha[0]) & (T_ > 2.0**-14) & np.ones(shape, bool)] = DIVERGED
    attrs = group_attrs("fc_feature_phase", activation="gelu")
    return cube_dataset(
        alpha, T, np.asarray([256]), n_seed, values, outcome, attrs, checkpoints=False
    )


def perceptron_dataset(
    rng: np.random.Generator,
    chi: float,
    d: int = 16,
    *,
    n_seed: int = 5,
    sigma: float = 0.1,
    noise_P: float = 0.0,
) -> xr.Dataset:
    """Perceptron group at alpha = 2^15 with signal w_par - w_par0 = 0.1 T P^(1/(1+chi)),
    noise sqrt(dnoise) = 0.5 T (P/1024)^noise_P, t* = 0.01 T P^((3+chi)/(1+chi))."""
    alpha = (2.0**15,)
    T = 2.0 ** np.arange(-12, 1, 2)
    P = (1024, 2048, 4096, 8192, 16384)
    shape = (1, len(T), len(P), n_seed)
    T_ = T[None, :, None, None]
    P_ = np.asarray(P, float)[None, None, :, None]
    w_par0 = rng.standard_normal(shape)
    noise0 = np.ones(shape) + 0.1 * rng.standard_normal(shape)
    signal = 0.1 * T_ * P_ ** (1 / (1 + chi)) * lognormal(rng, sigma, shape)
    dnoise = (0.5 * T_ * (P_ / 1024) ** noise_P * lognormal(rng, sigma, shape)) ** 2
    t_star = 0.01 * T_ * P_ ** ((3 + chi) / (1 + chi)) * lognormal(rng, sigma, shape)
    values = {
        "w_par": w_par0 + signal,
        "w_par0": w_par0,
        "noise": noise0 + dnoise,
        "noise0": noise0,
        "dnoise": dnoise,
        "x1_unfitted": np.full(shape, np.nan),
        "t_star": t_star,
        "steps": t_star / (T_ * 2),
        "test_error": 0.1 * (P_ / 1024) ** -0.5 * np.ones(shape),
        "rel_change": np.sqrt(signal**2 + 15 * dnoise) / 4.0,
        "train_loss": np.zeros(shape),
    }
    outcome = np.full(shape, CONVERGED)
    outcome[0, -1, 0, 0] = DIVERGED
    attrs = group_attrs(
        f"perceptron_chi{chi:g}_d{d}",
        dataset="perceptron",
        arch="perceptron",
        h=1,
        L=0,
        B=2,
        pte=8192,
        d=d,
        chi=float(chi),
    )
    return cube_dataset(
        np.asarray(alpha),
        T,
        np.asarray(P),
        n_seed,
        values,
        outcome,
        attrs,
        perceptron=True,
        checkpoints=False,
    )


def write_cube(
    path: Path, datasets: dict[str, xr.Dataset], engine_chunks: tuple[str, ...] = ()
) -> Path:
    """Write one group per experiment and the root attribute ``experiments``.

    Groups named in ``engine_chunks`` are chunked like the engine's writer (one chunk per
    (P, seed) slice of the (alpha, T) plane); the others in one chunk per variable, which
    is faster to write.
    """
    zarr.open_group(str(path), mode="w").attrs["experiments"] = list(datasets)
    for name, ds in datasets.items():
        encoding = {}
        if name in engine_chunks:
            encoding = {
                var: {
                    "chunks": tuple(
                        1 if d in ("P", "seed") else n for d, n in ds[var].sizes.items()
                    )
                }
                for var in ds.data_vars
            }
        ds.to_zarr(str(path), group=name, mode="w", consolidated=False, encoding=encoding)
    return path


EDGE_ALPHA = 2.0 ** np.arange(-8, 3, 2.0)  # 2^-8 .. 2^2
EDGE_T = 2.0 ** np.arange(-12, -2, 0.5)


def edge_dataset(k: float, n_seed: int, rng: np.random.Generator) -> tuple[xr.Dataset, np.ndarray]:
    """A phase diagram whose seeds diverge above their own edge 2^-6 alpha^k times a
    log-normal seed factor (sd 0.3 in ln): half of them diverge above 2^-6 alpha^k.
    Returns the Dataset and the seeds' edges (alpha, seed)."""
    edge = (
        2.0**-6 * EDGE_ALPHA[:, None] ** k * np.exp(rng.normal(0, 0.3, (len(EDGE_ALPHA), n_seed)))
    )
    outcome = np.where(EDGE_T[None, :, None] > edge[:, None, :], DIVERGED, CONVERGED)
    outcome = outcome[:, :, None, :].astype(np.int8)  # (alpha, T, P, seed)
    values = {"test_error": np.full(outcome.shape, 0.1)}
    ds = cube_dataset(EDGE_ALPHA, EDGE_T, np.asarray([256]), n_seed, values, outcome,
                      group_attrs("edge"), checkpoints=False)  # fmt: skip
    return ds, edge


def one_curve_dataset(T: np.ndarray, y: np.ndarray) -> xr.Dataset:
    """A T-sweep cube at one alpha (2^15) and P (128) whose 3 seeds all have the test
    error ``y`` along ``T``."""
    shape = (1, len(T), 1, 3)
    values = {"test_error": np.broadcast_to(np.asarray(y)[None, :, None, None], shape).copy()}
    outcome = np.full(shape, CONVERGED)
    return cube_dataset(np.asarray([2.0**15]), T, np.asarray([128]), 3, values, outcome,
                        group_attrs("one"), checkpoints=False)  # fmt: skip
