"""Stage ``latents``: the latent bank, by hybrid inversion of every training slice.

For each slice x (with its heart ROI), w+ starts at E(x) and takes ``steps`` Adam
steps on the paper's loss, the runtime's inversion loss
(:func:`deeprecon.runtime.inversion.hybrid_loss`, with x's LPIPS features computed
once)::

    lambda1 * (LPIPS(x, G(w)) + ROI-L2(x, G(w))) - lambda2 * NCC_local(x, G(w))
        + lambda3 * mean((w - E(G(w)))^2)

Each image's loss is independent of the others in its batch (summed, so Adam's
per-element steps are the same as for one image at a time). The loss weights and the
learning rate default to the runtime's (:class:`deeprecon.runtime.inversion.
InversionSettings`); there is no early stop here.

Writes into the run folder:
- ``slices.safetensors``: the training slices (images, labels, ROI, ids), the
  ``seg`` and ``wseg`` stages' data;
- ``latents.safetensors``: ``w`` [N, L, C] float32, ``psnr_init``/``ssim_init`` (of
  G(E(x))) and ``psnr``/``ssim`` (of G(w*)) [N], with the slices' fingerprint.

Resumable by chunks: a checkpoint after every ``checkpoint_every`` chunks holds the
codes done so far.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from deeprecon.runtime.inversion import InversionSettings, hybrid_loss

from ..checkpoint import (latest_checkpoint, load_checkpoint, save_checkpoint,
                          save_safetensors_atomic)
from ..config import CPU_PRESETS
from ..data import SliceSet
from ..distributed import all_gather_cat, barrier
from ..losses import psnr, ssim
from ..networks import Encoder, Generator
from ..run import RunContext, load_networks, upstream
from .common import seed_all

log = logging.getLogger("deeprecon.trainer.latents")

NEEDS = ("gan", "encoder")
SLICES_FILE = "slices.safetensors"
BANK_FILE = "latents.safetensors"


_RUNTIME = InversionSettings()


@dataclass(frozen=True)
class Config:
    steps: int = _RUNTIME.steps
    batch: int = 32
    lr: float = _RUNTIME.lr
    lambda1: float = _RUNTIME.lambda1
    lambda2: float = _RUNTIME.lambda2
    lambda3: float = _RUNTIME.lambda3
    ncc_window: int = _RUNTIME.ncc_window
    checkpoint_every: int = 10
    seed: int = 0

    @classmethod
    def for_preset(cls, preset: str) -> "Config":
        if preset == "tiny":
            return cls(steps=3, batch=4, checkpoint_every=1)
        if preset in CPU_PRESETS:
            return cls(steps=50, batch=32, checkpoint_every=4)
        return cls()


def invert(G: Generator, E: Encoder, lpips, x: torch.Tensor, roi: torch.Tensor, cfg: Config
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hybrid inversion of images x [B, 1, R, R] in [-1, 1] with ROI weights roi
    [B, 1, R, R]. Returns (w* [B, L, C], w_init = E(x) [B, L, C], G(w*) [B, 1, R, R])."""
    with torch.no_grad():
        w_init = E(x)
        x_features = lpips.reference_features(x)  # x is fixed: its LPIPS features once
    w = w_init.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=cfg.lr)

    def lpips_to_x(y: torch.Tensor) -> torch.Tensor:
        return lpips.distance_to(x_features, y)  # [B]

    for _ in range(cfg.steps):
        loss, _ = hybrid_loss(w, x, roi, generator=G, encoder=E, lpips_to_x=lpips_to_x,
                              lambda1=cfg.lambda1, lambda2=cfg.lambda2, lambda3=cfg.lambda3,
                              ncc_window=cfg.ncc_window)  # [B]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        return w.detach(), w_init, G(w)


