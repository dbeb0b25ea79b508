"""Shift-tolerant LPIPS: weight loading and verification, metric properties, and parity
with a second, purely functional formulation of the stlpips-pytorch forward pass."""
from __future__ import annotations

import importlib.metadata
import math
import shutil

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from deeprecon.runtime.errors import DeepreconError, ExitCode, UnavailableError  # noqa: E402

try:
    importlib.metadata.distribution("stlpips-pytorch")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("stlpips-pytorch (the LPIPS weights) is not installed", allow_module_level=True)

from deeprecon.trainer import lpips as lp  # noqa: E402


@pytest.fixture(scope="module")
def weights_file():
    return lp.installed_weights_path()


@pytest.fixture(scope="module")
def state_dict(weights_file):
    return torch.load(weights_file, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def net():
    return lp.load_lpips()


def phantom(size: int = 128) -> torch.Tensor:
    """A blurred ellipse in a ring on a black background, [1, 1, size, size] in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = (xx / 0.6) ** 2 + (yy / 0.45) ** 2
    img = torch.full((size, size), -1.0)
    img = torch.where(r < 1.0, torch.tensor(0.2), img)
    img = torch.where(r < 0.4, torch.tensor(0.8), img)
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None, :]) / 256  # [5, 5] binomial blur
    img = F.conv2d(F.pad(img[None, None], (2, 2, 2, 2), mode="replicate"), k[None, None])
    return img  # [1, 1, size, size]


# ----------------------------------------------------------------------------- a second formulation


def reference_distance(sd: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """stlpips LPIPS(net='alex', variant='shift_tolerant', version='0.1') forward written
    with plain functional calls on the state dict (x, y [B, 3, H, W], H, W >= 64):
    features = [conv11 s1 p2, Downsample, ReLU | MaxPool3 s1, Downsample, conv5 p2,
    ReLU | MaxPool3 s1, Downsample, conv3 p1, ReLU | conv3 p1, ReLU | conv3 p1, ReLU],
    Downsample(pad_more=True) = ReflectionPad2d([2, 2, 2, 2]) + depthwise conv stride 2;
    utils.normalize_tensor with sqrt(sum(f**2)) + 1e-10; spatial_average of lin_k."""

    def down(h, key):
        return F.conv2d(F.pad(h, [2, 2, 2, 2], mode="reflect"), sd[key], stride=2, groups=h.shape[1])

    def trunk(h):
        h = (h - sd["scaling_layer.shift"]) / sd["scaling_layer.scale"]
        h = F.conv2d(h, sd["net.slice1.0.weight"], sd["net.slice1.0.bias"], stride=1, padding=2)
        r1 = F.relu(down(h, "net.slice1.1.filt"))
        h = down(F.max_pool2d(r1, 3, 1), "net.slice2.4.filt")
        r2 = F.relu(F.conv2d(h, sd["net.slice2.5.weight"], sd["net.slice2.5.bias"], padding=2))
        h = down(F.max_pool2d(r2, 3, 1), "net.slice3.8.filt")
        r3 = F.relu(F.conv2d(h, sd["net.slice3.9.weight"], sd["net.slice3.9.bias"], padding=1))
        r4 = F.relu(F.conv2d(r3, sd["net.slice4.11.weight"], sd["net.slice4.11.bias"], padding=1))
        r5 = F.relu(F.conv2d(r4, sd["net.slice5.13.weight"], sd["net.slice5.13.bias"], padding=1))
        return r1, r2, r3, r4, r5

    def normalize_tensor(f, eps=1e-10):
        return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)

    total = 0
    for k, (a, b) in enumerate(zip(trunk(x), trunk(y))):
        d = (normalize_tensor(a) - normalize_tensor(b)) ** 2
        total = total + F.conv2d(d, sd[f"lin{k}.model.1.weight"]).mean(dim=[2, 3], keepdim=True)
    return total.flatten()  # [B]


@pytest.mark.parametrize("dtype,atol,b,size", [(torch.float64, 1e-10, 2, 72),
                                               (torch.float32, 1e-5, 3, 96)])
def test_matches_functional_reference(state_dict, dtype, atol, b, size):
    g = torch.Generator().manual_seed(1)
    x = phantom(size).repeat(b, 3, 1, 1)  # [b, 3, size, size]
    x = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1).to(dtype)
    y = torch.roll(x, shifts=(2, -1), dims=(2, 3))
    y = (y + 0.05 * torch.randn(y.shape, generator=g, dtype=dtype)).clamp(-1, 1)
    model = lp.load_lpips().to(dtype)
    sd = {k: v.to(dtype) for k, v in state_dict.items()}
    with torch.no_grad():
        got = model(x, y)
        ref = reference_distance(sd, x, y)
    assert got.shape == (b,) and got.dtype == dtype
    assert (ref > 0.01).all()  # a meaningful, non-degenerate comparison
    err = (got - ref).abs()
    assert err.max().item() < atol, (got, ref)
    assert (err / ref).max().item() < atol * 10


# ----------------------------------------------------------------------------- loading


def test_strict_load_uses_every_key(state_dict, net):
    assert len(state_dict) == 20
    assert set(net.state_dict()) == set(state_dict)
    for k, v in net.state_dict().items():
        assert v.shape == state_dict[k].shape, k
        assert torch.equal(v, state_dict[k]), k
    # The blur filters and the scaling constants in the file are what the module builds
    # itself (binomial [1, 2, 1] / 4 outer product; LPIPS v0.1 scaling).
    fresh = lp.LPIPS().state_dict()
    for k in ("net.slice1.1.filt", "net.slice2.4.filt", "net.slice3.8.filt",
              "scaling_layer.shift", "scaling_layer.scale"):
        assert torch.allclose(fresh[k], state_dict[k]), k
    # LPIPS calibration weights are non-negative.
    for k in range(5):
        assert (state_dict[f"lin{k}.model.1.weight"] >= 0).all()


def test_frozen_eval_and_fresh_module_per_call(net):
    assert not any(p.requires_grad for p in net.parameters())
    assert not net.training
    net.train()
    assert not net.training and not any(m.training for m in net.modules())
    other = lp.load_lpips()
    assert other is not net
    p0, p1 = other.lin0.model[1].weight, net.lin0.model[1].weight
    assert p0.data_ptr() != p1.data_ptr() and torch.equal(p0, p1)


def test_weights_hash_is_the_wheel_record(weights_file):
    dist = importlib.metadata.distribution("stlpips-pytorch")
    entry = next(f for f in dist.files if f.as_posix() == lp.WEIGHTS_IN_WHEEL)
    assert entry.hash.mode == "sha256" and entry.hash.value == lp.WEIGHTS_SHA256
    assert lp._sha256_b64(weights_file) == lp.WEIGHTS_SHA256


def test_corrupted_copy_is_refused(weights_file, tmp_path):
    bad = tmp_path / "alex_shift_tolerant.pth"
    shutil.copyfile(weights_file, bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight byte
    bad.write_bytes(bytes(data))
    with pytest.raises(lp.LpipsWeightsError) as e:
        lp.load_lpips(weights_path=bad)
    assert str(bad) in str(e.value) and "sha256" in str(e.value)
    assert isinstance(e.value, DeepreconError) and e.value.exit_code == ExitCode.UNAVAILABLE
    # An intact copy given by path loads.
    good = tmp_path / "good.pth"
    shutil.copyfile(weights_file, good)
    assert isinstance(lp.load_lpips(weights_path=good), lp.LPIPS)


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(lp.LpipsWeightsError, match="does not exist") as e:
        lp.load_lpips(weights_path=missing)
    assert str(missing) in str(e.value)


def test_missing_distribution_is_unavailable(monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(UnavailableError, match="not installed") as e:
        lp.load_lpips()
    assert "pip install stlpips-pytorch==0.0.2" in str(e.value)
    assert e.value.exit_code == 69


# ----------------------------------------------------------------------------- the metric


def test_identity_is_exactly_zero(net):
    x = torch.cat([phantom(64), torch.rand(1, 1, 64, 64) * 2 - 1])
    d = net(x, x.clone())
    assert d.shape == (2,)
    assert torch.equal(d, torch.zeros(2))


def test_symmetric(net):
    g = torch.Generator().manual_seed(2)
    x = phantom(80).repeat(2, 1, 1, 1)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    a, b = net(x, y), net(y, x)
    assert (a > 0).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grows_with_noise(net):
    g = torch.Generator().manual_seed(3)
    x = phantom(96)
    n = torch.randn(x.shape, generator=g)
    d = [net(x, x + s * n).item() for s in (0.02, 0.08, 0.3)]
    assert 0 < d[0] < d[1] < d[2], d


def test_shift_tolerant(net):
    x = phantom(128)
    shifted = torch.roll(x, shifts=1, dims=3)  # background at the border: a pure translation
    mse = (shifted - x).square().mean()
    g = torch.Generator().manual_seed(4)
    noisy = x + torch.randn(x.shape, generator=g) * mse.sqrt()
    assert math.isclose((noisy - x).square().mean().item(), mse.item(), rel_tol=0.1)
    d_shift, d_noise = net(x, shifted).item(), net(x, noisy).item()
    assert 0 < d_shift < 0.2 * d_noise, (d_shift, d_noise)


def test_grey_is_rgb_repeated(net):
    """A grey input takes the folded first convolution (no RGB copy): the same distance
    as the grey image repeated to RGB, to rounding (exactly in float64)."""
    x = phantom(64)
    y = torch.roll(x, 3, dims=2)
    torch.testing.assert_close(net(x, y), net(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)),
                               rtol=1e-5, atol=1e-7)
    n64 = lp.load_lpips().double()
    x64, y64 = x.double(), y.double()
    torch.testing.assert_close(n64.features(x64)[0], n64.features(x64.repeat(1, 3, 1, 1))[0],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 3, 5])
def test_fewer_layers_sum_the_first_terms(state_dict, layers):
    """LPIPS(layers=k) is the sum of the first k per-layer terms of the functional
    reference (the per-layer terms are read off reference distances of nested cuts)."""
    g = torch.Generator().manual_seed(3)
    x = phantom(64).repeat(2, 1, 1, 1).double()
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    sd = {k: v.double() for k, v in state_dict.items()}
    full = reference_distance(sd, x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1))
    # the terms of layers > k, zeroed through their calibration weights
    cut = dict(sd)
    for k in range(layers, 5):
        cut[f"lin{k}.model.1.weight"] = torch.zeros_like(sd[f"lin{k}.model.1.weight"])
    want = reference_distance(cut, x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1))
    net_k = lp.load_lpips(layers=layers).double()
    with torch.no_grad():
        got = net_k(x, y)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert len(net_k.features(x)) == layers
    if layers < 5:
        assert (got < full).all()
    with pytest.raises(ValueError, match="layers"):
        lp.LPIPS(layers=6)


def test_cached_reference_features_give_the_same_distance_and_gradient(net):
    g = torch.Generator().manual_seed(4)
    x = phantom(64).repeat(3, 1, 1, 1)
    y0 = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    y1 = y0.clone().requires_grad_(True)
    y2 = y0.clone().requires_grad_(True)
    d1 = net(x, y1)
    d1.sum().backward()
    with torch.no_grad():
        fx = net.reference_features(x)
    d2 = net.distance_to(fx, y2)
    d2.sum().backward()
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)
    torch.testing.assert_close(y1.grad, y2.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reference feature maps"):
        net.distance_to(fx[:2], y0)


def test_gradient_wrt_input(net):
    g = torch.Generator().manual_seed(5)
    x = phantom(64).repeat(2, 1, 1, 1)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    net(x, y).sum().backward()
    assert y.grad is not None and y.grad.shape == y.shape
    assert torch.isfinite(y.grad).all()
    assert y.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_normalize_has_zero_gradient_at_zero_features():
    f = torch.zeros(1, 4, 2, 2)
    f[..., 0, 0] = torch.tensor([1.0, -2.0, 0.5, 3.0])  # one non-zero position
    f.requires_grad_(True)
    lp._normalize(f).square().sum().backward()
    assert torch.isfinite(f.grad).all()
    assert (f.grad[..., 1:, :] == 0).all()


def test_small_inputs_are_resized(net):
    g = torch.Generator().manual_seed(6)
    x = (torch.rand(2, 1, 32, 32, generator=g) * 2 - 1)
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    d = net(x, y)
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()
    up = dict(size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(d, net(F.interpolate(x, **up), F.interpolate(y, **up)))
    # Non-square: one factor for both sides (the shorter becomes 64 px).
    feats = net.features(torch.zeros(1, 1, 32, 48))
    assert [f.shape[1] for f in feats] == [64, 192, 384, 256, 256]
    assert feats[0].shape[-2:] == net.features(torch.zeros(1, 1, 64, 96))[0].shape[-2:]


def test_bad_shapes_are_refused(net):
    with pytest.raises(ValueError, match="differ in shape"):
        net(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 65))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        net(torch.zeros(1, 2, 64, 64), torch.zeros(1, 2, 64, 64))
