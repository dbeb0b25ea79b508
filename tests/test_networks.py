"""The networks (trainer/networks) and their export (export/onnx.py).

Shapes, the w+ bookkeeping, the modulated convolution against StyleGAN2's fused
per-sample-weight form, the discriminator at awkward batch sizes, the encoder at init,
determinism, and torch.export / ONNX export of every exported network of every preset
(the 128 px presets are marked slow: they export networks of up to 124 M parameters).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from deeprecon.export.onnx import ExportVerificationError, export_onnx, export_program, verify_onnx
from deeprecon.trainer.config import PRESETS, GeneratorConfig, get_preset, replace
from deeprecon.trainer.networks import (Discriminator, Encoder, Generator, UNet, WSegNet,
                                        build_networks, count_parameters)
from deeprecon.trainer.networks.encoder import pyramid_sizes, style_groups
from deeprecon.trainer.networks.layers import (ModulatedConv2d, mbstd_group_size,
                                               minibatch_std, modulated_conv2d, upsample2x)

TINY = get_preset("tiny")
B = 2

# torch.export's own deprecation inside torch (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\):FutureWarning")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rand(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- shapes

def test_shapes_tiny():
    cfg = TINY
    R, L, C = cfg.resolution, cfg.generator.num_ws, cfg.generator.w_dim
    nets = build_networks(cfg)
    assert set(nets) == {"G", "D", "E", "Seg", "WSeg"}
    G, D, E, Seg, WSeg = (nets[k] for k in ("G", "D", "E", "Seg", "WSeg"))
    assert (G.num_ws, G.w_dim, G.z_dim, G.resolution) == (L, C, cfg.generator.z_dim, R)
    assert G.cfg is cfg.generator
    z = _rand(B, G.z_dim)
    ws = G.mapping(z)
    assert ws.shape == (B, L, C) and ws.dtype == torch.float32
    assert torch.equal(ws[:, 0], ws[:, -1])  # one w broadcast to all L
    img = G(ws)
    assert img.shape == (B, 1, R, R) and img.dtype == torch.float32
    assert torch.isfinite(img).all() and 0.1 < img.std() < 10
    assert torch.equal(G.sample(z), img)
    assert D(img).shape == (B, 1)
    assert E(img).shape == (B, L, C)
    assert Seg(img).shape == (B, cfg.unet.n_classes, R, R)
    assert Seg.features(img).shape == (B, Seg.feature_dim)
    assert WSeg(ws).shape == (B, cfg.wseg.n_classes, R, R)
    for k, net in nets.items():
        assert count_parameters(net) == sum(p.numel() for p in net.parameters()) > 1000, k


def test_resnet_generator_and_num_ws_for_every_resolution():
    for res in (8, 16, 32, 64):
        for arch in ("skip", "resnet"):
            cfg = GeneratorConfig(resolution=res, z_dim=8, w_dim=8, mapping_layers=1,
                                  channel_base=64, channel_max=8, architecture=arch)
            G = Generator(cfg)
            assert G.synthesis.num_ws == cfg.num_ws == 2 * int(math.log2(res)) - 2
            ws = _rand(1, cfg.num_ws, cfg.w_dim).requires_grad_(True)
            img = G(ws)
            assert img.shape == (1, 1, res, res)
            (grad,) = torch.autograd.grad(img.square().sum(), ws)
            # every style vector is consumed: each one moves the image
            assert (grad.abs().sum(dim=2) > 0).all(), (res, arch)


def test_synthesis_rejects_wrong_ws_shape():
    G = Generator(TINY.generator)
    with pytest.raises(ValueError, match="ws must be"):
        G(_rand(B, G.num_ws - 1, G.w_dim))


# ----------------------------------------------------------------------------- mapping

def test_truncation_psi_zero_gives_w_avg_exactly():
    G = Generator(TINY.generator)
    G.mapping.w_avg.copy_(_rand(G.w_dim, seed=5))
    ws = G.mapping(_rand(3, G.z_dim), truncation_psi=0.0)
    assert torch.equal(ws, G.w_avg.expand(3, G.num_ws, -1))
    half = G.mapping(_rand(3, G.z_dim), truncation_psi=0.5)
    full = G.mapping(_rand(3, G.z_dim))
    torch.testing.assert_close(half, G.w_avg + 0.5 * (full - G.w_avg))


def test_update_w_avg_is_an_ema_of_the_batch_mean():
    G = Generator(TINY.generator)
    assert G.w_avg.dtype == torch.float32 and torch.equal(G.w_avg, torch.zeros(G.w_dim))
    z = _rand(8, G.z_dim)
    w = G.mapping(z)[:, 0]
    assert torch.equal(G.w_avg, torch.zeros(G.w_dim))  # not updated by default
    G.mapping(z, update_w_avg=True, w_avg_beta=0.9)
    assert not torch.equal(G.w_avg, torch.zeros(G.w_dim))
    torch.testing.assert_close(G.w_avg, 0.1 * w.mean(0).detach())
    assert not G.w_avg.requires_grad


# ----------------------------------------------------------------------------- modulated conv

def _fused_modconv_reference(x, weight, styles, *, demodulate, eps=1e-8):
    """StyleGAN2's fused form: a per-sample weight, demodulated, applied as one grouped
    convolution over the batch."""
    b, i, h, w = x.shape
    o, _, k, _ = weight.shape
    wb = weight[None] * styles[:, None, :, None, None]  # [B, O, I, k, k]
    if demodulate:
        wb = wb * (wb.square().sum(dim=[2, 3, 4]) + eps).rsqrt()[:, :, None, None, None]
    y = F.conv2d(x.reshape(1, b * i, h, w), wb.reshape(b * o, i, k, k), padding=k // 2, groups=b)
    return y.reshape(b, o, h, w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,demodulate", [(3, True), (1, False), (3, False), (1, True)])
def test_modulated_conv_equals_fused_grouped_form(dtype, k, demodulate):
    x = _rand(3, 6, 9, 9, seed=1, dtype=dtype)
    weight = _rand(5, 6, k, k, seed=2, dtype=dtype) / math.sqrt(6 * k * k)
    styles = _rand(3, 6, seed=3, dtype=dtype) + 1.0
    got = modulated_conv2d(x, weight, styles, demodulate=demodulate)
    ref = _fused_modconv_reference(x, weight, styles, demodulate=demodulate)
    assert got.shape == ref.shape == (3, 5, 9, 9)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < (1e-12 if dtype == torch.float64 else 1e-5), float(err)


def test_modulated_conv_layer_matches_reference():
    """The synthesis layer (affine, upsampling, weight gain, bias, activation) is the
    fused form with those pieces around it."""
    layer = ModulatedConv2d(6, 4, 7, up=2)
    with torch.no_grad():
        layer.bias.normal_()
    x, w = _rand(2, 6, 5, 5, seed=1), _rand(2, 7, seed=2)
    styles = layer.affine(w)
    ref = _fused_modconv_reference(upsample2x(x), layer.weight * layer.weight_gain, styles,
                                   demodulate=True)
    ref = F.leaky_relu(ref + layer.bias[None, :, None, None], 0.2) * math.sqrt(2)
    got = layer(x, w)
    assert got.shape == (2, 4, 10, 10)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


# ----------------------------------------------------------------------------- discriminator

@pytest.mark.parametrize("batch", [1, 3, 4, 6])
def test_discriminator_any_batch_size(batch):
    D = Discriminator(TINY.discriminator)
    img = _rand(batch, 1, TINY.resolution, TINY.resolution).requires_grad_(True)
    logits = D(img)
    assert logits.shape == (batch, 1) and torch.isfinite(logits).all()
    (grad,) = torch.autograd.grad(logits.sum(), img)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_minibatch_std_groups():
    assert [mbstd_group_size(b, 4) for b in (1, 2, 3, 4, 5, 6, 8, 9)] == [1, 2, 3, 4, 1, 3, 4, 3]
    x = _rand(6, 2, 3, 3, dtype=torch.float64)
    y = minibatch_std(x, group_size=4)  # groups of 3: samples {0, 2, 4} and {1, 3, 5}
    assert y.shape == (6, 3, 3, 3) and torch.equal(y[:, :2], x)
    for members in ([0, 2, 4], [1, 3, 5]):
        g = x[members]
        expect = (g.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        for i in members:
            torch.testing.assert_close(y[i, 2], expect.expand(3, 3))


# ----------------------------------------------------------------------------- encoder

def test_encoder_pyramid_and_groups():
    assert pyramid_sizes(128) == (8, 16, 32)
    assert pyramid_sizes(32) == (4, 8, 16)
    assert pyramid_sizes(8) == (4, 8, 8)
    assert style_groups(12) == (4, 8) and style_groups(8) == (2, 5)
    E = Encoder(replace(TINY.encoder, resolution=8, num_ws=4))
    assert E(_rand(2, 1, 8, 8)).shape == (2, 4, TINY.encoder.w_dim)


def test_encoder_starts_at_w_avg_and_every_parameter_learns():
    E = Encoder(TINY.encoder)
    w_avg = _rand(E.w_dim, seed=7)
    E.w_avg.copy_(w_avg)
    img = _rand(4, 1, TINY.resolution, TINY.resolution).clamp(-1, 1)
    ws = E(img)
    assert ws.shape == (4, E.num_ws, E.w_dim)
    offsets = ws - w_avg
    assert offsets.abs().max() < 0.05 * w_avg.abs().max()
    assert offsets.abs().max() > 0  # small, not zero: gradients reach the backbone
    ws.square().sum().backward()
    names = [n for n, p in E.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not names, f"no gradient: {names}"
    assert "w_avg" in dict(E.named_buffers())


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_weights():
    def states(seed):
        torch.manual_seed(seed)
        return {k: net.state_dict() for k, net in build_networks(TINY).items()}

    a, b, c = states(3), states(3), states(4)
    for k in a:
        assert a[k].keys() == b[k].keys()
        for name in a[k]:
            assert torch.equal(a[k][name], b[k][name]), (k, name)
    assert not torch.equal(a["G"]["synthesis.blocks.0.const"], c["G"]["synthesis.blocks.0.const"])
    img = _rand(2, 1, TINY.resolution, TINY.resolution)
    torch.manual_seed(3)
    net1 = UNet(TINY.unet)
    torch.manual_seed(3)
    net2 = UNet(TINY.unet)
    assert torch.equal(net1(img), net2(img))


# ----------------------------------------------------------------------------- export

def _example(cfg, which: str, batch: int, seed: int = 11) -> torch.Tensor:
    R = cfg.resolution
    if which in ("G", "WSeg"):
        return _rand(batch, cfg.generator.num_ws, cfg.generator.w_dim, seed=seed)
    return _rand(batch, 1, R, R, seed=seed).clamp(-1, 1)


def _build(cfg, which: str) -> torch.nn.Module:
    ctor = {"G": lambda: Generator(cfg.generator), "E": lambda: Encoder(cfg.encoder),
            "Seg": lambda: UNet(cfg.unet), "WSeg": lambda: WSegNet(cfg.wseg)}[which]
    net = ctor().eval()
    if which == "E":
        with torch.no_grad():
            net.w_avg.copy_(_rand(net.w_dim, seed=3))
    return net


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


EXPORT_CASES = (
    [pytest.param("tiny", k, id=f"tiny-{k}") for k in ("G", "E", "Seg", "WSeg")]
    + [pytest.param(p, k, id=f"{p}-{k}", marks=pytest.mark.slow)
       for p in ("small128", "base128") for k in ("G", "E", "Seg")])


@pytest.mark.parametrize("preset,which", EXPORT_CASES)
def test_export(preset, which, tmp_path):
    """torch.export (dynamic batch) matches eager to 1e-5 relative; the ONNX graph
    matches PyTorch in onnxruntime to rtol 1e-4 (relative to max |reference|)."""
    cfg = PRESETS[preset]
    net = _build(cfg, which)
    x = _example(cfg, which, B)
    program = export_program(net, (x,))
    # other batch sizes through the same program (traced at 2)
    others = [_example(cfg, which, b, seed=12) for b in (1, 3)] if preset == "tiny" else []
    with torch.no_grad():
        for inp in [x] + others:
            assert _rel_err(program.module()(inp), net(inp)) < 1e-5
    # One case takes the module path (export_onnx traces the module itself); the others
    # reuse the program (one trace instead of two).
    source = net if (preset, which) == ("tiny", "Seg") else program
    path = export_onnx(source, (x,), tmp_path / f"{which}.onnx", input_names=["x"],
                       output_names=["y"])
    report = verify_onnx(path, net, (x,), rtol=1e-4)
    assert report["max_rel_err"] < 1e-4 and report["providers"][0] == "CPUExecutionProvider"
    for inp in others:  # the graph's batch dimension is dynamic too
        assert verify_onnx(path, net, (inp,), rtol=1e-4)["max_rel_err"] < 1e-4
    if (preset, which) == ("tiny", "Seg"):  # the check can fail: a perturbed model is refused
        bad = copy.deepcopy(net)
        with torch.no_grad():
            bad.head.bias.add_(0.01)
        with pytest.raises(ExportVerificationError, match="disagrees"):
            verify_onnx(path, bad, (x,), rtol=1e-4)
    path.unlink()  # the 128 px graphs are up to 0.5 GB


def test_training_only_parts_export_too():
    """D (static batch: its minibatch-std groups depend on it) and G's mapping network
    pass torch.export as well, so every network of the trainer is exportable."""
    D = Discriminator(TINY.discriminator).eval()
    x = _rand(4, 1, TINY.resolution, TINY.resolution, seed=5)
    program = export_program(D, (x,), dynamic_batch=False)
    with torch.no_grad():
        assert _rel_err(program.module()(x), D(x)) < 1e-5
    G = Generator(TINY.generator).eval()
    z = _rand(3, TINY.generator.z_dim, seed=6)
    program = export_program(G.mapping, (z,))
    with torch.no_grad():
        assert _rel_err(program.module()(z), G.mapping(z)) < 1e-5
