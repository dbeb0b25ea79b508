"""``deeprecon-rt train STAGE``: the training stages from the command line.

This module is a plug-in of the ``deeprecon-rt`` command (entry point group
``deeprecon_rt.commands``), so that the runtime's CLI never imports the trainer.
Importing it imports no torch; the command checks for torch and the LPIPS weights
and names what is missing.

Examples (the stages in order; each --out is a new run folder)::

    deeprecon-rt train gan        --data ACDC --config small128 --out runs/gan
    deeprecon-rt train encoder    --data ACDC --config small128 --out runs/enc --gan runs/gan
    deeprecon-rt train latents    --data ACDC --config small128 --out runs/lat --gan runs/gan --encoder runs/enc
    deeprecon-rt train seg        --config small128 --out runs/seg --latents runs/lat
    deeprecon-rt train seg-direct --data ACDC --config small128 --out runs/direct
    deeprecon-rt train wseg       --config small128 --out runs/wseg --latents runs/lat

Under torchrun (``torchrun --standalone --nproc_per_node N -m deeprecon.trainer.cli gan ...``) every
rank runs the same command; rank 0 writes the run folder.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from deeprecon.runtime.errors import UnavailableError, UsageError

log = logging.getLogger("deeprecon.trainer")

STAGE_HELP = {
    "gan": "1. StyleGAN2 G and D with adaptive augmentation (needs --data).",
    "encoder": "2. The encoder E: image -> w+, G frozen (needs --data, --gan).",
    "latents": "3. The latent bank: hybrid inversion of every slice (needs --data, --gan, --encoder).",
    "seg": "4. The U-Net on G(w*) of the bank with the real labels (needs --latents).",
    "seg-direct": "The same U-Net on real images, the DirectSeg baseline (needs --data).",
    "wseg": "W+SegNet: w* of the bank -> mask (needs --latents).",
}
STAGE_NAMES = tuple(STAGE_HELP)
INPUT_OPTIONS = {"gan": "--gan", "encoder": "--encoder", "latents": "--latents"}
#: stages that take --warm-start: gan (a compact state), seg and seg-direct (a U-Net's
#: model file)
WARM_START_STAGES = ("gan", "seg", "seg-direct")

app = typer.Typer(help="Train the networks: gan, encoder, latents, seg, seg-direct, wseg "
                       "(needs torch and stlpips-pytorch: the project's train extra).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _require_training_deps(lpips_weights: Optional[Path]) -> None:
    missing = [name for mod, name in (("torch", "torch"), ("stlpips_pytorch", "stlpips-pytorch"))
               if importlib.util.find_spec(mod) is None]
    if lpips_weights is not None and "stlpips-pytorch" in missing:
        missing.remove("stlpips-pytorch")  # the weight file was given
    if missing:
        raise UnavailableError(f"training needs {' and '.join(missing)}, which "
                               f"{'is' if len(missing) == 1 else 'are'} not installed",
                               hint="pip install torch first, then "
                                    "pip install --no-build-isolation 'deeprecon-rt[train]'")


def _parse_sets(sets: list[str]) -> dict[str, str]:
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


class _Progress:
    """A rich progress bar on a terminal; a log line every 10 % otherwise."""

    def __init__(self, stage: str):
        self.stage, self.bar, self.task, self.next_pct = stage, None, None, 10
        self.t0 = time.perf_counter()
        if sys.stderr.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.bar = Progress("[progress.description]{task.description}", BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                transient=False)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(f"train {self.stage}", total=total)
            self.bar.update(self.task, completed=done, total=total)
        elif total and 100 * done / total >= self.next_pct:
            log.info("train %s: %d/%d (%.0f s)", self.stage, done, total,
                     time.perf_counter() - self.t0)
            while self.next_pct <= 100 * done / total:
                self.next_pct += 10


def train(stage: str, *, data: Optional[Path], preset: str, out: Path, resume: bool = False,
          device: str = "cpu", steps: Optional[int] = None, batch: Optional[int] = None,
          sets: Optional[dict[str, str]] = None, inputs: Optional[dict[str, Path]] = None,
          split: str = "train", max_patients: Optional[int] = None,
          lpips_weights: Optional[Path] = None, warm_start: Optional[Path] = None,
          threads: Optional[int] = None, progress=None) -> dict:
    """Run one training stage (the Python API behind the command). Returns the stage's
    summary (also written to OUT/summary.json)."""
    _require_training_deps(lpips_weights)
    from deeprecon.runtime.publish import write_json_atomic

    from .checkpoint import check_new_run_dir
    from .config import get_preset
    from .distributed import barrier, init_distributed, shutdown
    from .run import RunContext, config_with_overrides
    from .stages import STAGES, stage_module

    if stage not in STAGES:
        raise UsageError(f"unknown stage {stage!r}", hint=f"stages: {', '.join(STAGES)}")
    model = get_preset(preset)
    mod = stage_module(stage)
    overrides = dict(sets or {})
    if steps is not None:
        overrides["steps"] = steps
    if batch is not None:
        overrides["batch"] = batch
    cfg = config_with_overrides(mod.Config, preset, overrides)
    needs = getattr(mod, "NEEDS_BY_STAGE", {}).get(stage, mod.NEEDS)
    inputs = {k: Path(v) for k, v in (inputs or {}).items() if v is not None}
    for need in needs:
        if need not in inputs:
            raise UsageError(f"train {stage} needs {INPUT_OPTIONS[need]} RUN_DIR (a finished "
                             f"{need} run)")
        if not inputs[need].is_dir():
            raise UsageError(f"{INPUT_OPTIONS[need]} {inputs[need]}: no such run folder")
    inputs = {k: v for k, v in inputs.items() if k in needs}
    data = Path(data) if data is not None else None
    reads_data = stage not in ("seg", "wseg")
    if reads_data and data is None:
        raise UsageError(f"train {stage} needs --data DIR (an ACDC folder or phantom folders)")
    if data is not None and not data.exists():
        from deeprecon.runtime.errors import NoInputError
        raise NoInputError(f"--data {data}: no such file or folder")
    if warm_start is not None:
        if stage not in WARM_START_STAGES:
            raise UsageError(f"--warm-start is for the {', '.join(WARM_START_STAGES)} stages",
                             hint="the other stages are short enough to retrain, or resume "
                                  "with --resume")
        if resume:
            raise UsageError("--warm-start starts a new run folder; it does not go with --resume")
        if not Path(warm_start).is_file():
            from deeprecon.runtime.errors import NoInputError
            raise NoInputError(f"--warm-start {warm_start}: no such file")
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    out = Path(out)
    check_new_run_dir(out, resume=resume)

    dist = init_distributed(device)
    if not dist.is_main:  # one voice: rank 0 logs, the others only warn
        logging.getLogger("deeprecon").setLevel(logging.WARNING)
    try:
        barrier(dist)  # every rank has checked the folder before rank 0 writes to it
        data_options = {"split": split}
        if max_patients is not None:
            data_options["max_patients"] = max_patients
        ctx = RunContext(run_dir=out, stage=stage, model=model,
                         data_dir=data.resolve() if data is not None else None, dist=dist,
                         inputs={k: v.resolve() for k, v in inputs.items()}, resume=resume,
                         data_options=data_options if reads_data else {}, progress=progress,
                         lpips_weights=lpips_weights,
                         warm_start=Path(warm_start).resolve() if warm_start is not None else None)
        ctx.start(cfg)
        t0 = time.perf_counter()
        try:
            summary = mod.run(ctx, cfg)
        finally:
            ctx.close()
        summary = {"stage": stage, "preset": preset, "seconds": round(time.perf_counter() - t0, 2),
                   "world_size": dist.world_size, "device": str(dist.device),
                   "data_sha256": ctx.data_sha256, **summary}
        if dist.is_main:
            write_json_atomic(out / "summary.json", summary)
        return summary
    finally:
        shutdown(dist)


def _command(stage: str):
    def command(
        data: Optional[Path] = typer.Option(None, "--data", help="ACDC folder (root, training/ or one patient) or phantom folder(s)."),
        config: str = typer.Option("cpu64", "--config", help="Preset: cpu64 (the reference model, sized for CPUs), cpu64w (cpu64 with a wider generator), tiny, small128, base128."),
        out: Path = typer.Option(..., "--out", "-o", help="Run folder (new, or existing with --resume)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the run's latest checkpoint."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N (torchrun: each rank takes cuda:LOCAL_RANK)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (latents: Adam steps per slice)."),
        batch: Optional[int] = typer.Option(None, "--batch", help="Images per step over all ranks."),
        gan: Optional[Path] = typer.Option(None, "--gan", help="Finished gan run (encoder, latents)."),
        encoder: Optional[Path] = typer.Option(None, "--encoder", help="Finished encoder run (latents)."),
        latents: Optional[Path] = typer.Option(None, "--latents", help="Finished latents run (seg, wseg)."),
        split: str = typer.Option("train", "--split", help="ACDC patients: train, val or all (the split in the package)."),
        max_patients: Optional[int] = typer.Option(None, "--max-patients", help="Use only the first N patients of the split."),
        set_: List[str] = typer.Option([], "--set", help="Override a stage setting, KEY=VALUE (repeatable)."),
        lpips_weights: Optional[Path] = typer.Option(None, "--lpips-weights", help="alex_shift_tolerant.pth to use instead of the installed stlpips-pytorch wheel's (SHA-256 checked)."),
        warm_start: Optional[Path] = typer.Option(None, "--warm-start", help="gan: continue from a compact state (a run's compact.safetensors, float16 weights, e.g. committed from another machine) in a new run folder. seg, seg-direct: start the U-Net from a finished seg or seg-direct run's model.safetensors."),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's). On a shared 2-core machine 1 thread per training process is fastest."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    ):
        with _Progress(stage) as progress:
            summary = train(stage, data=data, preset=config, out=out, resume=resume,
                            device=device, steps=steps, batch=batch, sets=_parse_sets(set_),
                            inputs={"gan": gan, "encoder": encoder, "latents": latents},
                            split=split, max_patients=max_patients,
                            lpips_weights=lpips_weights, warm_start=warm_start,
                            threads=threads, progress=progress)
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
        else:
            log.info("train %s finished in %.1f s: %s", stage, summary["seconds"], out)

    command.__doc__ = STAGE_HELP[stage]
    return command


for _stage in STAGE_NAMES:
    app.command(_stage)(_command(_stage))


def main() -> None:
    """``python -m deeprecon.trainer.cli STAGE ...`` (e.g. under torchrun): the
    ``deeprecon-rt train`` command with the CLI's error handling and exit codes."""
    from deeprecon.runtime.cli import main as cli_main

    cli_main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    main()
