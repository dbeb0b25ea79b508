"""Every training stage end to end on the CPU with the tiny preset: the run folder, its
checkpoints (bit-exact reload, exact resume), the CLI and torchrun with two ranks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deeprecon.runtime.cli import run as cli_run
from deeprecon.runtime.errors import ExitCode, UsageError
from deeprecon.runtime.phantom import make_phantom, write_phantom
from deeprecon.trainer.checkpoint import (MODEL_FILE, latest_checkpoint, load_checkpoint,
                                          read_state, save_checkpoint)
from deeprecon.trainer.cli import train
from deeprecon.trainer.config import get_preset
from deeprecon.trainer.networks import Generator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Two small phantoms (8 slices x 2 phases each): 32 training slices."""
    root = tmp_path_factory.mktemp("phantoms")
    for seed in (0, 1):
        write_phantom(make_phantom(slices=8, phases=2, seed=seed, anatomy_jitter=0.1,
                                   matrix=(96, 112), pixel_spacing_mm=2.5),
                      root / f"phantom{seed}")
    return root


def _train(stage, out, data=None, **kw):
    return train(stage, data=data, preset="tiny", out=out, **kw)


@pytest.fixture(scope="module")
def runs(phantoms, tmp_path_factory) -> dict[str, Path]:
    """The whole chain of stages, once, with the tiny preset's defaults."""
    root = tmp_path_factory.mktemp("runs")
    r = {name: root / name for name in ("gan", "encoder", "latents", "seg", "seg-direct", "wseg")}
    _train("gan", r["gan"], phantoms)
    _train("encoder", r["encoder"], phantoms, inputs={"gan": r["gan"]})
    _train("latents", r["latents"], phantoms, inputs={"gan": r["gan"], "encoder": r["encoder"]})
    _train("seg", r["seg"], inputs={"latents": r["latents"]})
    _train("seg-direct", r["seg-direct"], phantoms)
    _train("wseg", r["wseg"], inputs={"latents": r["latents"]})
    return r


STAGE_INPUTS = {"gan": (), "encoder": ("gan",), "latents": ("gan", "encoder"),
                "seg": ("latents",), "seg-direct": (), "wseg": ("latents",)}
READS_DATA = {"gan", "encoder", "latents", "seg-direct"}


@pytest.mark.parametrize("stage", list(STAGE_INPUTS))
def test_stage_writes_its_run_folder(runs, stage):
    run = runs[stage]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage"] == stage and summary["preset"] == "tiny"
    info = json.loads((run / "run.json").read_text())
    assert info["model"]["name"] == "tiny" and info["stage"] == stage
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    tensors, meta = read_state(ckpt)
    assert "rng.cpu" in tensors and meta["step"] >= 1
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert lines, "no log lines"
    if stage == "latents":
        bank = load_file(str(run / "latents.safetensors"))
        n = summary["n_slices"]
        assert n == 32
        assert bank["w"].shape == (n, 8, 32)
        assert torch.isfinite(bank["w"]).all()
        assert (bank["psnr"] > 0).all() and (bank["ssim"] <= 1).all()
        assert (run / "slices.safetensors").is_file()
    else:
        model = load_file(str(run / MODEL_FILE))
        assert model and all(t.dtype in (torch.float16, torch.float32, torch.int64, torch.uint8)
                             for t in model.values())
        assert any(t.dtype == torch.float16 for t in model.values())


def test_gan_writes_samples_and_quality_figure(runs):
    run = runs["gan"]
    assert (run / "samples" / "reals.png").is_file()
    assert (run / "samples" / "fakes-00000004.png").is_file()
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    fd = [line["fd_alex"] for line in lines if "fd_alex" in line]
    assert fd and all(v >= 0 and v == v for v in fd)
    assert any(line.get("r1") is not None for line in lines)
    assert all(0.0 <= line["ada_p"] <= 1.0 for line in lines if "ada_p" in line)


