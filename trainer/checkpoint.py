"""Training checkpoints: safetensors for every tensor, JSON for everything else.

A run folder holds::

    run.json                   stage, preset (model config), stage config, data, inputs
    checkpoints/ckpt-00000200/ state.safetensors + state.json (resumable, exact)
    checkpoints/latest.json    {"name": "ckpt-00000200", "step": 200}
    model.safetensors          the trained inference networks, float16 (compact)
    log.jsonl, samples/, ...

``state.safetensors`` stores, under prefixed names, every module's state dict
(``module.G.<key>``), every optimizer's tensor state (``optim.G.<index>.<key>``), the
RNG states (``rng.cpu``, ``rng.cuda.<i>``) and the stage's own tensors
(``extra.<key>``), all in their training dtype, so a reload is bit-exact and a resumed
run continues exactly as an uninterrupted one would. ``state.json`` holds the step,
the optimizers' hyper-parameters and any non-tensor state. Nothing is pickled:
loading never executes code from the file.

``model.safetensors`` keeps only what inference and the bundle exporter need, in
float16 (buffers that must stay exact, such as ``w_avg``, stay float32): the part a
person carries to a GPU machine and back or commits. It is not used for resuming:
float16 weights and moments would change the continued trajectory.

A checkpoint is written into a new folder and then named by rewriting ``latest.json``
with an atomic rename; a run killed while writing leaves the previous checkpoint in
force.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from deeprecon.runtime.errors import InvalidStudyError, UsageError
from deeprecon.runtime.publish import (canonical_safetensors, staged_folder, write_file_atomic,
                                      write_json_atomic)

FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
LATEST = "latest.json"
MODEL_FILE = "model.safetensors"


class CheckpointError(InvalidStudyError):
    """A checkpoint or weight file that is missing, corrupt or does not fit the run."""


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path, *,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """One safetensors file, published atomically (:func:`deeprecon.runtime.publish.
    write_file_atomic`): a reader never sees half a file. The same tensors and metadata
    give the same bytes (:func:`~deeprecon.runtime.publish.canonical_safetensors`)."""
    cpu = {k: _contiguous_cpu(v) for k, v in tensors.items()}
    meta = dict(metadata) if metadata else None
    raw = canonical_safetensors(save(cpu, metadata=meta))
    return write_file_atomic(path, lambda tmp: tmp.write_bytes(raw))


def _contiguous_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _optimizer_to_flat(name: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{idx}.{key}"] = _contiguous_cpu(value)
            else:
                plain.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def _optimizer_from_flat(name: str, opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                         meta: Mapping[str, Any]) -> None:
    state: dict[int, dict] = {}
    prefix = f"optim.{name}."
    for full, value in tensors.items():
        if full.startswith(prefix):
            idx, key = full[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for idx, plain in meta.get("state", {}).items():
        state.setdefault(int(idx), {}).update(plain)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng_state(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def save_checkpoint(run_dir: str | Path, step: int, *, modules: Mapping[str, torch.nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
                    extra_tensors: Mapping[str, torch.Tensor] | None = None,
                    extra: Mapping[str, Any] | None = None, keep: int = 2) -> Path:
    """Write a resumable checkpoint of ``step`` and make it the latest.

    modules:       name -> module (parameters and buffers, in their dtype).
    optimizers:    name -> optimizer.
    extra_tensors: stage state as tensors (augmentation probability, sampler, ...).
    extra:         stage state as JSON data.
    keep:          how many checkpoints to keep (the oldest are removed).
    Returns the checkpoint folder.
    """
    ckpt_root = Path(run_dir) / CKPT_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:08d}"
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "step": int(step),
                            "modules": sorted(modules), "optimizers": {},
                            "extra": dict(extra or {}), "torch": torch.__version__}
    for mname, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{mname}.{key}"] = _contiguous_cpu(value)
    for oname, opt in (optimizers or {}).items():
        t, m = _optimizer_to_flat(oname, opt)
        tensors.update(t)
        meta["optimizers"][oname] = m
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra.{key}"] = _contiguous_cpu(value)
    tensors.update({k: _contiguous_cpu(v) for k, v in rng_state().items()})
    final = ckpt_root / name
    with staged_folder(final) as tmp:   # published whole, replacing one of the same step
        save_file(tensors, str(tmp / "state.safetensors"),
                  metadata={"format": "deeprecon-checkpoint", "step": str(step)})
        write_json_atomic(tmp / "state.json", meta)
    write_json_atomic(ckpt_root / LATEST, {"name": name, "step": int(step)})
    done = sorted(p for p in ckpt_root.glob("ckpt-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The latest complete checkpoint folder of a run, or None if it has none."""
    pointer = Path(run_dir) / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["name"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{pointer} is unreadable ({e})") from None
    folder = pointer.parent / name
    if not (folder / "state.safetensors").is_file() or not (folder / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {name}, which is missing or incomplete")
    return folder


def read_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON of a checkpoint folder (no module is touched)."""
    folder = Path(folder)
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {folder} has format {meta.get('format_version')}, "
                              f"this version reads {FORMAT_VERSION}")
    return tensors, meta


def load_checkpoint(folder: str | Path, *, modules: Mapping[str, torch.nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
                    restore_rng: bool = True) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Restore modules, optimizers and RNG from a checkpoint folder.

    Returns (step, extra tensors without their ``extra.`` prefix, extra JSON).
    Raises CheckpointError when a module's tensors do not match (missing, unexpected or
    differently shaped keys).
    """
    tensors, meta = read_state(folder)
    for mname, module in modules.items():
        prefix = f"module.{mname}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"checkpoint {folder} has no module {mname!r} "
                                  f"(it has {meta.get('modules')})")
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {folder}: module {mname!r} does not fit: "
                                  f"{str(e).splitlines()[0]}") from None
    for oname, opt in (optimizers or {}).items():
        if oname not in meta["optimizers"]:
            raise CheckpointError(f"checkpoint {folder} has no optimizer {oname!r}")
        _optimizer_from_flat(oname, opt, tensors, meta["optimizers"][oname])
    if restore_rng:
        set_rng_state(tensors)
    extra_t = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return int(meta["step"]), extra_t, meta.get("extra", {})


