"""Stage ``encoder``: E (image -> w+) trained on real slices with G frozen.

Loss per batch: ``lambda_l2 * ||x - G(E(x))||^2 + lambda_lpips * LPIPS(x, G(E(x)))
+ lambda_reg * mean((E(x) - w_avg)^2)``, the last term keeping the codes near the
region of w+ that G was trained on (e4e's motivation). E predicts offsets from G's
average latent, which is copied into E at the start.

When the gan run trained an encoder jointly (its model file holds ``E``; the
``cpu64`` preset does), E starts from that one (``from_gan``) and this stage adapts it
to the frozen G_ema; otherwise E starts from its random initialisation.

``affine``: each real slice gets a random affine and intensity change
(:func:`.common.affine_intensity`; no flips, which would put the RV where G never draws
it) before E and the loss, so that E sees more than the same 1,172 slices again and
again (the cpu64w encoder reached 19.5 dB on training batches but 16.1 dB on
validation slices).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from deeprecon.runtime.errors import UsageError

from ..checkpoint import (MODEL_FILE, latest_checkpoint, load_checkpoint, load_model,
                          model_modules, save_checkpoint, save_model)
from ..config import CPU_PRESETS
from ..data import BatchSampler
from ..distributed import all_reduce_grads, barrier, broadcast_module
from ..losses import psnr, reconstruction_loss
from ..networks import Encoder, Generator
from ..run import RunContext, load_networks, upstream
from .common import affine_intensity, seed_all

log = logging.getLogger("deeprecon.trainer.encoder")

NEEDS = ("gan",)


@dataclass(frozen=True)
class Config:
    steps: int = 20000
    batch: int = 16
    lr: float = 1e-4
    lambda_l2: float = 1.0
    lambda_lpips: float = 0.8
    lambda_reg: float = 0.01
    from_gan: bool = True
    affine: bool = False
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0

    @classmethod
    def for_preset(cls, preset: str) -> "Config":
        if preset == "tiny":
            return cls(steps=4, batch=4, lr=1e-3, checkpoint_every=2, log_every=1)
        if preset in CPU_PRESETS:
            return cls(steps=2000, batch=16, lr=1e-4, checkpoint_every=250)
        return cls()


def run(ctx: RunContext, cfg: Config) -> dict:
    dist, device = ctx.dist, ctx.device
    if cfg.batch % dist.world_size:
        raise UsageError(f"batch {cfg.batch} is not divisible by the {dist.world_size} ranks")
    upstream(ctx.inputs["gan"], "gan", ctx.model)
    G = load_networks(ctx.inputs["gan"], {"G": lambda: Generator(ctx.model.generator)},
                      device=device)["G"]
    data = ctx.slices()
    reals = data.images
    lpips = ctx.lpips()

    seed_all(cfg.seed)
    E = Encoder(ctx.model.encoder).to(device)
    if cfg.from_gan and "E" in model_modules(ctx.inputs["gan"] / MODEL_FILE):
        load_model(ctx.inputs["gan"] / MODEL_FILE, {"E": E})
        log.info("encoder: starting from the encoder trained with G in %s", ctx.inputs["gan"])
    with torch.no_grad():
        E.w_avg.copy_(G.w_avg)
    opt = torch.optim.Adam(E.parameters(), lr=cfg.lr)
    sampler = BatchSampler(len(reals), cfg.batch // dist.world_size, seed=cfg.seed,
                           rank=dist.rank, world_size=dist.world_size)
    step = 0
    if ctx.resume:
        step, _, extra = load_checkpoint(latest_checkpoint(ctx.run_dir), modules={"E": E},
                                         optimizers={"E": opt})
        sampler.load_state_dict(extra["sampler"])
    broadcast_module(E, dist)

    last = {}
    while step < cfg.steps:
        x = reals[sampler.next_batch()].to(device)  # [b, 1, R, R]
        if cfg.affine:
            x, _ = affine_intensity(x, None)
        ws = E(x)  # [b, L, C]
        y = G(ws)
        loss, parts = reconstruction_loss(x, y, ws, G.w_avg, lpips, lambda_l2=cfg.lambda_l2,
                                          lambda_lpips=cfg.lambda_lpips,
                                          lambda_reg=cfg.lambda_reg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_grads(E.parameters(), dist)
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            last = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                    "psnr": psnr(x.detach(), y.detach()).mean().item()}
            ctx.log(step, **last)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            if ctx.is_main:
                save_checkpoint(ctx.run_dir, step, modules={"E": E}, optimizers={"E": opt},
                                extra={"sampler": sampler.state_dict()})
                save_model(ctx.run_dir / MODEL_FILE, {"E": E}, config=ctx.model.to_dict())
            barrier(dist)
        ctx.tick(step, cfg.steps)
    return {"steps": step, **last}
