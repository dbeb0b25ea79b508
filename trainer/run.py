"""What every training stage shares: the run folder, its run.json, the log, progress,
and reading the networks of an upstream run.

A stage is a module in ``deeprecon.trainer.stages`` with a frozen ``Config`` dataclass
(``Config.for_preset(name)`` gives the defaults) and ``run(ctx, cfg) -> dict``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from deeprecon.runtime.errors import UsageError
from deeprecon.runtime.publish import write_json_atomic

from .checkpoint import MODEL_FILE, CheckpointError, load_model
from .config import ModelConfig, from_dict, to_dict
from .distributed import DistInfo

log = logging.getLogger("deeprecon.trainer")

RUN_FILE = "run.json"
# What a finished upstream run must have written, by stage (default: MODEL_FILE).
RESULT_FILES = {"latents": "latents.safetensors"}
# Settings that may differ when a run is resumed (everything else must match).
RESUMABLE_CHANGES = ("steps",)


def versions() -> dict[str, str]:
    from deeprecon.runtime import __version__

    return {"deeprecon-rt": __version__, "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": str(torch.version.cuda) if torch.version.cuda else "none"}


@dataclass
class RunContext:
    """One stage's run.

    run_dir:  the run folder (written by rank 0 only).
    stage:    the stage name (``gan``, ``encoder``, ...).
    model:    the preset.
    data_dir: the data folder (ACDC root or phantom folders), or None for stages that
              read their upstream run's data.
    inputs:   upstream runs by stage name (``{"gan": Path, ...}``).
    dist:     rank, world size, device.
    resume:   continue from the run's latest checkpoint.
    data_options: selection of the data (split, max_patients, ...), recorded in run.json.
    progress: callable(step, total) for the CLI's progress bar (rank 0), or None.
    lpips_weights: the shift-tolerant AlexNet LPIPS weight file, or None for the one in the
              installed stlpips-pytorch wheel (a machine without the wheel can carry the
              10 MB file alone; its SHA-256 is checked either way).
    data_sha256: set by :meth:`slices`: the fingerprint of the run's training slices
              (sha256 over the preprocessed images, labels, ROI and ids), written
              into summary.json as the identity of the data the run saw.
    warm_start: where a fresh run folder's networks start (recorded in run.json): for gan
              a compact state (``compact.safetensors`` of a run, float16 weights), for
              seg and seg-direct a finished U-Net run's model file.
    """

    run_dir: Path
    stage: str
    model: ModelConfig
    data_dir: Path | None
    dist: DistInfo
    inputs: dict[str, Path] = field(default_factory=dict)
    resume: bool = False
    data_options: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[int, int], None] | None = None
    lpips_weights: Path | None = None
    warm_start: Path | None = None
    data_sha256: str | None = None
    _log_file: Any = None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def start(self, cfg: Any) -> None:
        """Create the run folder and write run.json, or, on resume, check that run.json
        describes the same run (only RESUMABLE_CHANGES may differ)."""
        record = {"stage": self.stage, "model": self.model.to_dict(), "config": to_dict(cfg),
                  "data": str(self.data_dir) if self.data_dir else None,
                  "data_options": self.data_options,
                  "inputs": {k: str(v) for k, v in self.inputs.items()},
                  "world_size": self.dist.world_size, "device": str(self.device),
                  "versions": versions()}
        if self.warm_start is not None:
            record["warm_start"] = str(self.warm_start)
        path = self.run_dir / RUN_FILE
        if self.resume:
            old = read_run(self.run_dir)
            for key in ("stage", "model"):
                if old[key] != record[key]:
                    raise UsageError(f"--resume: {self.run_dir} was a {key} "
                                     f"{old[key] if key == 'stage' else old[key]['name']!r} run; "
                                     f"this command asks for {record[key] if key == 'stage' else record[key]['name']!r}")
            # A setting added after the run started counts as unchanged when it has its
            # default value (the older code behaved as the default does).
            defaults = {f.name: to_dict(f.default) for f in dataclasses.fields(cfg)
                        if f.default is not dataclasses.MISSING}
            was = {**{k: v for k, v in defaults.items() if k not in old["config"]}, **old["config"]}
            changed = sorted(k for k in set(was) | set(record["config"])
                             if was.get(k) != record["config"].get(k)
                             and k not in RESUMABLE_CHANGES)
            if changed:
                raise UsageError(f"--resume: the stage settings {changed} differ from the run's "
                                 f"run.json", hint=f"only {list(RESUMABLE_CHANGES)} may change")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if self.resume:
                record["resumed_from"] = read_run(self.run_dir).get("started")
            write_json_atomic(path, record)
            self._log_file = open(self.run_dir / "log.jsonl", "a")

    def log(self, step: int, **values: Any) -> None:
        """One line of log.jsonl (rank 0) and a DEBUG log record."""
        if not self.is_main:
            return
        clean = {k: (float(v) if torch.is_tensor(v) else v) for k, v in values.items()}
        line = {"step": step, "time": round(time.time(), 3), **clean}
        self._log_file.write(json.dumps(line) + "\n")
        self._log_file.flush()
        log.debug("step %d %s", step, clean)

    def slices(self, **overrides):
        """The run's training slices (:func:`.data.build_slices` with the run's data
        options and ``overrides``), cached in the run folder; the upstream runs' caches
        are looked in first, so a chain of stages prepares the same data once."""
        from .data import build_slices

        data = build_slices(self.data_dir, self.model.preprocess,
                            **{**self.data_options, **overrides},
                            cache_dir=self.run_dir / "cache" if self.is_main else None,
                            read_caches=[Path(d) / "cache" for d in self.inputs.values()])
        self.data_sha256 = data.fingerprint
        return data

    def lpips(self, layers: int | None = None):
        """The frozen LPIPS network on this run's device, over the preset's
        ``lpips_layers`` (or ``layers``, e.g. 5 for the features of the Frechet distance)."""
        from .lpips import load_lpips

        return load_lpips(device=self.device, weights_path=self.lpips_weights,
                          layers=self.model.lpips_layers if layers is None else layers)

    def tick(self, step: int, total: int) -> None:
        if self.progress is not None and self.is_main:
            self.progress(step, total)

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def read_run(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a training run (no {RUN_FILE})")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


def upstream(run_dir: Path, stage: str, model: ModelConfig) -> dict[str, Any]:
    """run.json of an upstream run, checked to be a ``stage`` run of the same preset that
    has written its result (the model file; the bank for ``latents``)."""
    info = read_run(run_dir)
    if info["stage"] != stage:
        raise UsageError(f"{run_dir} is a {info['stage']!r} run, a {stage!r} run is needed")
    if info["model"] != model.to_dict():
        raise UsageError(f"{run_dir} was trained with preset {info['model']['name']!r}, "
                         f"this run uses {model.name!r}")
    result = RESULT_FILES.get(stage, MODEL_FILE)
    if not (Path(run_dir) / result).is_file():
        raise UsageError(f"{run_dir} has no {result} yet",
                         hint=f"let the {stage} run reach its first checkpoint (latents: finish)")
    return info


def load_networks(run_dir: Path, names: Mapping[str, Callable[[], torch.nn.Module]], *,
                  device: torch.device) -> dict[str, torch.nn.Module]:
    """Build the networks ``names`` (name -> constructor) and load them from the run's
    model file; frozen, eval mode, float32, on ``device``."""
    nets = {n: build() for n, build in names.items()}
    load_model(Path(run_dir) / MODEL_FILE, nets)
    for net in nets.values():
        net.requires_grad_(False).eval().to(device)
    return nets


def config_with_overrides(cls, preset: str, overrides: Mapping[str, Any]):
    """A stage config: the preset's defaults with ``overrides`` (from ``--set k=v``)
    parsed to the fields' types."""
    base = cls.for_preset(preset)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise UsageError(f"unknown setting {key!r} for this stage",
                             hint=f"known: {', '.join(sorted(fields))}")
        current = getattr(base, key)
        try:
            if isinstance(current, bool):
                if str(raw).lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                values[key] = str(raw).lower() in ("true", "1")
            elif isinstance(current, tuple):
                kind = type(current[0]) if current else float  # empty tuples hold numbers
                values[key] = tuple(kind(v) for v in str(raw).split(","))
            else:
                values[key] = type(current)(raw)
        except ValueError:
            raise UsageError(f"setting {key}={raw!r}: expected a {type(current).__name__}") from None
    return from_dict(cls, {**to_dict(base), **values})


__all__ = ["RunContext", "read_run", "upstream", "load_networks", "config_with_overrides",
           "versions", "RUN_FILE"]