def run(ctx: RunContext, cfg: Config) -> dict:
    dist, device = ctx.dist, ctx.device
    upstream(ctx.inputs["gan"], "gan", ctx.model)
    upstream(ctx.inputs["encoder"], "encoder", ctx.model)
    G = load_networks(ctx.inputs["gan"], {"G": lambda: Generator(ctx.model.generator)},
                      device=device)["G"]
    E = load_networks(ctx.inputs["encoder"], {"E": lambda: Encoder(ctx.model.encoder)},
                      device=device)["E"]
    lpips = ctx.lpips()
    data = ctx.slices()
    n = len(data)
    L, C = G.num_ws, G.w_dim
    seed_all(cfg.seed)

    # Chunks of `batch` slices; round r gives chunk r * world + rank to each rank. The
    # last round is padded by repeating the last slice (trimmed afterwards).
    n_chunks = math.ceil(n / cfg.batch)
    n_rounds = math.ceil(n_chunks / dist.world_size)
    bank = {"w": torch.zeros(n, L, C), "psnr": torch.zeros(n), "ssim": torch.zeros(n),
            "psnr_init": torch.zeros(n), "ssim_init": torch.zeros(n)}
    first_round = 0
    if ctx.resume:
        first_round, t, _ = load_checkpoint(latest_checkpoint(ctx.run_dir), modules={})
        bank = {k: t[f"bank.{k}"] for k in bank}
        log.info("latents: resumed after %d of %d rounds", first_round, n_rounds)
    if ctx.is_main and not ctx.resume:
        data.save(ctx.run_dir / SLICES_FILE)

    for r in range(first_round, n_rounds):
        chunk = r * dist.world_size + dist.rank
        idx = torch.arange(chunk * cfg.batch, (chunk + 1) * cfg.batch).clamp_max(n - 1)
        x = data.images[idx].to(device)
        roi = data.roi[idx].to(device)
        w, w_init, y = invert(G, E, lpips, x, roi, cfg)
        with torch.no_grad():
            y_init = G(w_init)
            part = torch.cat([w.flatten(1), psnr(x, y)[:, None], ssim(x, y)[:, None],
                              psnr(x, y_init)[:, None], ssim(x, y_init)[:, None]], dim=1)
        gathered = all_gather_cat(part.contiguous(), dist).cpu()  # [world * batch, L*C + 4]
        gidx = torch.cat([torch.arange((r * dist.world_size + k) * cfg.batch,
                                       (r * dist.world_size + k + 1) * cfg.batch)
                          for k in range(dist.world_size)])
        keep = gidx < n
        gidx, gathered = gidx[keep], gathered[keep]
        bank["w"][gidx] = gathered[:, :L * C].reshape(-1, L, C)
        for j, key in enumerate(("psnr", "ssim", "psnr_init", "ssim_init")):
            bank[key][gidx] = gathered[:, L * C + j]
        done = r + 1
        if ctx.is_main and (done % cfg.checkpoint_every == 0 or done == n_rounds):
            save_checkpoint(ctx.run_dir, done, modules={},
                            extra_tensors={f"bank.{k}": v for k, v in bank.items()})
            ctx.log(done, slices_done=min(done * dist.world_size * cfg.batch, n),
                    psnr=float(bank["psnr"][:min(done * dist.world_size * cfg.batch, n)].mean()))
        ctx.tick(done, n_rounds)

    summary = {"n_slices": n, "steps": cfg.steps,
               "psnr_init_mean": float(bank["psnr_init"].mean()),
               "psnr_mean": float(bank["psnr"].mean()),
               "ssim_init_mean": float(bank["ssim_init"].mean()),
               "ssim_mean": float(bank["ssim"].mean())}
    if ctx.is_main:
        save_safetensors_atomic(bank, ctx.run_dir / BANK_FILE,
                                metadata={"format": "deeprecon-latent-bank",
                                          "slices": data.fingerprint, "steps": str(cfg.steps)})
        log.info("latents: %d slices, PSNR %.2f dB (encoder alone %.2f dB), SSIM %.3f (%.3f)",
                 n, summary["psnr_mean"], summary["psnr_init_mean"], summary["ssim_mean"],
                 summary["ssim_init_mean"])
    barrier(dist)
    return summary


def load_bank(run_dir: Path) -> tuple[SliceSet, dict[str, torch.Tensor]]:
    """The slices and the latent bank of a finished latents run, checked to belong
    together."""
    from safetensors import safe_open

    from ..checkpoint import CheckpointError

    run_dir = Path(run_dir)
    bank_path = run_dir / BANK_FILE
    if not bank_path.is_file():
        raise CheckpointError(f"{run_dir} has no {BANK_FILE}: the latents run has not finished")
    slices = SliceSet.load(run_dir / SLICES_FILE)
    with safe_open(str(bank_path), framework="pt") as f:
        meta = f.metadata() or {}
        bank = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("slices") != slices.fingerprint:
        raise CheckpointError(f"{bank_path} was not computed from {run_dir / SLICES_FILE}")
    return slices, bank
