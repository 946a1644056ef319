"""Sweep specifications: shipped files, TOML grammar, validation messages, round trips."""

from __future__ import annotations

import copy
import json
import math

import pytest

from ensemble.cells import Group, SpecError
from ensemble.spec import Experiment, Sweep, load_sweep, shipped_sweeps

FULL = [
    "fc_tsweep_mnist",
    "fc_tsweep_cifar10",
    "mnas_tsweep_mnist",
    "mnas_tsweep_cifar10",
    "fc_phase_mnist",
    "mnas_phase_cifar10",
    "perceptron",
]
CELLS = {
    "fc_tsweep_mnist": 1 * 16 * 5 * 5,
    "fc_tsweep_cifar10": 1 * 16 * 5 * 5,
    "mnas_tsweep_mnist": 1 * 21 * 5 * 5,
    "mnas_tsweep_cifar10": 1 * 21 * 5 * 5,
    "fc_phase_mnist": 26 * 31 * 9 * 1,
    "mnas_phase_cifar10": 26 * 24 * 4 * 1,
    "perceptron": 12 * 18 * 5 * 5,
}


def base() -> dict:
    """A small valid sweep in the file format."""
    return {
        "name": "tiny",
        "description": "a test sweep",
        "experiment": [
            {
                "name": "fc",
                "dataset": "mnist",
                "arch": "fc",
                "h": 8,
                "L": 2,
                "B": 4,
                "pte": 64,
                "max_steps": 100,
                "alpha": [1.0, 2.0],
                "T": [0.5],
                "P": [16, 32],
                "seed": 2,
            }
        ],
    }


def with_exp(**changes) -> dict:
    d = base()
    for key, value in changes.items():
        if value is DROP:
            d["experiment"][0].pop(key)
        else:
            d["experiment"][0][key] = value
    return d


DROP = object()


# -- shipped files -------------------------------------------------------------------------


def test_shipped_list_is_complete():
    assert sorted(shipped_sweeps()) == sorted(FULL + [f"quick_{n}" for n in FULL])


@pytest.mark.parametrize("name", FULL)
def test_shipped_full_and_quick(name):
    full, quick = load_sweep(name), load_sweep(f"quick_{name}")
    assert full.name == name and quick.name == f"quick_{name}"
    assert len(full.cells()) == CELLS[name]
    assert 0 < len(quick.cells()) < len(full.cells())
    assert len(quick.cells()) <= 64
    assert full.expected_cost and quick.expected_cost
    for fe, qe in zip(full.experiments, quick.experiments, strict=False):
        assert qe.settings["arch"] == fe.settings["arch"]
        assert qe.settings["dataset"] == fe.settings["dataset"]
        assert qe.settings["B"] <= fe.settings["B"]
        assert max(qe.P) < min(fe.P)
        assert qe.settings["pte"] <= 1024
        assert qe.settings["max_steps"] <= 200_000
    for e in full.experiments:
        assert e.settings["pte"] == 32768
        for P in e.P:
            assert isinstance(e.group(P), Group)
    ids = [c.id for c in full.cells()]
    assert len(set(ids)) == len(ids)


def test_shipped_full_scale_matches_science_table():
    fc = load_sweep("fc_tsweep_mnist").experiments[0]
    assert fc.alpha == (2.0**15,)
    assert fc.T == tuple(2.0**k for k in range(-13, 3))
    assert fc.P == (1024, 2048, 4096, 8192, 16384)
    assert fc.seed == tuple(range(5))
    assert fc.settings["h"] == 128 and fc.settings["L"] == 5
    mnas = load_sweep("mnas_tsweep_cifar10").experiments[0]
    assert mnas.T == tuple(2.0**k for k in range(-20, 1)) and mnas.settings["h"] == 64
    phase = load_sweep("fc_phase_mnist").experiments[0]
    assert phase.settings["activation"] == "gelu" and phase.P == (1024,)
    assert phase.alpha == tuple(2.0**k for k in range(-14, 12))
    assert [phase.dt(T) for T in phase.T] == [2.0**k for k in range(-15, 16)]
    mp = load_sweep("mnas_phase_cifar10").experiments[0]
    assert (mp.settings["h"], mp.settings["B"], len(mp.seed)) == (32, 64, 4)
    assert [mp.dt(T) for T in mp.T] == [2.0**k for k in range(-13, 11)]
    perc = load_sweep("perceptron")
    assert {(e.settings["chi"], e.settings["d"]) for e in perc.experiments} == {
        (chi, d) for chi in (0.0, 1.0, 3.0) for d in (16, 32, 64, 128)
    }
    e = perc.experiment("perceptron_chi1_d64")
    assert [e.dt(T) for T in e.T] == [2.0**k for k in range(-15, 3)]
    assert e.T[0] == 2.0**-16 and e.settings["B"] == 2


