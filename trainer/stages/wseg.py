"""Stage ``wseg``: W+SegNet, the paper's network from w+ to the mask, trained on the
latent bank's codes w* (``--latents RUN``) and the real slices' labels with CE + Dice
(the loop of :func:`.seg.train_supervised`, without image augmentation: a code has no
orientation to flip)."""
from __future__ import annotations

from dataclasses import dataclass

from deeprecon.runtime.errors import InvalidStudyError

from ..config import CPU_PRESETS
from ..networks import WSegNet
from ..run import RunContext, upstream
from .common import check_class_weights, seed_all
from .latents import load_bank
from .seg import train_supervised

NEEDS = ("latents",)


@dataclass(frozen=True)
class Config:
    steps: int = 20000
    batch: int = 16
    lr: float = 1e-3
    lr_min: float = 1e-3
    class_weights: tuple[float, ...] = ()  # per-class cross-entropy weights, as seg's
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
            return cls(steps=6000, batch=32, lr=2e-3, lr_min=5e-5, checkpoint_every=500)
        return cls()


def run(ctx: RunContext, cfg: Config) -> dict:
    upstream(ctx.inputs["latents"], "latents", ctx.model)
    slices, bank = load_bank(ctx.inputs["latents"])
    if slices.labels is None:
        raise InvalidStudyError("the latent bank's slices have no labels",
                                hint="run the latents stage on labelled data")
    seed_all(cfg.seed)
    net = WSegNet(ctx.model.wseg).to(ctx.device)
    return train_supervised(ctx, cfg, net, "WSeg", bank["w"], slices.labels,
                            spatial_inputs=False)