def test_checkpoint_reloads_bit_exactly(runs):
    """Loading a checkpoint into fresh networks and saving again gives the same bytes'
    worth of tensors."""
    ckpt = latest_checkpoint(runs["gan"])
    tensors, _ = read_state(ckpt)
    cfg = get_preset("tiny").generator
    G, G_ema = Generator(cfg), Generator(cfg)
    from deeprecon.trainer.augment import AugmentPipe
    from deeprecon.trainer.networks import Discriminator
    D = Discriminator(get_preset("tiny").discriminator)
    opt_g = torch.optim.Adam(G.parameters())
    opt_d = torch.optim.Adam(D.parameters())
    mods = {"G": G, "D": D, "G_ema": G_ema, "augment": AugmentPipe()}
    load_checkpoint(ckpt, modules=mods, optimizers={"G": opt_g, "D": opt_d})
    for key, value in G.state_dict().items():
        assert torch.equal(value, tensors[f"module.G.{key}"]), key
    again = save_checkpoint(ckpt.parent.parent.parent / "resaved", 0, modules=mods,
                            optimizers={"G": opt_g, "D": opt_d})
    t2, _ = read_state(again)
    for key, value in tensors.items():
        if key.startswith(("module.", "optim.")):
            assert torch.equal(value, t2[key]), key


@pytest.mark.parametrize("stage", list(STAGE_INPUTS))
def test_resume_continues_exactly(runs, phantoms, tmp_path, stage):
    """Stopping after 2 steps (latents: after 7 of 8 chunks) and resuming gives the same final state,
    bit for bit, as the uninterrupted run of the `runs` fixture."""
    out = tmp_path / stage
    inputs = {k: runs[k] for k in STAGE_INPUTS[stage]}
    data = phantoms if stage in READS_DATA else None
    if stage == "latents":
        # 32 slices in chunks of 4: 8 checkpoints, one per chunk. Rewind to the 7th (as if
        # the run had been killed after writing it) and resume.
        _train(stage, out, data, inputs=inputs)
        _rewind(out, 7)
        _train(stage, out, data, inputs=inputs, resume=True)
        # the resumed run inverted only the last chunk: one more log line, for chunk 8
        done = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert done == list(range(1, 9)) + [8]
    else:
        _train(stage, out, data, inputs=inputs, steps=2)
        _train(stage, out, data, inputs=inputs, steps=4, resume=True)
    a, _ = read_state(latest_checkpoint(runs[stage]))
    b, _ = read_state(latest_checkpoint(out))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{stage}: {key} differs after resume"
    if stage == "latents":
        assert torch.equal(load_file(str(out / "latents.safetensors"))["w"],
                           load_file(str(runs[stage] / "latents.safetensors"))["w"])


def _rewind(run: Path, step: int) -> None:
    """Make the checkpoint of ``step`` the latest one (as if the run had been killed
    right after writing it)."""
    from deeprecon.trainer.checkpoint import write_json_atomic

    name = f"ckpt-{step:08d}"
    assert (run / "checkpoints" / name).is_dir()
    write_json_atomic(run / "checkpoints" / "latest.json", {"name": name, "step": step})
    (run / "latents.safetensors").unlink()


def test_cli_train_and_errors(phantoms, tmp_path, runs, capsys):
    out = tmp_path / "gan"
    code = cli_run(["train", "gan", "--data", str(phantoms), "--config", "tiny", "--out", str(out),
                    "--steps", "1", "--set", "fd_every=1", "--json"])
    assert code == ExitCode.OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and summary["preset"] == "tiny"
    # the folder exists now: a second fresh run into it is refused
    code = cli_run(["train", "gan", "--data", str(phantoms), "--config", "tiny", "--out", str(out)])
    assert code == ExitCode.USAGE
    assert "already exists" in capsys.readouterr().err
    # missing upstream run
    code = cli_run(["train", "encoder", "--data", str(phantoms), "--config", "tiny",
                    "--out", str(tmp_path / "e")])
    assert code == ExitCode.USAGE and "--gan" in capsys.readouterr().err
    # an upstream run of another stage
    code = cli_run(["train", "encoder", "--data", str(phantoms), "--config", "tiny",
                    "--out", str(tmp_path / "e2"), "--gan", str(runs["seg"])])
    assert code == ExitCode.USAGE and "'seg' run" in capsys.readouterr().err
    # data that is not there / not data
    code = cli_run(["train", "gan", "--data", str(tmp_path / "nope"), "--config", "tiny",
                    "--out", str(tmp_path / "g2")])
    assert code == ExitCode.NO_INPUT
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a study")
    code = cli_run(["train", "gan", "--data", str(junk), "--config", "tiny",
                    "--out", str(tmp_path / "g3")])
    assert code == ExitCode.DATA
    err = capsys.readouterr().err
    assert "junk" in err and "Traceback" not in err
    # unknown preset and unknown setting
    code = cli_run(["train", "gan", "--data", str(phantoms), "--config", "huge",
                    "--out", str(tmp_path / "g4")])
    assert code == ExitCode.USAGE and "small128" in capsys.readouterr().err
    code = cli_run(["train", "gan", "--data", str(phantoms), "--config", "tiny",
                    "--out", str(tmp_path / "g5"), "--set", "lr_q=1"])
    assert code == ExitCode.USAGE and "lr_g" in capsys.readouterr().err
    # resume without a checkpoint
    code = cli_run(["train", "gan", "--data", str(phantoms), "--config", "tiny",
                    "--out", str(tmp_path / "g6"), "--resume"])
    assert code == ExitCode.USAGE