def test_quick_fc_phase_as_briefed():
    e = load_sweep("quick_fc_phase_mnist").experiments[0]
    assert e.settings["activation"] == "gelu" and e.P == (256,) and len(e.seed) == 2
    assert min(e.alpha) == 2.0**-2 and max(e.alpha) == 2.0**12
    assert min(e.T) == 2.0**-12 and max(e.T) == 2.0**-5
    assert e.settings["max_steps"] == 20000


def test_load_by_name_path_and_suffix(tmp_path):
    a = load_sweep("quick_perceptron")
    assert load_sweep("quick_perceptron.toml") == a
    from importlib import resources

    text = resources.files("ensemble").joinpath("sweeps/quick_perceptron.toml").read_text()
    path = tmp_path / "mine.toml"
    path.write_text(text)
    assert load_sweep(path) == a
    assert load_sweep(str(path)) == a


def test_unknown_name_lists_shipped_with_hint():
    with pytest.raises(SpecError, match=r"did you mean 'quick_perceptron'.*shipped sweeps"):
        load_sweep("quick_perceptrom")


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ndescription = "d"\n[[experiment]]\nname = "e"\nalpah = [1]\n')
    with pytest.raises(SpecError, match=r"bad\.toml.*'alpah'.*did you mean 'alpha'"):
        load_sweep(bad)
    bad.write_text("name = [\n")
    with pytest.raises(SpecError, match=r"bad\.toml: not valid TOML"):
        load_sweep(bad)
    with pytest.raises(SpecError, match="does not exist"):
        load_sweep(tmp_path / "missing.toml")


# -- grammar -------------------------------------------------------------------------------


def test_pow2_exact_and_dt_to_T_exact():
    d = with_exp(alpha={"pow2": [-3, 3]}, T=DROP, dt={"pow2": [-15, 15, 5]}, P={"pow2": [4, 6]})
    e = Sweep.from_dict(d).experiments[0]
    assert e.alpha == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert e.P == (16, 32, 64) and all(type(P) is int for P in e.P)
    # h B = 32: T = dt / 32, exact for powers of two
    assert e.T == tuple(2.0 ** (k - 5) for k in range(-15, 16, 5))
    assert [e.dt(T) for T in e.T] == [2.0**k for k in range(-15, 16, 5)]


def test_seed_count_and_sorting():
    e = Sweep.from_dict(with_exp(seed=3, alpha=[4, 1.0, 2], T=[0.5, 0.25])).experiments[0]
    assert e.seed == (0, 1, 2)
    assert e.alpha == (1.0, 2.0, 4.0) and all(type(a) is float for a in e.alpha)
    assert e.T == (0.25, 0.5)


def test_perceptron_dt_uses_h_1():
    d = base()
    d["experiment"] = [
        {
            "name": "p",
            "dataset": "perceptron",
            "arch": "perceptron",
            "d": 8,
            "B": 2,
            "alpha": [1],
            "dt": [0.5, 3.0],
            "P": [8],
            "seed": [4],
        }
    ]
    e = Sweep.from_dict(d).experiments[0]
    assert e.T == (0.25, 1.5) and e.settings["h"] == 1


def test_matrix_expansion():
    d = base()
    d["experiment"] = [
        {
            "name": "p",
            "dataset": "perceptron",
            "arch": "perceptron",
            "B": 2,
            "matrix": {"chi": [0, 0.5, 3], "d": [16, 32]},
            "alpha": [1.0],
            "dt": [1.0],
            "P": [8, 16],
            "seed": 1,
        }
    ]
    s = Sweep.from_dict(d)
    names = [e.name for e in s.experiments]
    assert names == [
        "p_chi0_d16",
        "p_chi0_d32",
        "p_chi0p5_d16",
        "p_chi0p5_d32",
        "p_chi3_d16",
        "p_chi3_d32",
    ]
    e = s.experiment("p_chi0p5_d32")
    assert (e.settings["chi"], e.settings["d"]) == (0.5, 32)
    assert len(s.cells()) == 6 * 2
    assert {c.experiment for c in s.cells()} == set(names)


