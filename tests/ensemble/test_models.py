"""Models: parameter counts of science.md and normalised activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode

from ensemble.cells import Group
from ensemble.models import (
    _conv,
    _same_pad,
    activation_scale,
    build_model,
    init_params,
    normalised_activation,
)


@pytest.mark.parametrize(
    ("dataset", "arch", "h", "expected"),
    [("mnist", "fc", 128, 166_016), ("cifar10", "fc", 128, 458_880), ("cifar10", "mnas", 64, None)],
)
def test_parameter_counts(dataset, arch, h, expected):
    model = build_model(Group(dataset=dataset, arch=arch, P=1024, B=16, h=h, L=5))
    if expected is None:  # "about 0.71M" in science.md
        assert model.n_params == pytest.approx(0.71e6, rel=0.01)
    else:
        assert model.n_params == expected


def test_perceptron_has_d_parameters():
    g = Group(dataset="perceptron", arch="perceptron", P=16, B=2, d=32)
    assert build_model(g).n_params == 32


@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_normalised_activation_has_unit_second_moment(name):
    g = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m2 = normalised_activation(name)(g).pow(2).mean().item()
    assert m2 == pytest.approx(1.0, abs=3e-3)


def test_relu_scale_is_sqrt2():
    assert activation_scale("relu") == pytest.approx(2**0.5, rel=1e-15)


@pytest.mark.parametrize(
    ("dataset", "arch", "shape"),
    [("mnist", "fc", (1, 28, 28)), ("cifar10", "mnas", (3, 32, 32))],
)
def test_forward_is_vmappable_and_matches_loop(dataset, arch, shape):
    g = Group(dataset=dataset, arch=arch, P=64, B=8, h=4, L=3)
    model = build_model(g)
    ps = [init_params(model, s, torch.float64, torch.device("cpu")) for s in range(3)]
    stacked = {n: torch.stack([p[n] for p in ps]) for n in model.shapes}
    x = torch.randn(5, *shape, dtype=torch.float64)
    out = vmap(model.forward, in_dims=(0, None))(stacked, x)
    assert out.shape == (3, 5)
    for i, p in enumerate(ps):
        torch.testing.assert_close(out[i], model.forward(p, x))


def test_mean_field_output_variance_at_init():
    """With the 1/sqrt(fan_in) scaling and unit-second-moment phi, hidden units keep unit
    second moment through depth, so over initialisations E[F^2] = E[|z_L|^2] / h^2 = 1/h."""
    g = Group(dataset="mnist", arch="fc", P=64, B=8, h=64, L=5)
    model = build_model(g)
    ps = [init_params(model, s, torch.float64, torch.device("cpu")) for s in range(400)]
    stacked = {n: torch.stack([p[n] for p in ps]) for n in model.shapes}
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = vmap(model.forward, in_dims=(0, None))(stacked, x)  # (400, 8)
    assert (out**2).mean().item() * g.h == pytest.approx(1.0, rel=0.15)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(4, 20),
    stride=st.integers(1, 3),
    k=st.sampled_from([1, 3, 5]),
    groups=st.sampled_from([1, 2]),
)
def test_same_conv_equals_padding_then_convolving(size, stride, k, groups):
    """models._conv (symmetric padding by the larger side, a kernel with leading zeros
    where 'SAME' pads less in front) computes the JAX/TF 'SAME' convolution."""
    gen = torch.Generator().manual_seed(size * 100 + stride * 10 + k)
    x = torch.randn(2, 4, size, size + 1, dtype=torch.float64, generator=gen)
    W = torch.randn(6, 4 // groups, k, k, dtype=torch.float64, generator=gen)
    top, bottom = _same_pad(x.shape[-2], k, stride)
    left, right = _same_pad(x.shape[-1], k, stride)
    expected = F.conv2d(F.pad(x, (left, right, top, bottom)), W, stride=stride, groups=groups)
    out = _conv(x, W, stride, groups)
    assert out.shape[-2:] == (-(-size // stride), -(-(size + 1) // stride))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_mnas_channels_last_is_the_same_function():
    """The channels-last MNAS (the CPU's member-by-member path) has the plain one's
    outputs and gradients, and its activations really are channels-last in memory."""
    g = Group(dataset="cifar10", arch="mnas", P=64, B=8, h=4)
    plain, last = build_model(g), build_model(g, channels_last=True)
    ps = [init_params(plain, s, torch.float64, torch.device("cpu")) for s in range(2)]
    stacked = {n: torch.stack([p[n] for p in ps]) for n in plain.shapes}
    x = torch.randn(2, 5, 3, 32, 32, dtype=torch.float64)

    def loss(model):
        return lambda p, x: model.forward(p, x).square().sum()

    expected = vmap(grad(loss(plain)))(stacked, x)
    with _ConvLayouts() as layouts:
        got = vmap(grad(loss(last)), chunk_size=1)(stacked, x)
    for n in plain.shapes:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-12)
    assert len(layouts.channel_strides) == 16 * 2 and set(layouts.channel_strides) == {1}


class _ConvLayouts(TorchFunctionMode):
    """Records the channel stride of every conv2d output, in memory (under vmap too)."""

    def __init__(self):
        super().__init__()
        self.channel_strides: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.conv2d:
            mem = out
            while torch._C._functorch.is_batchedtensor(mem):
                mem = torch._C._functorch.get_unwrapped(mem)
            self.channel_strides.append(mem.stride()[-3])
        return out