def test_seg_direct_class_weights_train_and_bad_ones_are_refused(phantoms, tmp_path, capsys):
    _train("seg-direct", tmp_path / "w", phantoms, steps=2, sets={"class_weights": "1,1,1,2"})
    info = json.loads((tmp_path / "w" / "run.json").read_text())
    assert info["config"]["class_weights"] == [1.0, 1.0, 1.0, 2.0]
    for bad in ("1,1,2", "1,0,1,1"):
        code = cli_run(["train", "seg-direct", "--data", str(phantoms), "--config", "tiny",
                        "--out", str(tmp_path / f"bad{len(bad)}"), "--set", f"class_weights={bad}"])
        assert code == ExitCode.USAGE and "class_weights must be 4 positive" in capsys.readouterr().err


def test_seg_warm_starts_from_a_unet_and_trains_on_real_slices_too(runs, phantoms, tmp_path,
                                                                   caplog):
    """--warm-start for seg takes a finished U-Net (here DirectSeg's): at a learning rate
    of ~0 the run ends where that U-Net was; with_real adds the bank's real slices."""
    source = runs["seg-direct"] / MODEL_FILE
    tiny_lr = {"lr": "1e-12", "lr_min": "1e-12", "with_real": "true"}
    with caplog.at_level("INFO", logger="deeprecon.trainer.seg"):
        _train("seg", tmp_path / "warm", inputs={"latents": runs["latents"]}, steps=1,
               sets=tiny_lr, warm_start=source)
    assert "and as many real ones" in caplog.text
    info = json.loads((tmp_path / "warm" / "run.json").read_text())
    assert info["warm_start"] == str(source.resolve()) and info["config"]["with_real"] is True
    _train("seg", tmp_path / "cold", inputs={"latents": runs["latents"]}, steps=1, sets=tiny_lr)
    src, warm, cold = (load_file(str(p)) for p in (source, tmp_path / "warm" / MODEL_FILE,
                                                   tmp_path / "cold" / MODEL_FILE))
    conv = next(k for k in src if k.endswith("weight") and src[k].dim() == 4)
    assert torch.allclose(warm[conv].float(), src[conv].float(), atol=1e-6)
    assert not torch.allclose(cold[conv].float(), src[conv].float(), atol=1e-3)
    # a file without a U-Net, real slices for seg-direct, warm start for the encoder
    with pytest.raises(UsageError, match="no U-Net"):
        _train("seg", tmp_path / "bad1", inputs={"latents": runs["latents"]}, steps=1,
               warm_start=runs["encoder"] / MODEL_FILE)
    with pytest.raises(UsageError, match="with_real is for the seg stage"):
        _train("seg-direct", tmp_path / "bad2", phantoms, steps=1, sets={"with_real": "true"})
    with pytest.raises(UsageError, match="--warm-start is for the gan, seg, seg-direct"):
        _train("encoder", tmp_path / "bad3", phantoms, inputs={"gan": runs["gan"]}, steps=1,
               warm_start=source)
    # a U-Net of another size: refused with both sizes named, before any training
    from dataclasses import replace

    from deeprecon.trainer.checkpoint import save_model
    from deeprecon.trainer.networks import UNet
    tiny = get_preset("tiny")
    other = replace(tiny, name="wider", unet=replace(tiny.unet, base_channels=2 * tiny.unet.base_channels))
    save_model(tmp_path / "wider.safetensors", {"Seg": UNet(other.unet)}, config=other.to_dict())
    with pytest.raises(UsageError, match=r"its U-Net \(preset wider: .*base_channels "
                                         rf"{2 * tiny.unet.base_channels}.*\) is not this run's"):
        _train("seg", tmp_path / "bad4", inputs={"latents": runs["latents"]}, steps=1,
               warm_start=tmp_path / "wider.safetensors")