def test_settings_filled_with_group_defaults():
    e = Sweep.from_dict(base()).experiments[0]
    assert e.settings["dtype"] == "float32" and e.settings["tf32"] is False
    assert e.settings["activation"] == "relu" and e.settings["max_seconds"] is None
    assert e.group(16) == Group(P=16, **e.settings)


def test_cells_grid_order_and_ids():
    e = Sweep.from_dict(base()).experiments[0]
    cells = e.cells()
    assert len(cells) == 2 * 1 * 2 * 2
    assert cells == sorted(cells)
    assert cells[0].id == "fc/a=1.0/T=0.5/P=16/s=0"


def test_direct_construction_validates_and_normalises():
    e = Experiment(
        name="x",
        settings={"dataset": "mnist", "arch": "fc", "h": 4, "B": 2, "pte": 10},
        alpha=[2, 1],
        T=(1.0,),
        P=[8],
        seed=[1, 0],
    )
    assert e.alpha == (1.0, 2.0) and e.seed == (0, 1)
    with pytest.raises(SpecError, match=r"experiment 'x' \(P=1\): B must be <= P"):
        Experiment(name="x", settings=e.settings, alpha=(1.0,), T=(1.0,), P=(1,), seed=(0,))


# -- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fc_phase_mnist", "perceptron", "quick_mnas_phase_cifar10"])
def test_round_trip_through_json(name):
    s = load_sweep(name)
    d = s.to_dict()
    again = Sweep.from_dict(json.loads(json.dumps(d)))
    assert again == s
    assert again.to_dict() == d
    assert [c.id for c in again.cells()] == [c.id for c in s.cells()]


