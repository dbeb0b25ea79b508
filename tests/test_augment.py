"""ADA: the augmentation pipeline (identity at p = 0, per-sample transforms, gradients,
RNG reproducibility, coordinate conventions) and the p controller."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from deeprecon.runtime.errors import UsageError  # noqa: E402
from deeprecon.trainer.augment import AdaController, AugmentPipe  # noqa: E402

GEOMETRIC = dict(brightness=0.0, contrast=0.0)
NONE = dict(xflip=0.0, rotate90=0.0, xint=0.0, scale=0.0, rotate=0.0, aniso=0.0, xfrac=0.0,
            brightness=0.0, contrast=0.0)


def only(**enabled) -> dict:
    return {**NONE, **enabled}


def images(b: int = 8, h: int = 32, w: int = 32, *, seed: int = 0) -> torch.Tensor:
    """Asymmetric smooth test images [b, 1, h, w] in [-1, 1] (an off-centre blob and a
    ramp, different per image, so that flips and rotations change them)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    c = torch.rand(b, 2, generator=g) * 0.8 - 0.4
    blob = torch.exp(-((xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None] + 0.2) ** 2) / 0.1)
    x = 1.6 * blob + 0.3 * xx + 0.2 * yy * xx - 0.7
    return x.clamp(-1, 1)[:, None]


# ----------------------------------------------------------------------------- pipeline


def test_p0_is_exact_identity_and_draws_nothing():
    pipe = AugmentPipe()
    assert float(pipe.p) == 0.0 and pipe.p.ndim == 0 and pipe.p.dtype == torch.float32
    x = images()
    state = torch.get_rng_state()
    y = pipe(x)
    assert y is x
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_p1_changes_almost_every_image(dtype):
    pipe = AugmentPipe(p=1.0)
    x = images(32).to(dtype)
    torch.manual_seed(0)
    y = pipe(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y.float()).all()
    changed = ((y.float() - x.float()).abs().amax(dim=(1, 2, 3)) > 1e-2).float().mean()
    assert changed >= 30 / 32


def test_non_square_keeps_shape():
    pipe = AugmentPipe(p=1.0)
    torch.manual_seed(1)
    y = pipe(images(4, 24, 40))
    assert y.shape == (4, 1, 24, 40)


