"""Stage ``gan``: StyleGAN2 G and D on the training slices, with adaptive discriminator
augmentation (ADA), lazy R1, an EMA of G and optional path-length regularisation.

One step: a G pass (non-saturating loss through the augmented fakes), an optional
path-length pass, a D pass (logistic loss on augmented reals and fakes, plus R1 every
``r1_interval`` steps, scaled by the interval as in StyleGAN2's lazy regularisation),
then the EMA update of G and the ADA probability update.

Joint encoder (``joint_encoder``, the ``cpu64`` default): E is trained in the same
loop, and the G pass adds ``rec_weight`` times the encoder's reconstruction objective
(:func:`..losses.reconstruction_loss`: L2 + LPIPS + w-regulariser of G(E(x)) on a real
batch) to the adversarial loss, with gradients into both E and G. A pure StyleGAN2 on
the ~1,200 ACDC training slices needs millions of images; this reconstruction path
makes G represent real slices (what inversion and Seg need) within a CPU budget,
while the adversarial term keeps G(z) and interpolated codes realistic. E's ``w_avg``
follows G's. The run's model file then holds G_ema and E; the ``encoder`` stage
starts from that E.

Projected discriminator (``discriminator="projected"``): D is a
:class:`..networks.projected.ProjectedDiscriminator`, small heads on fixed random
mixtures of the frozen shift-tolerant AlexNet's relu1 .. relu3, after Projected GANs
(Sauer et al. 2021), which need several times fewer images than a D trained from
pixels. Its D pass computes the frozen features without a graph; R1 is not used with
it (set ``r1_gamma=0``; the paper uses none). A warm start from a state trained with
the other discriminator loads G, G_ema, E and the augmentation and starts D afresh.

Quality figure: the Frechet distance between real and generated slices in the feature
space of the shift-tolerant LPIPS AlexNet (relu5, global-average pooled, 256
features), computed every ``fd_every`` steps; it needs no downloaded network (the
weights come with the ``stlpips-pytorch`` wheel). It is a relative figure for
comparing checkpoints of this project, not an FID.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from deeprecon.runtime.errors import UsageError

from ..augment import AdaController, AugmentPipe
from ..checkpoint import (COMPACT_FILE, MODEL_FILE, compact_extra, latest_checkpoint,
                          load_checkpoint, load_compact, save_checkpoint, save_compact, save_model)
from ..config import CPU_PRESETS
from ..data import BatchSampler
from ..distributed import (all_reduce_grads, all_reduce_sum, barrier, broadcast_module,
                           decorrelate_rng, gather_rng_states, restore_rng_states)
from ..losses import (d_logistic, frechet_distance, g_nonsaturating, path_length, psnr,
                      r1_penalty, reconstruction_loss)
from ..networks import Discriminator, Encoder, Generator
from ..networks.projected import ProjectedDiscriminator
from ..run import RunContext
from .common import fd_features_alex, save_grid, seed_all

log = logging.getLogger("deeprecon.trainer.gan")

NEEDS: tuple[str, ...] = ()
DISCRIMINATORS = ("stylegan2", "projected")


@dataclass(frozen=True)
class Config:
    """steps: G/D steps; batch: images per step over all ranks. Learning rates and Adam
    betas as StyleGAN2 (0.0025, (0, 0.99)); r1_gamma as StyleGAN2-ADA's heuristic
    0.0002 * R^2 / batch; ema_kimg: half-life of the EMA of G in thousands of images;
    ada_*: ADA's target for E[sign(D(real))], update interval (steps) and speed;
    mixed_precision: bfloat16 autocast for the forward passes on CUDA;
    mixed_precision_cpu: the same on the CPU (1.3-1.5x faster per joint step on an
    AVX512-BF16 CPU, measured; off by default; on a CPU without native bfloat16, e.g.
    AVX2 only, it is many times slower, and the run warns);
    discriminator: "stylegan2" (the residual D from pixels) or "projected" (see the
    module docstring; the paper's head learning rate is lr_d=0.0002);
    joint_encoder: train E with G (see the module docstring), with Adam (lr_e, betas_e)
    and the reconstruction weights rec_l2, rec_lpips, rec_reg (the encoder stage's), on
    the first rec_batch slices of each rank's real batch (0: all of it)."""

    steps: int = 20000
    batch: int = 32
    lr_g: float = 0.0025
    lr_d: float = 0.0025
    betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float = 0.1
    r1_interval: int = 16
    pl_weight: float = 0.0
    pl_interval: int = 4
    ema_kimg: float = 10.0
    ema_rampup: float = 0.05
    augment: bool = True
    ada_target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 100.0
    mixed_precision: bool = True
    mixed_precision_cpu: bool = False
    sample_every: int = 500
    fd_every: int = 2000
    fd_samples: int = 1000
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    joint_encoder: bool = False
    rec_weight: float = 1.0
    lr_e: float = 0.0005
    betas_e: tuple[float, float] = (0.9, 0.99)
    rec_l2: float = 1.0
    rec_lpips: float = 0.8
    rec_reg: float = 0.01
    rec_batch: int = 0
    discriminator: str = "stylegan2"

    def __post_init__(self):
        if self.discriminator not in DISCRIMINATORS:
            raise UsageError(f"gan: unknown discriminator {self.discriminator!r}",
                             hint=f"known: {', '.join(DISCRIMINATORS)}")

    @classmethod
    def for_preset(cls, preset: str) -> "Config":
        if preset == "tiny":
            return cls(steps=4, batch=4, r1_interval=2, pl_weight=2.0, pl_interval=2,
                       ema_kimg=0.01, ada_interval=1, ada_kimg=0.1, sample_every=2,
                       fd_every=4, fd_samples=16, checkpoint_every=2, log_every=1)
        if preset in CPU_PRESETS:
            # r1_gamma: StyleGAN2-ADA's 0.0002 R^2 / batch for 64 px at batch 32.
            return cls(steps=10000, batch=32, r1_gamma=0.0256, joint_encoder=True, rec_batch=16,
                       sample_every=500, fd_every=2000, fd_samples=1000,
                       checkpoint_every=250, log_every=25)
        return cls()


def _warn_slow_bfloat16(ctx: RunContext, cfg: Config) -> None:
    """bfloat16 autocast on a CPU without native bfloat16 (AVX2 only) runs the
    convolutions on a slow reference path: say so once, at the start."""
    if (cfg.mixed_precision_cpu and ctx.device.type == "cpu"
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        log.warning("gan: mixed_precision_cpu=true on a CPU without native bfloat16 "
                    "(torch CPU capability %s): convolutions take a slow reference path, "
                    "many times slower than float32; set mixed_precision_cpu=false",
                    torch.backends.cpu.get_cpu_capability())


def _autocast(ctx: RunContext, cfg: Config):
    if cfg.mixed_precision and ctx.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cfg.mixed_precision_cpu and ctx.device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def _ema_update(G_ema: Generator, G: Generator, beta: float) -> None:
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.copy_(p.lerp(p_ema, beta))
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


@torch.no_grad()
def frechet_distance_of(G: Generator, reals: torch.Tensor, feature_fn, *, n: int, seed: int,
                        batch: int, device: torch.device) -> float:
    """Frechet distance between ``n`` real slices (the first n of a fixed permutation)
    and ``n`` samples of G, in the features of ``feature_fn``."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(reals), generator=gen)[:n]
    z = torch.randn(len(idx), G.z_dim, generator=gen)
    fr, ff = [], []
    for i in range(0, len(idx), batch):
        fr.append(feature_fn(reals[idx[i:i + batch]].to(device)).double().cpu())
        ff.append(feature_fn(G.sample(z[i:i + batch].to(device))).double().cpu())
    return frechet_distance(torch.cat(fr).numpy(), torch.cat(ff).numpy())


def run(ctx: RunContext, cfg: Config) -> dict:
    dist, device = ctx.dist, ctx.device
    if cfg.batch % dist.world_size:
        raise UsageError(f"batch {cfg.batch} is not divisible by the {dist.world_size} ranks")
    per_rank = cfg.batch // dist.world_size
    _warn_slow_bfloat16(ctx, cfg)
    data = ctx.slices()
    reals = data.images  # [N, 1, R, R]
    log.info("gan: %d training slices from %s", len(reals), ctx.data_dir)

    seed_all(cfg.seed)
    G = Generator(ctx.model.generator).to(device)
    projected = cfg.discriminator == "projected"
    D = (ProjectedDiscriminator(ctx.lpips(layers=3), seed=cfg.seed) if projected
         else Discriminator(ctx.model.discriminator)).to(device)
    G_ema = Generator(ctx.model.generator).to(device).eval().requires_grad_(False)
    G_ema.load_state_dict(G.state_dict())
    # Lazy regularisation: R1 / path length run every k steps, so Adam's lr and betas
    # are adjusted by k / (k + 1) (StyleGAN2).
    ratio_d = cfg.r1_interval / (cfg.r1_interval + 1)
    ratio_g = cfg.pl_interval / (cfg.pl_interval + 1) if cfg.pl_weight > 0 else 1.0
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g * ratio_g,
                             betas=tuple(b ** ratio_g for b in cfg.betas), eps=1e-8)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d * ratio_d,
                             betas=tuple(b ** ratio_d for b in cfg.betas), eps=1e-8)
    E = opt_e = lpips = None
    if cfg.joint_encoder:
        E = Encoder(ctx.model.encoder).to(device)
        opt_e = torch.optim.Adam(E.parameters(), lr=cfg.lr_e, betas=cfg.betas_e, eps=1e-8)
        lpips = ctx.lpips()
    modules = {"G": G, "D": D, "G_ema": G_ema, **({"E": E} if E is not None else {})}
    optimizers = {"G": opt_g, "D": opt_d, **({"E": opt_e} if E is not None else {})}
    augment = AugmentPipe().to(device)
    ada = AdaController(target=cfg.ada_target, interval=cfg.ada_interval,
                        speed_kimg=cfg.ada_kimg, batch_size=cfg.batch)
    sampler = BatchSampler(len(reals), per_rank, seed=cfg.seed, rank=dist.rank,
                           world_size=dist.world_size)
    pl_mean = torch.zeros((), device=device)
    step, nimg = 0, 0

    broadcast_module(G, dist)
    broadcast_module(D, dist)
    broadcast_module(G_ema, dist)
    if E is not None:
        broadcast_module(E, dist)

    fixed_z = torch.randn(16, G.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    fd_net = fd_features_alex(ctx.lpips(layers=5)) if ctx.is_main else None  # relu5, any preset
    decorrelate_rng(cfg.seed, dist)
    # Resume last: building anything above draws from the RNG that the checkpoint restores.
    if ctx.resume:
        step, t, extra = load_checkpoint(latest_checkpoint(ctx.run_dir),
                                         modules={**modules, "augment": augment},
                                         optimizers=optimizers)
        restore_rng_states(t, dist)
        ada.load_state_dict({k[len("ada."):]: v for k, v in t.items() if k.startswith("ada.")})
        pl_mean = t["pl_mean"].to(device)
        sampler.load_state_dict(extra["sampler"])
        nimg = int(extra["nimg"])
        log.info("gan: resumed at step %d", step)
    elif ctx.warm_start is not None:
        warm_d = compact_extra(ctx.warm_start).get("discriminator", "stylegan2")
        fresh_d = warm_d != cfg.discriminator
        step, t, extra = load_compact(ctx.warm_start, stage="gan",
                                      modules={k: m for k, m in {**modules, "augment": augment}.items()
                                               if not (fresh_d and k == "D")})
        if fresh_d:
            log.info("gan: %s was trained with the %s discriminator: D (%s) starts afresh",
                     ctx.warm_start, warm_d, cfg.discriminator)
        ada.load_state_dict({k[len("ada."):]: v for k, v in t.items() if k.startswith("ada.")})
        pl_mean = t["pl_mean"].to(device)
        sampler.load_state_dict(extra["sampler"])
        nimg = int(extra["nimg"])
        log.info("gan: warm start from %s at step %d (fresh Adam moments)", ctx.warm_start, step)
    if ctx.is_main and not ctx.resume:
        (ctx.run_dir / "samples").mkdir(exist_ok=True)
        save_grid(ctx.run_dir / "samples" / "reals.png", reals[:16])
    fixed_reals = reals[torch.randperm(len(reals), generator=torch.Generator().manual_seed(cfg.seed + 3))[:16]]

    def checkpoint() -> None:
        rngs = gather_rng_states(dist)
        if ctx.is_main:
            save_checkpoint(ctx.run_dir, step, modules={**modules, "augment": augment},
                            optimizers=optimizers,
                            extra_tensors={"pl_mean": pl_mean, **rngs,
                                           **{f"ada.{k}": v for k, v in ada.state_dict().items()}},
                            extra={"nimg": nimg, "sampler": sampler.state_dict(),
                                   "discriminator": cfg.discriminator})
            save_model(ctx.run_dir / MODEL_FILE, {"G": G_ema, **({"E": E} if E is not None else {})},
                       config=ctx.model.to_dict())
            save_compact(ctx.run_dir / COMPACT_FILE, step, stage="gan",
                         modules={**modules, "augment": augment},
                         extra_tensors={"pl_mean": pl_mean,
                                        **{f"ada.{k}": v for k, v in ada.state_dict().items()}},
                         extra={"nimg": nimg, "sampler": sampler.state_dict(),
                                "discriminator": cfg.discriminator},
                         exact=("augment",))
        barrier(dist)

    t0, last_fd, rec = time.perf_counter(), None, {}
    while step < cfg.steps:
        # Joint mode reconstructs the real batch that D sees in this step.
        real = reals[sampler.next_batch()].to(device) if E is not None else None
        # ---- G: non-saturating loss (+ the reconstruction of real slices through E)
        G.requires_grad_(True)
        D.requires_grad_(False)
        z = torch.randn(per_rank, G.z_dim, device=device)
        with _autocast(ctx, cfg):
            ws = G.mapping(z, update_w_avg=True)  # [b, L, C]
            fake = G.synthesis(ws)  # [b, 1, R, R]
            loss_g = g_nonsaturating(D(augment(fake)).float())
        loss_total = loss_g
        if E is not None:
            with torch.no_grad():
                E.w_avg.copy_(G.w_avg)
            x_rec = real[:cfg.rec_batch] if cfg.rec_batch > 0 else real
            with _autocast(ctx, cfg):
                ws_e = E(x_rec)  # [b, L, C]
                y = G.synthesis(ws_e)
                loss_rec, rec = reconstruction_loss(x_rec, y.float(), ws_e.float(), G.w_avg,
                                                    lpips, lambda_l2=cfg.rec_l2,
                                                    lambda_lpips=cfg.rec_lpips,
                                                    lambda_reg=cfg.rec_reg)
            rec["psnr"] = psnr(x_rec, y.detach().float()).mean()
            loss_total = loss_g + cfg.rec_weight * loss_rec
            opt_e.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        loss_total.backward()
        pl_pen = None
        if cfg.pl_weight > 0 and step % cfg.pl_interval == 0:
            ws_pl = G.mapping(torch.randn(max(per_rank // 2, 1), G.z_dim, device=device)).detach()
            ws_pl.requires_grad_(True)
            pl_pen, pl_mean = path_length(
                G.synthesis(ws_pl), ws_pl, pl_mean,
                reduce_mean=lambda m: all_reduce_sum(m.clone(), dist) / dist.world_size)
            (pl_pen * cfg.pl_weight * cfg.pl_interval).backward()
        all_reduce_grads(G.parameters(), dist)
        opt_g.step()
        if E is not None:
            all_reduce_grads(E.parameters(), dist)
            opt_e.step()

        # ---- D: logistic loss, lazy R1
        G.requires_grad_(False)
        D.requires_grad_(True)
        do_r1 = cfg.r1_gamma > 0 and step % cfg.r1_interval == 0
        if real is None:
            real = reals[sampler.next_batch()].to(device)
        with torch.no_grad(), _autocast(ctx, cfg):
            fake = G(G.mapping(torch.randn(per_rank, G.z_dim, device=device)))
        real_in = real.detach().requires_grad_(do_r1)
        with _autocast(ctx, cfg):
            if projected and not do_r1:  # the frozen features need no graph
                with torch.no_grad():
                    mixed_real = D.project(augment(real_in))
                    mixed_fake = D.project(augment(fake.float()))
                real_logits = D.heads(mixed_real).float()
                fake_logits = D.heads(mixed_fake).float()
            else:
                real_logits = D(augment(real_in)).float()
                fake_logits = D(augment(fake.float())).float()
        loss_d = d_logistic(real_logits, fake_logits)
        r1 = None
        if do_r1:
            r1 = r1_penalty(real_in, real_logits)
            loss_d = loss_d + r1 * (cfg.r1_gamma / 2) * cfg.r1_interval
        ada.accumulate(real_logits.detach())
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        all_reduce_grads(D.parameters(), dist)
        opt_d.step()

        # ---- EMA of G and the augmentation probability
        nimg += cfg.batch
        ema_nimg = min(cfg.ema_kimg * 1000, nimg * cfg.ema_rampup) if cfg.ema_rampup else cfg.ema_kimg * 1000
        _ema_update(G_ema, G, 0.5 ** (cfg.batch / max(ema_nimg, 1e-8)))
        if cfg.augment:
            ada.set_stats(all_reduce_sum(ada.stats_tensor(), dist))
            ada.step(augment)
        step += 1

        if ctx.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            dt = time.perf_counter() - t0
            ctx.log(step, loss_g=loss_g.item(), loss_d=loss_d.item(),
                    r1=None if r1 is None else r1.item(),
                    pl=None if pl_pen is None else pl_pen.item(),
                    ada_p=float(augment.p), ada_rt=ada.last_rt, nimg=nimg,
                    **{f"rec_{k}": v.item() for k, v in rec.items()},
                    images_per_s=cfg.batch * cfg.log_every / dt if step % cfg.log_every == 0 else None)
            t0 = time.perf_counter()
        if ctx.is_main and (step % cfg.sample_every == 0 or step == cfg.steps):
            with torch.no_grad():
                save_grid(ctx.run_dir / "samples" / f"fakes-{step:08d}.png",
                          G_ema.sample(fixed_z.to(device)))
                if E is not None:  # the fixed real slices, then G_ema(E(x)) below them
                    x = fixed_reals.to(device)
                    save_grid(ctx.run_dir / "samples" / f"recon-{step:08d}.png",
                              torch.cat([x[:8], G_ema(E(x[:8])), x[8:], G_ema(E(x[8:]))]), ncol=8)
        if ctx.is_main and (step % cfg.fd_every == 0 or step == cfg.steps):
            last_fd = frechet_distance_of(G_ema, reals, fd_net, n=min(cfg.fd_samples, len(reals)),
                                          seed=cfg.seed + 2, batch=64, device=device)
            ctx.log(step, fd_alex=last_fd)
            log.info("gan: step %d, Frechet distance (ST-AlexNet relu5) %.3g", step, last_fd)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
        ctx.tick(step, cfg.steps)

    return {"steps": step, "nimg": nimg, "ada_p": float(augment.p), "fd_alex": last_fd,
            "n_slices": len(reals)}