def test_round_trip_from_toml_text(tmp_path):
    d = base()
    d["expected_cost"] = "about 1 s"
    s = Sweep.from_dict(d)
    e = s.experiments[0].to_dict()
    lines = [f'name = "{s.name}"', f'description = "{s.description}"']
    lines += [f'expected_cost = "{s.expected_cost}"', "[[experiment]]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in e.items()]
    path = tmp_path / "rt.toml"
    path.write_text("\n".join(lines) + "\n")
    assert load_sweep(path) == s


# -- validation errors -----------------------------------------------------------------------

NAN = float("nan")

# (change to the experiment table, pattern the SpecError message must match)
INVALID = [
    ({"alpah": [1.0]}, r"experiment 'fc'.*unknown key 'alpah' \(did you mean 'alpha'\?\)"),
    ({"Seeds": 2}, r"unknown key 'Seeds' \(did you mean 'seed'\?\)"),
    ({"activaton": "relu"}, r"unknown key 'activaton' \(did you mean 'activation'\?\)"),
    ({"alpha": DROP}, r"experiment 'fc'.*missing required key 'alpha'"),
    ({"P": DROP}, r"missing required key 'P'"),
    ({"seed": DROP}, r"missing required key 'seed'"),
    ({"T": DROP}, r"exactly one of 'T' and 'dt'"),
    ({"dt": [1.0]}, r"exactly one of 'T' and 'dt'"),
    ({"B": DROP}, r"missing required setting 'B'"),
    ({"h": DROP}, r"missing required setting 'h'"),
    ({"dataset": DROP}, r"missing required setting 'dataset'"),
    ({"h": 8.0}, r"field 'h': expected int, got 8.0"),
    ({"h": "8"}, r"field 'h': expected int"),
    ({"B": True}, r"field 'B': expected int"),
    ({"tf32": 1}, r"field 'tf32': expected bool"),
    ({"dtype": 32}, r"field 'dtype': expected str"),
    ({"dtype": "float16"}, r"experiment 'fc' \(P=16\): dtype must be one of"),
    ({"activation": "tanh"}, r"experiment 'fc' \(P=16\): activation must be one of"),
    ({"arch": "cnn"}, r"experiment 'fc', field 'arch': must be one of"),
    ({"dataset": "svhn"}, r"experiment 'fc', field 'dataset': must be one of"),
    ({"dataset": "perceptron"}, r"field 'arch': arch 'perceptron' goes with dataset"),
    ({"alpha": [1.0, -1.0]}, r"field 'alpha': values must be finite numbers > 0, got -1.0"),
    ({"alpha": [NAN]}, r"field 'alpha': values must be finite numbers > 0, got nan"),
    ({"T": [0.0]}, r"field 'T': values must be finite numbers > 0, got 0.0"),
    ({"T": [math.inf]}, r"field 'T': values must be finite numbers > 0, got inf"),
    ({"T": DROP, "dt": [-1.0]}, r"field 'dt': values must be finite numbers > 0"),
    ({"alpha": ["big"]}, r"field 'alpha': values must be finite numbers > 0, got 'big'"),
    ({"alpha": []}, r"field 'alpha': the grid is empty"),
    ({"alpha": 1.0}, r"field 'alpha': expected a list"),
    ({"alpha": [1.0, 1]}, r"field 'alpha': duplicate values \[1.0\]"),
    ({"P": [16, 16]}, r"field 'P': duplicate values \[16\]"),
    ({"P": [16.0]}, r"field 'P': values must be integers from 1 to 2\*\*63 - 1.*got 16.0"),
    ({"P": [0]}, r"field 'P': values must be integers from 1 to 2\*\*63 - 1.*got 0"),
    ({"P": {"pow2": [-1, 3]}}, r"field 'P': pow2 exponents must be in \[0, 62\]"),
    ({"P": {"pow2": [0, 10**6]}}, r"field 'P': pow2 exponents must be in \[0, 62\]"),  # at once
    ({"seed": 10**12}, r"field 'seed': a seed count must be from 1 to 1e\+07, got 10+"),
    (
        {"seed": 10**6, "T": {"pow2": [-12, 0]}},
        r"52000000 cells .* 2 x 13 x 2 x 1000000\), at most",
    ),
    ({"seed": [-1]}, r"field 'seed': values must be integers from 0 to 2\*\*63 - 1.*got -1"),
    ({"seed": [2**63]}, r"field 'seed': values must be integers from 0 to 2\*\*63 - 1"),
    ({"seed": 0}, r"field 'seed': a seed count must be from 1 to"),
    ({"alpha": [1e-50]}, r"field 'alpha': alpha must be a normal float32 number.*1e-50"),
    ({"T": [1e39]}, r"field 'T': dt = T h B must be a normal float32 number"),
    ({"seed": {"pow2": [0, 2]}}, r"field 'seed': give a list of seeds or a count"),
    ({"alpha": {"pow2": [3, 1]}}, r"field 'alpha': pow2 = \[3, 1\] needs lo <= hi"),
    ({"alpha": {"pow2": [0, 5, 2]}}, r"field 'alpha': .*hi - lo a multiple of step"),
    ({"alpha": {"pow2": [0, 4, 0]}}, r"field 'alpha': .*step >= 1"),
    ({"alpha": {"pow2": [0.5, 4]}}, r"field 'alpha': pow2 must be \[lo, hi\]"),
    ({"alpha": {"pow": [0, 4]}}, r"field 'alpha'.*unknown key 'pow' \(did you mean 'pow2'\?\)"),
    ({"B": 32}, r"experiment 'fc' \(P=16\): B must be <= P.*B=32 > P=16"),
    ({"pte": 69_990}, r"experiment 'fc' \(P=16\): P \+ pte must be <= 70000"),
    ({"max_steps": 0}, r"\(P=16\): max_steps must be an integer >= 1"),
    ({"max_seconds": -1.0}, r"\(P=16\): max_seconds must be a finite number > 0"),
    ({"h": 0}, r"\(P=16\): h must be an integer >= 1"),
    ({"chi": 1.0}, r"field 'chi': chi = 1.0 is only used by arch perceptron, not 'fc'"),
    ({"d": 16}, r"field 'd': d = 16 is only used by arch perceptron"),
    ({"name": "a b"}, r"name must be a non-empty string of \[A-Za-z0-9_-\]"),
    ({"name": DROP}, r"missing required key 'name'"),
    ({"matrix": {"chi": []}}, r"field 'matrix': 'chi' must be a non-empty list"),
    ({"matrix": {"alpha": [1.0]}}, r"field 'matrix'.*unknown key 'alpha'"),
    ({"matrix": {"h": [8]}}, r"'h' is both a setting and a matrix key"),
    ({"matrix": {"h_": [8]}}, r"unknown key 'h_' \(did you mean 'h'\?\)"),
]


@pytest.mark.parametrize(("change", "pattern"), INVALID, ids=[p for _, p in INVALID])
def test_invalid_experiment_field(change, pattern):
    with pytest.raises(SpecError, match=pattern):
        Sweep.from_dict(with_exp(**change))


def test_perceptron_field_errors():
    d = base()
    d["experiment"] = [
        {
            "name": "p",
            "dataset": "perceptron",
            "arch": "perceptron",
            "B": 2,
            "alpha": [1.0],
            "T": [1.0],
            "P": [8],
            "seed": 1,
        }
    ]
    with pytest.raises(SpecError, match=r"missing required setting 'd'"):
        Sweep.from_dict(d)
    for change, pattern in [
        ({"d": 1}, r"experiment 'p' \(P=8\): d must be an integer >= 2"),
        ({"d": 4, "chi": -1.0}, r"chi must be a finite number >= 0"),
        ({"d": 4, "chi": math.inf}, r"chi must be a finite number >= 0, got inf"),
        ({"d": 4, "h": 2}, r"h must be 1 for the perceptron"),
        ({"d": 4, "L": 3}, r"field 'L': L = 3 is only used by arch fc"),
        ({"d": 4, "activation": "gelu"}, r"field 'activation'.*only used by arch fc / mnas"),
        ({"d": 4, "arch": "fc"}, r"field 'arch': arch 'perceptron' goes with dataset"),
    ]:
        dd = copy.deepcopy(d)
        dd["experiment"][0].update(change)
        with pytest.raises(SpecError, match=pattern):
            Sweep.from_dict(dd)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"nmae": "x"}, r"unknown key 'nmae' \(did you mean 'name'\?\)"),
        ({"experiments": []}, r"unknown key 'experiments' \(did you mean 'experiment'\?\)"),
        ({"description": 3}, r"field 'description': expected a string"),
        ({"expected_cost": 3}, r"field 'expected_cost': expected a string"),
        ({"experiment": []}, r"no experiments"),
        ({"experiment": {"name": "x"}}, r"'experiment' must be an array of tables"),
        ({"name": "bad name"}, r"name must be a non-empty string"),
    ],
)
def test_invalid_sweep_field(change, pattern):
    d = base()
    d.update(change)
    with pytest.raises(SpecError, match=pattern):
        Sweep.from_dict(d)