def test_resume_refuses_other_settings(phantoms, runs, tmp_path):
    out = tmp_path / "seg"
    _train("seg-direct", out, phantoms, steps=2)
    from deeprecon.runtime.errors import UsageError
    with pytest.raises(UsageError, match="lr"):
        _train("seg-direct", out, phantoms, steps=4, resume=True, sets={"lr": "0.5"})
    # a setting that a later version added resumes when it keeps its default ...
    run_json = out / "run.json"
    info = json.loads(run_json.read_text())
    del info["config"]["affine"]
    run_json.write_text(json.dumps(info))
    _train("seg-direct", out, phantoms, steps=3, resume=True)
    # ... and is refused when it would change what the run does
    info = json.loads(run_json.read_text())
    del info["config"]["affine"]
    run_json.write_text(json.dumps(info))
    with pytest.raises(UsageError, match="affine"):
        _train("seg-direct", out, phantoms, steps=4, resume=True, sets={"affine": "true"})


def test_train_without_torch_names_what_is_missing(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from deeprecon.runtime.cli import run\n"
        f"sys.exit(run(['train', 'gan', '--data', {str(tmp_path)!r}, '--config', 'tiny', "
        f"'--out', {str(tmp_path / 'o')!r}]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == ExitCode.UNAVAILABLE, p.stderr
    assert "torch" in p.stderr and "pip install" in p.stderr


def test_torchrun_two_ranks_trains_tiny_gan(phantoms, runs, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): same checkpoint format as one
    process, both ranks' data shards used."""
    out = tmp_path / "gan2"
    _torchrun(phantoms, out, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    a, meta_a = read_state(latest_checkpoint(runs["gan"]))
    b, meta_b = read_state(latest_checkpoint(out))
    # the same tensors, plus every rank's RNG state (so each rank resumes its own stream)
    assert set(b) - set(a) == {"extra.rank_rng.cpu.0", "extra.rank_rng.cpu.1"}
    assert set(a) <= set(b)
    assert not torch.equal(b["extra.rank_rng.cpu.0"], b["extra.rank_rng.cpu.1"])
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert meta_b["step"] == 3
    assert json.loads((out / "run.json").read_text())["world_size"] == 2


def _torchrun(data: Path, out: Path, steps: int, *extra: str) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the Python interpreter"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2",
                        "-m", "deeprecon.trainer.cli", "gan", "--data", str(data),
                        "--config", "tiny", "--out", str(out), "--steps", str(steps), *extra],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]


