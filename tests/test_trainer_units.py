"""The trainer's small parts: losses and quality figures, checkpoint files, configs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deeprecon.runtime.errors import UsageError
from deeprecon.trainer import losses
from deeprecon.trainer.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                                          load_model, read_state, save_checkpoint, save_model)
from deeprecon.trainer.config import PRESETS, ModelConfig, get_preset
from deeprecon.trainer.run import config_with_overrides


def test_psnr_and_ssim_known_values():
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.allclose(losses.ssim(x, x), torch.ones(3), atol=1e-6)
    y = x + 0.1  # MSE 0.01 over range 2: PSNR = 10 log10(4 / 0.01) = 26.02 dB
    assert torch.allclose(losses.psnr(x, y), torch.full((3,), 10 * np.log10(400.0)), atol=1e-3)
    noisy = x + 0.5 * torch.randn_like(x)
    s = losses.ssim(x, noisy)
    assert (s < 0.9).all() and (s > -1).all()
    # an 11 x 11 image has one window: SSIM from Gaussian-weighted statistics by hand
    a, b = (torch.rand(2, 1, 1, 11, 11, dtype=torch.float64) * 2 - 1)
    g = np.exp(-(np.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    A, B = a[0, 0].numpy(), b[0, 0].numpy()
    ma, mb = (w * A).sum(), (w * B).sum()
    va, vb = (w * A * A).sum() - ma ** 2, (w * B * B).sum() - mb ** 2
    cov = (w * A * B).sum() - ma * mb
    c1, c2 = 0.02 ** 2, 0.06 ** 2
    ref = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    assert losses.ssim(a, b).item() == pytest.approx(ref, abs=1e-12)


def test_dice_loss_and_seg_loss():
    labels = torch.randint(0, 4, (2, 16, 16))
    perfect = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 50
    assert losses.dice_loss(perfect, labels) < 1e-4
    wrong = torch.nn.functional.one_hot((labels + 1) % 4, 4).permute(0, 3, 1, 2).float() * 50
    assert losses.dice_loss(wrong, labels) > 0.95
    assert losses.seg_loss(perfect, labels) < losses.seg_loss(wrong, labels)
    d = losses.dice_per_class(labels, labels, 4)
    assert torch.equal(d, torch.ones(3, dtype=torch.float64))
    d = losses.dice_per_class(torch.zeros_like(labels), torch.zeros_like(labels), 4)
    assert torch.isnan(d).all()


def test_seg_loss_class_weights_weigh_the_cross_entropy():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 16, 16))
    logits = torch.randn(2, 4, 16, 16)
    ce = torch.nn.functional.cross_entropy
    w = torch.tensor([1.0, 1.0, 1.0, 3.0])
    dice = losses.dice_loss(logits, labels)
    assert losses.seg_loss(logits, labels, torch.ones(4)).item() == pytest.approx(
        losses.seg_loss(logits, labels).item(), rel=1e-6)
    assert losses.seg_loss(logits, labels, w).item() == pytest.approx(
        (ce(logits, labels, weight=w) + dice).item(), rel=1e-6)
    # wrong only on RVC pixels: weighting RVC up raises the loss
    good = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 5
    bad_rv = good.clone()
    rv = labels == 3
    bad_rv[:, 3][rv], bad_rv[:, 0][rv] = 0.0, 5.0
    assert losses.seg_loss(bad_rv, labels, w) > losses.seg_loss(bad_rv, labels)


def test_seg_class_weights_setting_is_parsed():
    from deeprecon.trainer.stages.seg import Config

    assert config_with_overrides(Config, "cpu64", {}).class_weights == ()
    cfg = config_with_overrides(Config, "cpu64", {"class_weights": "1,1,1,2"})
    assert cfg.class_weights == (1.0, 1.0, 1.0, 2.0)
    from deeprecon.trainer.stages.wseg import Config as WSegConfig
    for cls in (Config, WSegConfig):  # refused when the config is made, before any data
        with pytest.raises(UsageError, match="class_weights must be 4 positive"):
            config_with_overrides(cls, "tiny", {"class_weights": "1,1,-1,2"})


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(0, 2, (20000, 3)) + np.array([1.0, 0.0, -1.0])
    # diagonal Gaussians: |mu_a - mu_b|^2 + sum (s_a - s_b)^2 = 2 + 3 * 1
    assert losses.frechet_distance(a, b) == pytest.approx(5.0, rel=0.03)
    assert losses.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_r1_penalty_is_the_squared_gradient_norm():
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    w = torch.randn(1, 1, 8, 8)
    logits = (x * w).sum(dim=(1, 2, 3))[:, None]  # dD/dx = w for every image
    assert losses.r1_penalty(x, logits).item() == pytest.approx(float(w.square().sum()), rel=1e-5)


def test_presets_round_trip_and_shapes():
    for name, preset in PRESETS.items():
        assert ModelConfig.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
        assert preset.generator.num_ws == preset.encoder.num_ws == preset.wseg.num_ws
    assert get_preset("tiny").resolution == 32
    assert get_preset("base128").generator.num_ws == 12
    with pytest.raises(UsageError, match="small128"):
        get_preset("huge")


def test_stage_config_overrides_are_typed():
    from deeprecon.trainer.stages.gan import Config

    cfg = config_with_overrides(Config, "tiny", {"lr_g": "0.01", "augment": "false",
                                                 "betas": "0.1,0.9", "steps": "7"})
    assert cfg.lr_g == 0.01 and cfg.augment is False and cfg.betas == (0.1, 0.9) and cfg.steps == 7
    with pytest.raises(UsageError, match="expected a int"):
        config_with_overrides(Config, "tiny", {"steps": "many"})
    with pytest.raises(UsageError, match="unknown setting"):
        config_with_overrides(Config, "tiny", {"nope": "1"})


def _net_and_opt():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).square().mean().backward()
        opt.step()
    return net, opt


def test_checkpoint_round_trip_is_bit_exact_and_restores_rng(tmp_path):
    net, opt = _net_and_opt()
    torch.manual_seed(123)
    save_checkpoint(tmp_path, 3, modules={"net": net}, optimizers={"net": opt},
                    extra_tensors={"p": torch.tensor(0.25)}, extra={"epoch": 2})
    expected_next = torch.rand(4)
    net2, opt2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                     torch.nn.Linear(8, 2)), None
    opt2 = torch.optim.Adam(net2.parameters(), lr=5.0)
    torch.manual_seed(999)
    step, t, extra = load_checkpoint(latest_checkpoint(tmp_path), modules={"net": net2},
                                     optimizers={"net": opt2})
    assert step == 3 and extra == {"epoch": 2} and float(t["p"]) == 0.25
    assert torch.equal(torch.rand(4), expected_next)  # the RNG continues where it was saved
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == 1e-3
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in s1:
        for k in s1[i]:
            assert torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k]))


def test_checkpoint_keeps_the_last_two_and_refuses_damage(tmp_path):
    net, opt = _net_and_opt()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, modules={"net": net}, optimizers={"net": opt})
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*"))
    assert names == ["ckpt-00000002", "ckpt-00000003"]
    assert read_state(latest_checkpoint(tmp_path))[1]["step"] == 3
    # a module that does not fit
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(latest_checkpoint(tmp_path), modules={"net": torch.nn.Linear(4, 2)})
    with pytest.raises(CheckpointError, match="no module"):
        load_checkpoint(latest_checkpoint(tmp_path), modules={"other": net})
    # one byte changed in the tensor file
    f = latest_checkpoint(tmp_path) / "state.safetensors"
    data = bytearray(f.read_bytes())
    data[4] ^= 0xFF  # the header length
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unreadable"):
        read_state(latest_checkpoint(tmp_path))


def test_model_file_is_float16_except_exact_buffers(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.register_buffer("w_avg", torch.randn(3))

    net = Net()
    path = save_model(tmp_path / "model.safetensors", {"G": net}, config={"name": "x"})
    from safetensors.torch import load_file

    t = load_file(str(path))
    assert t["G.lin.weight"].dtype == torch.float16 and t["G.w_avg"].dtype == torch.float32
    other = Net()
    assert load_model(path, {"G": other}) == {"name": "x"}
    assert torch.equal(other.w_avg, net.w_avg)
    assert torch.allclose(other.lin.weight, net.lin.weight, atol=1e-3)
    with pytest.raises(CheckpointError, match="another shape"):
        load_model(path, {"G": torch.nn.Linear(3, 4)})
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(tmp_path / "junk.safetensors", {"G": net})


def test_weight_files_are_the_same_bytes_when_written_again(tmp_path):
    """safetensors writes its metadata map in hash order, which changes between saves;
    the project's files sort it, so the same weights give the same SHA-256 (a committed
    compact state or a bundle changes only where the weights did)."""
    import struct

    from safetensors.torch import load_file, save

    from deeprecon.runtime.publish import canonical_safetensors

    net = torch.nn.Linear(4, 4)
    meta = {f"k{i}": str(i) for i in range(8)}  # eight keys: one order in 40,320
    raw = [save_model(tmp_path / f"m{i}.safetensors", {"G": net}, config=meta).read_bytes()
           for i in range(3)]
    assert raw[0] == raw[1] == raw[2]
    (n,) = struct.unpack("<Q", raw[0][:8])
    header = json.loads(raw[0][8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    # the library's own output, in whatever order, canonicalises to one file that loads
    plain = save({"a": torch.arange(5.0)}, metadata=meta)
    (m,) = struct.unpack("<Q", plain[:8])
    shuffled = dict(reversed(list(json.loads(plain[8:8 + m])["__metadata__"].items())))
    head = json.loads(plain[8:8 + m])
    head["__metadata__"] = shuffled
    text = json.dumps(head, separators=(",", ":")).encode().ljust(m, b" ")
    reordered = plain[:8] + text + plain[8 + m:]
    assert canonical_safetensors(reordered) == canonical_safetensors(plain)
    (tmp_path / "c.safetensors").write_bytes(canonical_safetensors(reordered))
    assert torch.equal(load_file(str(tmp_path / "c.safetensors"))["a"], torch.arange(5.0))
    for junk in (b"", b"\xff" * 8 + b"{}"):
        with pytest.raises(ValueError, match="not a safetensors file"):
            canonical_safetensors(junk)


def test_compact_state_round_trip_and_refusals(tmp_path):
    from deeprecon.trainer.checkpoint import load_compact, model_modules, save_compact

    torch.manual_seed(0)
    g = torch.nn.Linear(4, 4)
    g.register_buffer("w_avg", torch.randn(4))
    path = save_compact(tmp_path / "compact.safetensors", 123, stage="gan", modules={"G": g},
                        extra_tensors={"ada.p": torch.tensor(0.25)},
                        extra={"nimg": 3936, "sampler": {"epoch": 2, "pos": 5}})
    other = torch.nn.Linear(4, 4)
    other.register_buffer("w_avg", torch.zeros(4))
    step, t, extra = load_compact(path, stage="gan", modules={"G": other})
    assert step == 123 and extra == {"nimg": 3936, "sampler": {"epoch": 2, "pos": 5}}
    assert float(t["ada.p"]) == 0.25
    assert torch.equal(other.w_avg, g.w_avg)  # exact
    assert torch.equal(other.weight, g.weight.half().float())  # float16
    with pytest.raises(CheckpointError, match="not a compact seg state"):
        load_compact(path, stage="seg", modules={"G": other})
    with pytest.raises(CheckpointError, match="another shape"):
        load_compact(path, stage="gan", modules={"G": torch.nn.Linear(4, 5)})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_compact(tmp_path / "none.safetensors", stage="gan", modules={})
    save_model(tmp_path / "m.safetensors", {"G": g, "E": other}, config={})
    assert model_modules(tmp_path / "m.safetensors") == {"G", "E"}


@pytest.mark.parametrize("preset,lpips_layers", [("cpu64", 3), ("cpu64w", 2)])
def test_cpu_preset_inversion_step_fits_the_cpu_budget(preset, lpips_layers):
    """A CPU preset's inversion step for 20 images (G forward + backward to w,
    E forward + backward, LPIPS of y against cached features of x) costs <= 30 GFLOP,
    the budget that makes K = 20 a few seconds on 2 cores (FLOPs, not time: a count
    does not depend on the machine)."""
    pytest.importorskip("stlpips_pytorch")
    from torch.utils.flop_counter import FlopCounterMode

    from deeprecon.trainer.lpips import load_lpips
    from deeprecon.trainer.networks import Encoder, Generator

    m = get_preset(preset)
    assert (m.resolution, m.preprocess.spacing_mm, m.lpips_layers) == (64, 2.5, lpips_layers)
    G = Generator(m.generator).requires_grad_(False)
    E = Encoder(m.encoder).requires_grad_(False)
    lp = load_lpips(layers=m.lpips_layers)
    x = torch.rand(20, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        fx = lp.reference_features(x)
    w = torch.randn(20, m.generator.num_ws, m.generator.w_dim, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        y = G(w)
        loss = lp.distance_to(fx, y) + (w - E(y)).square().mean(dim=(1, 2))
        loss.sum().backward()
    gflop = fc.get_total_flops() / 1e9
    assert 10 < gflop <= 30, gflop
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_cpu64w_widens_only_the_generator_and_shares_the_cpu_schedules():
    """cpu64w is cpu64 with a wider G paid for by a shallower LPIPS: every other network
    and the model grid are the same, and every stage gives it cpu64's schedule."""
    import dataclasses

    from deeprecon.trainer.config import CPU_PRESETS, channels_at
    from deeprecon.trainer.stages import encoder, gan, latents, seg, wseg

    a, b = get_preset("cpu64"), get_preset("cpu64w")
    assert [channels_at(r, b.generator.channel_base, b.generator.channel_max)
            for r in (64, 32, 16)] == [24, 48, 96]
    assert (a.lpips_layers, b.lpips_layers) == (3, 2)
    same = {f.name for f in dataclasses.fields(a)} - {"name", "generator", "lpips_layers"}
    assert all(getattr(a, f) == getattr(b, f) for f in same)
    assert dataclasses.replace(b.generator, channel_base=1024) == a.generator
    assert set(CPU_PRESETS) == {"cpu64", "cpu64w"}
    for stage in (encoder, gan, latents, seg, wseg):
        assert stage.Config.for_preset("cpu64w") == stage.Config.for_preset("cpu64")
        assert stage.Config.for_preset("cpu64w") != stage.Config.for_preset("small128")