# ----------------------------------------------------------------------------- compact weights

EXACT_BUFFERS = ("w_avg",)  # kept float32 in the compact file
COMPACT_FILE = "compact.safetensors"


def save_compact(path: str | Path, step: int, *, stage: str, modules: Mapping[str, torch.nn.Module],
                 extra_tensors: Mapping[str, torch.Tensor] | None = None,
                 extra: Mapping[str, Any] | None = None, exact: tuple[str, ...] = ()) -> Path:
    """A small state to continue training elsewhere (``train STAGE --warm-start FILE``):
    every module's tensors in float16 (``w_avg``, integer tensors and the modules named
    in ``exact``, e.g. the augmentation state, keep their dtype), the stage's extra
    tensors exact, its JSON state and the step. No optimizer moments and no RNG: a warm
    start continues the run, it does not reproduce it bit for bit."""
    tensors = {}
    for mname, module in modules.items():
        for key, value in module.state_dict().items():
            t = _contiguous_cpu(value)
            if (t.is_floating_point() and mname not in exact
                    and key.rsplit(".", 1)[-1] not in EXACT_BUFFERS):
                t = t.to(torch.float16)
            tensors[f"module.{mname}.{key}"] = t
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra.{key}"] = _contiguous_cpu(value)
    return save_safetensors_atomic(tensors, path, metadata={
        "format": "deeprecon-compact", "stage": stage, "step": str(int(step)),
        "modules": ",".join(sorted(modules)), "extra": json.dumps(dict(extra or {}))})


