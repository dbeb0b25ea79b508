"""Stages ``seg`` and ``seg-direct``: the 2D U-Net (cross-entropy + Dice loss).

- ``seg`` (the paper's Seg): trained on the synthetic images G(w*) of the latent bank
  (``--latents RUN``), with the real slices' labels. The images are rendered once, by
  the G the bank was inverted with.
- ``seg-direct`` (the paper's DirectSeg baseline): the same U-Net on the real images
  of ``--data``.

Both use a random x-flip and rotation by multiples of 90 degrees per batch and, with
``affine`` (the ``cpu64`` default), a random affine and intensity change per image
(:func:`.common.affine_intensity`). ``with_real`` (``seg`` only): the training set is
G(w*) and the bank's real slices, both with the real labels (Seg still segments G(w*)
at run time; the real slices anchor the labels where G(w*) drifts from x).
``--warm-start FILE`` starts the U-Net from a finished seg or seg-direct run's model
file (e.g. DirectSeg, trained on real slices). ``class_weights`` (background, LVC, LVM, RVC)
weight the cross-entropy per class (empty: unweighted). ``lr_min`` < ``lr``: the
learning rate follows a cosine from ``lr`` to ``lr_min`` over ``steps`` (a function of
the step, so resuming needs no scheduler state). With an ACDC data folder, the Dice per structure on the validation split's real slices is
logged at every checkpoint. :func:`train_supervised` is the loop, shared with ``wseg``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from deeprecon.runtime.errors import InvalidStudyError, UsageError

from ..checkpoint import (MODEL_FILE, latest_checkpoint, load_checkpoint,
                          load_model, model_file_config, model_modules, save_checkpoint,
                          save_model)
from ..config import CPU_PRESETS, N_CLASSES
from ..data import BatchSampler, build_slices
from ..distributed import (all_reduce_grads, barrier, broadcast_module, decorrelate_rng,
                           gather_rng_states, restore_rng_states)
from ..losses import dice_per_class, seg_loss
from ..networks import Generator, UNet
from ..run import RunContext, load_networks, read_run, upstream
from .common import (affine_intensity, batched, check_class_weights, cosine_lr, flip_rot,
                     seed_all)

log = logging.getLogger("deeprecon.trainer.seg")

NEEDS_BY_STAGE = {"seg": ("latents",), "seg-direct": ()}
NEEDS = ("latents",)  # for `seg`; `seg-direct` needs only --data


@dataclass(frozen=True)
class Config:
    steps: int = 20000
    batch: int = 16
    lr: float = 1e-3
    lr_min: float = 1e-3
    augment: bool = True
    affine: bool = False
    class_weights: tuple[float, ...] = ()
    with_real: bool = False
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        check_class_weights(self.class_weights)

    @classmethod
    def for_preset(cls, preset: str) -> "Config":
        if preset == "tiny":
            return cls(steps=4, batch=4, checkpoint_every=2, log_every=1)
        if preset in CPU_PRESETS:
            return cls(steps=8000, batch=16, lr=2e-3, lr_min=5e-5, affine=True,
                       checkpoint_every=500, log_every=50)
        return cls()


def train_supervised(ctx: RunContext, cfg: Config, net: torch.nn.Module, name: str,
                     inputs: torch.Tensor, labels: torch.Tensor, *, spatial_inputs: bool,
                     validate: Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Train ``net`` (``inputs`` [N, ...] -> logits [N, K, R, R]) on ``labels`` [N, R, R]
    with CE + Dice. ``spatial_inputs``: the inputs are images, augmented with the labels
    (flip / rot90, and the affine/intensity change where ``cfg.affine``); w+ codes are
    not. The learning rate follows :func:`.common.cosine_lr`. Checkpoints hold the net, the optimizer, the
    sampler and the RNG states."""
    dist, device = ctx.dist, ctx.device
    if cfg.batch % dist.world_size:
        raise UsageError(f"batch {cfg.batch} is not divisible by the {dist.world_size} ranks")
    weights = (torch.tensor(cfg.class_weights, dtype=torch.float32, device=device)
               if cfg.class_weights else None)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sampler = BatchSampler(len(inputs), cfg.batch // dist.world_size, seed=cfg.seed,
                           rank=dist.rank, world_size=dist.world_size)
    step = 0
    broadcast_module(net, dist)
    decorrelate_rng(cfg.seed, dist)
    if ctx.resume:
        step, t, extra = load_checkpoint(latest_checkpoint(ctx.run_dir), modules={name: net},
                                         optimizers={name: opt})
        restore_rng_states(t, dist)
        sampler.load_state_dict(extra["sampler"])
    last: dict = {}
    while step < cfg.steps:
        idx = sampler.next_batch()
        x, y = inputs[idx], labels[idx].long()
        if spatial_inputs and cfg.augment:
            x, y = flip_rot(x, y)
        if spatial_inputs and cfg.affine:
            x, y = affine_intensity(x, y)
        x, y = x.to(device), y.to(device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.lr_min)
        net.train()
        logits = net(x)
        loss = seg_loss(logits, y, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_grads(net.parameters(), dist)
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            dice = dice_per_class(logits.argmax(1), y, N_CLASSES)
            last = {"loss": loss.item(), "train_dice_lvc": float(dice[0]),
                    "train_dice_lvm": float(dice[1]), "train_dice_rvc": float(dice[2])}
            ctx.log(step, **last)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            rngs = gather_rng_states(dist)
            if ctx.is_main:
                save_checkpoint(ctx.run_dir, step, modules={name: net}, optimizers={name: opt},
                                extra_tensors=rngs,
                                extra={"sampler": sampler.state_dict()})
                save_model(ctx.run_dir / MODEL_FILE, {name: net}, config=ctx.model.to_dict())
                if validate is not None:
                    net.eval()
                    val = validate(net)
                    ctx.log(step, **val)
                    last.update(val)
            barrier(dist)
        ctx.tick(step, cfg.steps)
    return {"steps": step, **last}


def _acdc_validation(ctx: RunContext, data_dir: Path | None):
    """Dice per structure of a U-Net on the validation split's real slices (ACDC only)."""
    if data_dir is None or not ctx.is_main:
        return None
    try:
        val = build_slices(data_dir, ctx.model.preprocess, split="val", require_labels=True,
                           max_patients=ctx.data_options.get("max_patients"),
                           cache_dir=ctx.run_dir / "cache")
    except UsageError as e:  # phantom folders have no validation split
        log.info("seg: no validation split for %s (%s); Dice is logged on training batches only",
                 data_dir, e)
        return None

    @torch.no_grad()
    def validate(net):
        pred = batched(lambda x: net(x).argmax(1), val.images, 32, ctx.device)
        d = dice_per_class(pred, val.labels.long(), N_CLASSES)
        return {"val_dice_lvc": float(d[0]), "val_dice_lvm": float(d[1]),
                "val_dice_rvc": float(d[2]), "val_slices": len(val)}

    return validate


def _unet_text(u: dict) -> str:
    return ", ".join(f"{k} {u[k]}" for k in ("resolution", "base_channels", "max_channels", "depth")
                     if k in u)


def run(ctx: RunContext, cfg: Config) -> dict:
    if cfg.with_real and ctx.stage == "seg-direct":
        raise UsageError("with_real is for the seg stage (seg-direct trains on real slices only)")
    seed_all(cfg.seed)
    net = UNet(ctx.model.unet).to(ctx.device)
    if ctx.warm_start is not None:
        if "Seg" not in model_modules(ctx.warm_start):
            raise UsageError(f"--warm-start {ctx.warm_start}: not a seg or seg-direct model "
                             f"file (it holds no U-Net 'Seg')")
        theirs = model_file_config(ctx.warm_start)
        ours = ctx.model.to_dict()
        if theirs.get("unet") is not None and theirs["unet"] != ours["unet"]:
            raise UsageError(
                f"--warm-start {ctx.warm_start}: its U-Net (preset {theirs.get('name', '?')}: "
                f"{_unet_text(theirs['unet'])}) is not this run's (preset {ours['name']}: "
                f"{_unet_text(ours['unet'])})", hint="warm-start from a run of the same preset")
        load_model(ctx.warm_start, {"Seg": net})
        log.info("%s: U-Net starts from %s", ctx.stage, ctx.warm_start)
    if ctx.stage == "seg-direct":
        data = ctx.slices(require_labels=True)
        images, labels, data_dir = data.images, data.labels, ctx.data_dir
    else:
        from .latents import load_bank

        upstream(ctx.inputs["latents"], "latents", ctx.model)
        lat_run = read_run(ctx.inputs["latents"])
        slices, bank = load_bank(ctx.inputs["latents"])
        if slices.labels is None:
            raise InvalidStudyError("the latent bank's slices have no labels",
                                hint="run the latents stage on labelled data")
        G = load_networks(Path(lat_run["inputs"]["gan"]), {"G": lambda: Generator(ctx.model.generator)},
                          device=ctx.device)["G"]
        with torch.no_grad():
            images = batched(G, bank["w"], 64, ctx.device)  # [N, 1, R, R] = G(w*)
        labels = slices.labels
        if cfg.with_real:
            images, labels = torch.cat([images, slices.images]), torch.cat([labels, labels])
        data_dir = ctx.data_dir or (Path(lat_run["data"]) if lat_run.get("data") else None)
        log.info("seg: %d synthetic slices rendered from the latent bank%s", len(bank["w"]),
                 ", and as many real ones" if cfg.with_real else "")
    validate = _acdc_validation(ctx, data_dir)
    return train_supervised(ctx, cfg, net, "Seg", images, labels, spatial_inputs=True,
                            validate=validate)