def test_torchrun_resume_restores_every_rank(phantoms, tmp_path):
    """Two ranks: 2 steps then --resume to 3 equals 3 steps straight, bit for bit."""
    _torchrun(phantoms, tmp_path / "straight", 3)
    _torchrun(phantoms, tmp_path / "split", 2)
    _torchrun(phantoms, tmp_path / "split", 3, "--resume")
    a, _ = read_state(latest_checkpoint(tmp_path / "straight"))
    b, _ = read_state(latest_checkpoint(tmp_path / "split"))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_projected_discriminator_trains_only_its_heads_and_warm_starts_from_a_stylegan2_run(phantoms, tmp_path):
    """The Projected-GAN D: the frozen AlexNet trunk is neither a parameter nor in the
    state dict (requires_grad_ does not unfreeze it), gradients reach the image, the
    fixed mixing weights are buffers; a gan run with it continues a state trained with
    the StyleGAN2 D (G and E loaded, D afresh) and its own compact state warm-starts
    with D loaded."""
    from deeprecon.trainer.checkpoint import COMPACT_FILE, compact_extra
    from deeprecon.trainer.lpips import load_lpips
    from deeprecon.trainer.networks.projected import ProjectedDiscriminator

    D = ProjectedDiscriminator(load_lpips(layers=3), seed=0)
    D.requires_grad_(True)
    assert all(not p.requires_grad for p in D._features.parameters())
    assert not any(k.startswith(("_features", "net.", "lin")) for k in D.state_dict())
    assert {"ccm1", "ccm2", "ccm3", "csm32", "csm21"} <= {k for k, _ in D.named_buffers()}
    img = torch.randn(3, 1, 64, 64, requires_grad=True)
    logits = D(img)
    assert logits.shape == (3, 16 + 16 + 1)
    logits.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert all(p.grad is not None for p in D.parameters())

    sets = {"joint_encoder": "true"}
    proj = {**sets, "discriminator": "projected", "r1_gamma": "0", "lr_d": "0.0002"}
    _train("gan", tmp_path / "sg2", phantoms, steps=2, sets=sets)
    compact = tmp_path / "sg2" / COMPACT_FILE
    assert compact_extra(compact)["discriminator"] == "stylegan2"
    _train("gan", tmp_path / "proj", phantoms, steps=4, sets=proj, warm_start=compact)
    ct = load_file(str(tmp_path / "proj" / COMPACT_FILE))
    assert compact_extra(tmp_path / "proj" / COMPACT_FILE)["discriminator"] == "projected"
    assert any(k.startswith("module.D.head1.") for k in ct)
    before = ct["module.D.head1.0.parametrizations.weight.original"]
    _train("gan", tmp_path / "proj2", phantoms, steps=5, sets={**proj, "lr_d": "0"},
           warm_start=tmp_path / "proj" / COMPACT_FILE)
    after = load_file(str(tmp_path / "proj2" / COMPACT_FILE))["module.D.head1.0.parametrizations.weight.original"]
    assert torch.equal(before, after)  # loaded, then unchanged at lr 0
    with pytest.raises(UsageError, match="unknown discriminator"):
        _train("gan", tmp_path / "bad", phantoms, steps=1, sets={"discriminator": "pixel"})


def test_acdc_tiny_gan_and_direct_seg_with_validation(acdc_root, tmp_path):
    """The shared ACDC data through the stages: training patients for training, the
    validation patients of the shipped split for the Dice figures."""
    s = train("gan", data=acdc_root, preset="tiny", out=tmp_path / "gan", steps=1, max_patients=2)
    assert s["n_slices"] > 20
    s = train("seg-direct", data=acdc_root, preset="tiny", out=tmp_path / "seg", steps=2,
              max_patients=2)
    for key in ("val_dice_lvc", "val_dice_lvm", "val_dice_rvc"):
        assert 0.0 <= s[key] <= 1.0 or s[key] != s[key]
    assert s["val_slices"] > 10
    info = json.loads((tmp_path / "seg" / "run.json").read_text())
    assert info["data_options"] == {"split": "train", "max_patients": 2}


def test_lpips_weights_option(phantoms, tmp_path, capsys):
    """--lpips-weights: a copy of the wheel's file works; a changed byte is refused (69)."""
    from deeprecon.trainer.lpips import installed_weights_path

    good = tmp_path / "alex.pth"
    shutil.copyfile(installed_weights_path(), good)
    args = ["train", "gan", "--data", str(phantoms), "--config", "tiny", "--steps", "1"]
    assert cli_run([*args, "--out", str(tmp_path / "a"), "--lpips-weights", str(good)]) == ExitCode.OK
    bad = tmp_path / "bad.pth"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    code = cli_run([*args, "--out", str(tmp_path / "b"), "--lpips-weights", str(bad)])
    assert code == ExitCode.UNAVAILABLE
    assert "bad.pth" in capsys.readouterr().err
    # the run stopped before its first checkpoint: the same --out can be used again
    assert cli_run([*args, "--out", str(tmp_path / "b"), "--lpips-weights", str(good)]) == ExitCode.OK