def test_missing_sweep_keys_and_duplicate_experiments():
    for key in ("name", "description", "experiment"):
        d = base()
        d.pop(key)
        with pytest.raises(SpecError, match=f"missing required key '{key}'"):
            Sweep.from_dict(d)
    d = base()
    d["experiment"].append(copy.deepcopy(d["experiment"][0]))
    with pytest.raises(SpecError, match=r"sweep 'tiny': duplicate experiment names \['fc'\]"):
        Sweep.from_dict(d)
    d = base()
    d["experiment"] = [
        {
            "name": "p",
            "dataset": "perceptron",
            "arch": "perceptron",
            "B": 2,
            "matrix": {"chi": [1, 1.0]},
            "d": 4,
            "alpha": [1.0],
            "T": [1.0],
            "P": [8],
            "seed": 1,
        }
    ]
    with pytest.raises(SpecError, match=r"duplicate experiment names \['p_chi1'\]"):
        Sweep.from_dict(d)


def test_expected_cost_defaults_to_not_measured():
    assert Sweep.from_dict(base()).expected_cost == "not yet measured"


def test_sweeps_listing_piped_into_a_reader_that_leaves_early_prints_no_traceback():
    """``python -m ensemble sweeps | head -0``: the listing stops quietly when its reader
    has closed the pipe (exit status 1, as Unix tools do), with no BrokenPipeError."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "ensemble", "sweeps"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader leaves before the listing (the child imports first)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