def test_cosine_lr_schedule():
    from deeprecon.trainer.stages.common import cosine_lr

    assert cosine_lr(0, 100, 1e-3, 1e-5) == pytest.approx(1e-3)
    assert cosine_lr(50, 100, 1e-3, 1e-5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine_lr(100, 100, 1e-3, 1e-5) == pytest.approx(1e-5)
    assert cosine_lr(500, 100, 1e-3, 1e-5) == pytest.approx(1e-5)
    assert cosine_lr(7, 100, 2e-3, 2e-3) == 2e-3
    lrs = [cosine_lr(s, 100, 1e-3, 0.0) for s in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_affine_intensity_moves_image_and_labels_together():
    from deeprecon.trainer.stages.common import affine_intensity

    torch.manual_seed(0)
    labels = torch.zeros(16, 64, 64, dtype=torch.uint8)
    labels[:, 20:40, 24:44] = 1
    labels[:, 28:34, 30:36] = 3
    images = torch.where(labels > 0, 0.8, -1.0)[:, None].float()  # [16, 1, 64, 64]
    out, lab = affine_intensity(images, labels)
    assert out.shape == images.shape and lab.shape == labels.shape and lab.dtype == torch.uint8
    assert set(lab.unique().tolist()) <= {0, 1, 3}
    assert out.min() >= -1 and out.max() <= 1
    moved = (lab != labels).flatten(1).any(1)
    assert moved.float().mean() > 0.9  # nearly every image was transformed
    # where the image is bright the label is foreground, and vice versa (edges aside)
    bright = out[:, 0] > out.flatten(1).median(1).values[:, None, None] + 0.2
    agree = (bright == (lab > 0)).float().mean()
    assert agree > 0.97, agree
    # the same RNG state gives the same transform (exact resume)
    torch.manual_seed(0)
    out2, lab2 = affine_intensity(images, labels)
    assert torch.equal(out, out2) and torch.equal(lab, lab2)
    # without labels (the encoder stage): the same images from the same RNG state
    torch.manual_seed(0)
    out3, none = affine_intensity(images, None)
    assert none is None and torch.equal(out, out3)


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_a_cpu_without_it_warns_once_at_the_start(monkeypatch, caplog, native):
    import types

    from deeprecon.trainer.stages import gan

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    ctx = types.SimpleNamespace(device=torch.device("cpu"))
    with caplog.at_level("WARNING", logger="deeprecon.trainer.gan"):
        gan._warn_slow_bfloat16(ctx, gan.Config(mixed_precision_cpu=True))
        gan._warn_slow_bfloat16(ctx, gan.Config(mixed_precision_cpu=False))
    warned = [r for r in caplog.records if "without native bfloat16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