def test_joint_encoder_gan_resumes_exactly_warm_starts_and_feeds_the_encoder(phantoms, tmp_path, capsys):
    """gan with joint_encoder: E trains with G (its model file holds both, the log has the
    reconstruction figures), --resume is bit-exact, the compact state continues the run in
    a new folder (--warm-start), and the encoder stage starts from the joint E."""
    from deeprecon.trainer.checkpoint import COMPACT_FILE, load_model, model_modules
    from deeprecon.trainer.networks import Encoder

    sets = {"joint_encoder": "true", "mixed_precision_cpu": "true"}  # bf16 on the CPU too
    straight = _train("gan", tmp_path / "straight", phantoms, steps=4, sets=sets)
    assert straight["steps"] == 4
    assert model_modules(tmp_path / "straight" / MODEL_FILE) == {"G", "E"}
    lines = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert all(k in lines[0] for k in ("rec_l2", "rec_lpips", "rec_reg", "rec_psnr"))
    assert (tmp_path / "straight" / "samples" / "recon-00000004.png").is_file()

    _train("gan", tmp_path / "resumed", phantoms, steps=2, sets=sets)
    _train("gan", tmp_path / "resumed", phantoms, steps=4, sets=sets, resume=True)
    a, _ = read_state(latest_checkpoint(tmp_path / "straight"))
    b, _ = read_state(latest_checkpoint(tmp_path / "resumed"))
    assert set(a) == set(b) and any(k.startswith("module.E.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key

    compact = tmp_path / "straight" / COMPACT_FILE
    ct = load_file(str(compact))
    assert ct["module.G.synthesis.blocks.0.const"].dtype == torch.float16
    assert ct["module.G_ema.mapping.w_avg"].dtype == torch.float32
    assert ct["module.augment.p"].dtype == torch.float32  # the augmentation state is exact
    assert not any(k.startswith(("optim.", "rng.")) for k in ct)  # no moments, no RNG
    warm = _train("gan", tmp_path / "warm", phantoms, steps=6, sets=sets, warm_start=compact)
    assert warm["steps"] == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "warm" / "log.jsonl").read_text().splitlines()]
    assert min(steps) == 5  # continued after step 4
    # refusals: another stage, with --resume, a missing file
    assert cli_run(["train", "seg-direct", "--data", str(phantoms), "--config", "tiny", "--out",
                    str(tmp_path / "x"), "--warm-start", str(compact)]) == ExitCode.USAGE
    assert cli_run(["train", "gan", "--data", str(phantoms), "--config", "tiny", "--out",
                    str(tmp_path / "warm"), "--resume", "--warm-start", str(compact)]) == ExitCode.USAGE
    assert cli_run(["train", "gan", "--data", str(phantoms), "--config", "tiny", "--out",
                    str(tmp_path / "y"), "--warm-start", str(tmp_path / "none")]) == ExitCode.NO_INPUT

    # the encoder stage starts from the joint E (one step at lr 0 leaves it unchanged)
    _train("encoder", tmp_path / "enc", phantoms, inputs={"gan": tmp_path / "straight"},
           steps=1, sets={"lr": "0"})
    joint, staged = Encoder(get_preset("tiny").encoder), Encoder(get_preset("tiny").encoder)
    load_model(tmp_path / "straight" / MODEL_FILE, {"E": joint})
    load_model(tmp_path / "enc" / MODEL_FILE, {"E": staged})
    for (k, p), q in zip(joint.state_dict().items(), staged.state_dict().values()):
        if k != "w_avg":
            assert torch.equal(p, q), k


def test_encoder_affine_augmentation_changes_what_e_sees(runs, phantoms, tmp_path):
    """encoder --set affine=true: the same seed and batches, but transformed slices, so
    the first step's loss differs from the plain run's; the run records the setting."""
    logs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        _train("encoder", out, phantoms, inputs={"gan": runs["gan"]}, steps=1,
               sets={"affine": flag, "log_every": "1"})
        logs[flag] = json.loads((out / "log.jsonl").read_text().splitlines()[0])
        assert json.loads((out / "run.json").read_text())["config"]["affine"] is (flag == "true")
    assert logs["true"]["loss"] != pytest.approx(logs["false"]["loss"], rel=1e-6)