def test_gradient_flows_to_input():
    pipe = AugmentPipe(p=1.0)
    x = images(4).requires_grad_(True)
    torch.manual_seed(2)
    w = torch.randn(4, 1, 32, 32)
    (pipe(x) * w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()


def test_gradcheck_and_double_backward():
    """Gradients are exact, and second-order ones (R1 through the pipe) work."""
    pipe = AugmentPipe(p=1.0)
    x = images(2, 6, 6).double().requires_grad_(True)

    def f(t):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            return pipe(t)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-6)
    # The R1 pattern: grad of a small conv "discriminator" through the pipe, with
    # create_graph, then backward into its weights.
    weight = torch.randn(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    logits = torch.nn.functional.conv2d(f(x), weight).square().sum()
    (gx,) = torch.autograd.grad(logits, x, create_graph=True)
    gx.square().sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    assert weight.grad.abs().sum() > 0


def test_reproducible_with_seed():
    pipe = AugmentPipe(p=0.7)
    x = images(16)
    torch.manual_seed(123)
    a = pipe(x)
    torch.manual_seed(123)
    b = pipe(x)
    torch.manual_seed(124)
    c = pipe(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rng_use_does_not_depend_on_data():
    """Same number of random draws whatever the images' values or p (> 0)."""
    pipe = AugmentPipe(p=0.3)
    torch.manual_seed(5)
    pipe(images(8))
    after_a = torch.rand(1)
    torch.manual_seed(5)
    pipe.p.fill_(0.9)
    pipe(torch.zeros(8, 1, 32, 32))
    after_b = torch.rand(1)
    assert torch.equal(after_a, after_b)


@pytest.mark.parametrize("h,w", [(32, 32), (24, 40)])
def test_constant_image_stays_constant_under_geometry(h, w):
    pipe = AugmentPipe(p=1.0, **GEOMETRIC)
    x = torch.full((16, 1, h, w), 0.7)
    torch.manual_seed(6)
    y = pipe(x)
    assert (y - 0.7).abs().max().item() < 1e-5  # reflection padding: no black borders


def test_xflip_only_gives_input_or_its_mirror():
    pipe = AugmentPipe(p=1.0, **only(xflip=1.0))
    x = images(32)
    torch.manual_seed(7)
    y = pipe(x)
    same = (y - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (y - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()


def test_rotate90_only_gives_the_four_rotations():
    pipe = AugmentPipe(p=1.0, **only(rotate90=1.0))
    x = images(32)
    torch.manual_seed(8)
    y = pipe(x)
    seen = set()
    for i in range(32):
        errs = [(y[i] - torch.rot90(x[i], k, dims=(1, 2))).abs().max().item() for k in range(4)]
        k = min(range(4), key=errs.__getitem__)
        assert errs[k] < 1e-5, errs
        seen.add(k)
    assert seen == {0, 1, 2, 3}


def test_xint_only_is_a_whole_pixel_shift():
    pipe = AugmentPipe(p=1.0, **only(xint=1.0))
    x = images(16)
    torch.manual_seed(9)
    y = pipe(x)
    m = 4  # 0.125 * 32: the largest shift; compare the interior only
    for i in range(16):
        errs = {(dy, dx): (y[i, :, m:-m, m:-m]
                           - torch.roll(x[i], (dy, dx), dims=(1, 2))[:, m:-m, m:-m]).abs().max().item()
                for dy in range(-m, m + 1) for dx in range(-m, m + 1)}
        best = min(errs, key=errs.get)
        assert errs[best] < 1e-5, (i, best, errs[best])


def test_probability_is_per_sample():
    pipe = AugmentPipe(p=0.5, **only(brightness=1.0))
    x = images(400)
    torch.manual_seed(10)
    y = pipe(x)
    changed = ((y - x).abs().amax(dim=(1, 2, 3)) > 0).float().mean().item()
    assert 0.4 < changed < 0.6


def test_brightness_adds_a_constant_and_contrast_keeps_the_mean():
    x = images(16)
    torch.manual_seed(11)
    y = AugmentPipe(p=1.0, **only(brightness=1.0))(x)
    d = (y - x).flatten(1)  # [B, H*W]
    assert (d.amax(1) - d.amin(1)).max().item() < 1e-6
    assert d[:, 0].std().item() > 0.05
    torch.manual_seed(12)
    z = AugmentPipe(p=1.0, **only(contrast=1.0))(x)
    torch.testing.assert_close(z.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    ratio = z.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert (ratio - 1).abs().max().item() > 0.1


def test_bad_arguments():
    with pytest.raises(UsageError):
        AugmentPipe(p=1.5)
    with pytest.raises(UsageError):
        AugmentPipe(scale_std=-1.0)
    with pytest.raises(ValueError):
        AugmentPipe(p=0.5)(torch.zeros(2, 3, 8, 8))


def test_p_is_in_the_state_dict():
    pipe = AugmentPipe(p=0.25)
    sd = pipe.state_dict()
    assert list(sd) == ["p"]
    other = AugmentPipe()
    other.load_state_dict(sd)
    assert float(other.p) == 0.25


# ----------------------------------------------------------------------------- controller


def test_controller_raises_p_when_d_overfits():
    pipe = AugmentPipe()
    ada = AdaController(target=0.6, interval=1, speed_kimg=1.0, batch_size=10)
    assert ada.adjust_per_update == pytest.approx(0.01)
    for k in range(1, 4):
        ada.accumulate(torch.full((10, 1), 3.0))
        assert ada.step(pipe)
        assert float(pipe.p) == pytest.approx(0.01 * k)
    assert ada.last_rt == 1.0


def test_controller_lowers_p_and_clamps():
    pipe = AugmentPipe(p=0.015)
    ada = AdaController(interval=1, speed_kimg=1.0, batch_size=10)
    ada.accumulate(-torch.ones(10))
    ada.step(pipe)
    assert float(pipe.p) == pytest.approx(0.005)
    ada.accumulate(-torch.ones(10))
    ada.step(pipe)
    assert float(pipe.p) == 0.0
    assert ada.last_rt == -1.0
    top = AugmentPipe(p=0.995)
    ada.accumulate(torch.ones(10))
    ada.step(top)
    assert float(top.p) == 1.0


def test_controller_updates_every_interval_on_the_interval_mean():
    pipe = AugmentPipe(p=0.5)
    ada = AdaController(target=0.6, interval=4, speed_kimg=1.0, batch_size=5)
    assert ada.last_rt is None
    # Three all-positive steps and one all-negative one: r_t = 0.5 < 0.6 -> p goes down,
    # although the last three single steps alone would have raised it.
    for k, v in enumerate([1.0, -1.0, 1.0, 1.0]):
        ada.accumulate(torch.full((5,), v))
        updated = ada.step(pipe)
        assert updated == (k == 3)
        if k < 3:
            assert float(pipe.p) == 0.5
    assert ada.last_rt == pytest.approx(0.5)
    assert float(pipe.p) == pytest.approx(0.5 - 5 * 4 / 1000)
    # The next interval starts from empty statistics.
    for _ in range(4):
        ada.accumulate(torch.ones(5))
        ada.step(pipe)
    assert ada.last_rt == 1.0


def test_controller_distributed_reduction_counts_each_logit_once():
    """Two emulated ranks reducing every step agree with one process seeing it all."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(8, 2, 6, generator=g) + 0.3  # [step, rank, per-rank batch]
    ranks = [AdaController(interval=4, speed_kimg=1.0, batch_size=12) for _ in range(2)]
    pipes = [AugmentPipe(p=0.2), AugmentPipe(p=0.2)]
    single, single_pipe = AdaController(interval=4, speed_kimg=1.0, batch_size=12), AugmentPipe(p=0.2)
    for s in range(8):
        for r in range(2):
            ranks[r].accumulate(logits[s, r])
        reduced = ranks[0].stats_tensor() + ranks[1].stats_tensor()  # all_reduce_sum
        for r in range(2):
            ranks[r].set_stats(reduced.clone())
            ranks[r].step(pipes[r])
        single.accumulate(logits[s].flatten())
        single.step(single_pipe)
    assert ranks[0].last_rt == ranks[1].last_rt == pytest.approx(single.last_rt)
    assert float(pipes[0].p) == float(pipes[1].p) == float(single_pipe.p)
    expect = torch.sign(logits[4:]).mean().item()
    assert single.last_rt == pytest.approx(expect)
    assert ranks[0].stats_tensor().dtype == torch.float64 and ranks[0].stats_tensor().shape == (2,)


def test_controller_state_round_trip():
    g = torch.Generator().manual_seed(14)
    seq = torch.randn(10, 4, generator=g)
    a, pa = AdaController(interval=3, speed_kimg=1.0, batch_size=4), AugmentPipe(p=0.3)
    for s in range(5):  # mid-interval
        a.accumulate(seq[s])
        a.step(pa)
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    assert state["stats"].dtype == torch.float64 and int(state["calls"]) == 2
    b, pb = AdaController(interval=3, speed_kimg=1.0, batch_size=4), AugmentPipe()
    b.load_state_dict(state)
    pb.load_state_dict(pa.state_dict())
    assert b.last_rt == a.last_rt
    for s in range(5, 10):
        for ctrl, pipe in ((a, pa), (b, pb)):
            ctrl.accumulate(seq[s])
            ctrl.step(pipe)
    assert b.last_rt == a.last_rt and float(pb.p) == float(pa.p)
    fresh = AdaController(interval=3, batch_size=4).state_dict()
    assert math.isnan(float(fresh["last_rt"]))
    c = AdaController(interval=3, batch_size=4)
    c.load_state_dict(fresh)
    assert c.last_rt is None
    with pytest.raises(UsageError):
        c.load_state_dict({})


def test_controller_bad_arguments():
    with pytest.raises(UsageError):
        AdaController(interval=0, batch_size=4)
    with pytest.raises(UsageError):
        AdaController(target=0.0, batch_size=4)
    with pytest.raises(UsageError):
        AdaController(batch_size=0)