def load_compact(path: str | Path, *, stage: str, modules: Mapping[str, torch.nn.Module]
                 ) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Load a :func:`save_compact` file into ``modules`` (cast to their dtype). Returns
    (step, extra tensors, extra JSON). CheckpointError for another stage's file, a
    missing module or a shape that does not fit."""
    path = Path(path)
    meta, tensors = _read_file(path, "warm-start file")
    try:
        extra = json.loads(meta.get("extra", "{}"))
        step = int(meta["step"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"warm-start file {path} is unreadable: {e}") from None
    if meta.get("format") != "deeprecon-compact" or meta.get("stage") != stage:
        raise CheckpointError(f"{path} is not a compact {stage} state "
                              f"(format {meta.get('format')!r}, stage {meta.get('stage')!r})")
    _load_modules(path, tensors, modules, prefix="module.")
    extra_t = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return step, extra_t, extra


def compact_extra(path: str | Path) -> dict[str, Any]:
    """The extra JSON of a :func:`save_compact` file, read from its header alone
    (e.g. to choose the modules to load before :func:`load_compact`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return dict(json.loads(meta.get("extra", "{}")))
    except (OSError, SafetensorError, ValueError, TypeError) as e:
        raise CheckpointError(f"warm-start file {path} is unreadable: {e}") from None


def save_model(path: str | Path, modules: Mapping[str, torch.nn.Module], *,
               config: Mapping[str, Any], dtype: torch.dtype = torch.float16) -> Path:
    """The inference weights of ``modules`` in one safetensors file (``NAME.key``),
    floating tensors cast to ``dtype`` except buffers named in EXACT_BUFFERS; the model
    config as JSON in the file's metadata. Written atomically."""
    path = Path(path)
    tensors = {}
    for mname, module in modules.items():
        for key, value in module.state_dict().items():
            t = _contiguous_cpu(value)
            if t.is_floating_point() and key.rsplit(".", 1)[-1] not in EXACT_BUFFERS:
                t = t.to(dtype)
            tensors[f"{mname}.{key}"] = t
    return save_safetensors_atomic(tensors, path, metadata={
        "format": "deeprecon-model", "config": json.dumps(dict(config), sort_keys=True),
        "modules": ",".join(sorted(modules))})


def load_model(path: str | Path, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    """Load a :func:`save_model` file into ``modules`` (cast to their dtype); returns the
    config stored with it."""
    path = Path(path)
    meta, tensors = _read_file(path, "model file")
    if meta.get("format") != "deeprecon-model":
        raise CheckpointError(f"{path} is not a deeprecon model file")
    _load_modules(path, tensors, modules)
    return json.loads(meta.get("config", "{}"))


def _read_file(path: Path, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; CheckpointError naming ``what`` when it
    is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{what} {path} is unreadable: {e}") from None


def _load_modules(path: Path, tensors: Mapping[str, torch.Tensor],
                  modules: Mapping[str, torch.nn.Module], *, prefix: str = "") -> None:
    """Load ``PREFIX NAME.key`` tensors into each module, cast to the module's dtypes;
    CheckpointError naming the first key that is missing or has another shape."""
    for mname, module in modules.items():
        sd = {}
        for key, ref in module.state_dict().items():
            t = tensors.get(f"{prefix}{mname}.{key}")
            if t is None or t.shape != ref.shape:
                raise CheckpointError(f"{path}: {prefix}{mname}.{key} is missing or has another "
                                      f"shape than the network built from its config")
            sd[key] = t.to(ref.dtype)
        module.load_state_dict(sd, strict=True)


def _model_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"model file {path} is unreadable: {e}") from None


def model_modules(path: str | Path) -> set[str]:
    """The names of the networks in a :func:`save_model` file."""
    return set(filter(None, _model_metadata(path).get("modules", "").split(",")))


def model_file_config(path: str | Path) -> dict[str, Any]:
    """The model config stored in a :func:`save_model` file ({} when it has none), read
    without loading its tensors."""
    try:
        return json.loads(_model_metadata(path).get("config", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"model file {path}: its config is not JSON ({e})") from None


# What a run folder holds before its first checkpoint (such a folder may be reused).
STARTED_ONLY = {"run.json", "log.jsonl", "cache", "samples", "checkpoints"}


def check_new_run_dir(run_dir: Path, *, resume: bool) -> None:
    """A fresh run needs an empty or new folder, or one whose run stopped before its first
    checkpoint (e.g. a missing weight file); --resume needs a checkpoint."""
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise UsageError(f"--resume: {run_dir} has no checkpoint",
                             hint="start a new run without --resume")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        leftovers = {p.name for p in run_dir.iterdir()}
        if leftovers <= STARTED_ONLY and latest_checkpoint(run_dir) is None:
            # a run that stopped before its first checkpoint: nothing to lose, start over
            for name in ("log.jsonl", "summary.json"):
                (run_dir / name).unlink(missing_ok=True)
            return
        raise UsageError(f"run folder {run_dir} already exists and is not empty",
                         hint="pass --resume to continue it, or choose another --out")


__all__ = ["CheckpointError", "save_safetensors_atomic", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "read_state", "save_model", "load_model",
           "check_new_run_dir", "save_compact", "load_compact", "model_modules", "MODEL_FILE", "COMPACT_FILE",
           "FORMAT_VERSION"]
