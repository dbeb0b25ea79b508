"""Write a model bundle: trained networks -> manifest + safetensors weights + torch.export
programs, verified before the bundle exists.

:func:`build_bundle` takes the four networks (encoder E, generator G, segmenter U-Net,
LPIPS) and their :class:`~deeprecon.trainer.config.ModelConfig`; :func:`export_bundle`
finds them in a chain of training runs (``seg`` -> ``latents`` -> ``gan``,
``encoder``), the way ``deeprecon-rt export`` does. The layout and the manifest are
described in :mod:`deeprecon.runtime.bundle`, which reads what this module writes.

How a bundle is written, and why:

- every network is exported with :func:`deeprecon.export.onnx.export_program` (batch
  dimension dynamic) from a float32 CPU copy in eval mode (the caller's modules are not
  changed); the program's example inputs are dropped before ``torch.export.save``,
  which would otherwise pickle them (the runtime refuses any pickle in a bundle);
- weights are float32 safetensors of each network's state dict; the generator's also
  holds ``w_avg`` [w_dim] under that plain name (the centre of the latent space, which
  inversion starts from; in the state dict it is ``mapping.w_avg``);
- every saved program is loaded back and run against its network on a fresh random
  batch of 3 (a batch size it was not traced with): an output that differs by more than
  ``atol + rtol * max|reference|`` raises :class:`ExportVerificationError`;
- manifest.json is written last, into a hidden temporary folder beside ``out`` that is
  renamed onto ``out`` only when everything has been written and verified: a bundle
  folder is either complete or absent.
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from deeprecon.runtime.bundle import (BUNDLE_FORMAT, MANIFEST, SCHEMA_VERSION,
                                      check_program_archive, graph_specs, load_bundle,
                                      sha256_file)
from deeprecon.runtime.errors import BundleError, NoInputError, UsageError
from deeprecon.runtime.inversion import InversionSettings
from deeprecon.runtime.study import LABEL_NAMES_LONG
from deeprecon.trainer.config import ModelConfig

from .onnx import ExportVerificationError, export_program

log = logging.getLogger(__name__)

# The inversion defaults a bundle carries (the runtime may override them per call): those
# of InversionSettings, the one definition of the settings, their meaning and ranges.
INVERSION_DEFAULTS: dict[str, int | float] = InversionSettings().to_dict()

# Verification of a saved program against its network (float32 on the CPU; the program
# runs the same aten ops, so differences are at float rounding).
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-5
VERIFY_BATCH = 3
EXAMPLE_BATCH = 2

GRAPH_FILES = {g: {"torch_program": f"programs/{g}.pt2", "weights": f"weights/{g}.safetensors"}
               for g in ("encoder", "generator", "segmenter", "lpips")}


# ----------------------------------------------------------------------------- settings


def inversion_settings(overrides: Mapping[str, Any] | None = None) -> dict[str, int | float]:
    """INVERSION_DEFAULTS with ``overrides`` (values, or strings from ``--set k=v``),
    checked by :class:`~deeprecon.runtime.inversion.InversionSettings` (the ranges the
    runtime and the bundle reader apply too: steps >= 0, so a bundle may default to no
    inversion). UsageError for an unknown key or a bad value."""
    return InversionSettings.parse(overrides).to_dict()


def versions() -> dict[str, str]:
    """The versions recorded in a manifest."""
    from deeprecon.runtime import __version__

    return {"deeprecon": __version__, "torch": torch.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------- build


def _prepare(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """A float32 CPU copy of ``module`` in eval mode, frozen."""
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"build_bundle: {name} must be a torch.nn.Module, got "
                         f"{type(module).__name__}")
    m = copy.deepcopy(module).to(device="cpu", dtype=torch.float32).eval()
    return m.requires_grad_(False)


def _inputs(graph: str, batch: int, *, resolution: int, num_ws: int, w_dim: int,
            w_avg: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random inputs of ``graph`` (float32, CPU): images uniform in [-1, 1] [B, 1, R, R];
    w+ = w_avg + N(0, 1) [B, L, C]."""
    def image() -> torch.Tensor:
        return torch.rand(batch, 1, resolution, resolution, generator=gen) * 2 - 1

    if graph == "generator":
        return (w_avg[None, None] + torch.randn(batch, num_ws, w_dim, generator=gen),)
    if graph == "lpips":
        return (image(), image())
    return (image(),)


def _weights(graph: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The float32 state dict of ``module`` (independent contiguous CPU tensors), plus
    ``w_avg`` for the generator."""
    tensors = {}
    for key, value in module.state_dict().items():
        t = value.detach().to("cpu")
        tensors[key] = (t.float() if t.is_floating_point() else t).contiguous().clone()
    if graph == "generator":
        tensors["w_avg"] = module.mapping.w_avg.detach().float().cpu().contiguous().clone()
    return tensors


def _compare(graph: str, got: Any, ref: Any, spec_outputs: list[dict], batch: int) -> dict:
    """Max abs and relative error of a reloaded program's outputs against the network's;
    ExportVerificationError above tolerance or on a shape that breaks the spec."""
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    gots = [got] if isinstance(got, torch.Tensor) else list(got)
    if len(refs) != len(gots) or len(refs) != len(spec_outputs):
        raise ExportVerificationError(f"{graph}: the program gives {len(gots)} outputs, the "
                                      f"network {len(refs)}, the spec {len(spec_outputs)}")
    worst = {"max_abs_err": 0.0, "max_rel_err": 0.0}
    for spec, r, g in zip(spec_outputs, refs, gots):
        want = [batch if d == "batch" else d for d in spec["shape"]]
        if list(r.shape) != want or list(g.shape) != want:
            raise ExportVerificationError(
                f"{graph}: output {spec['name']!r} has shape {list(g.shape)} (program) / "
                f"{list(r.shape)} (network), the manifest says {spec['shape']} (batch {batch})")
        r64, g64 = r.detach().double(), g.detach().double()
        scale = float(r64.abs().max())
        err = float((g64 - r64).abs().max())
        if not torch.isfinite(g64).all() or err > VERIFY_ATOL + VERIFY_RTOL * scale:
            raise ExportVerificationError(
                f"{graph}: the saved program disagrees with the network on output "
                f"{spec['name']!r}: max_abs_err {err:.3g} (|ref| max {scale:.3g}), tolerance "
                f"atol {VERIFY_ATOL:g} + rtol {VERIFY_RTOL:g} * |ref| max")
        worst["max_abs_err"] = max(worst["max_abs_err"], err)
        worst["max_rel_err"] = max(worst["max_rel_err"], err / scale if scale > 0 else err)
    return worst


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise UsageError(f"{out} already exists", hint="pass --overwrite to replace it, or "
                                                       "choose another -o")
    if out.is_symlink() or not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; refusing to replace it")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UsageError(f"{out} is a folder that is not a model bundle (no {MANIFEST}); "
                         f"refusing to replace it", hint="choose another -o")


def build_bundle(out: str | Path, *, model: ModelConfig, encoder: torch.nn.Module,
                 generator: torch.nn.Module, segmenter: torch.nn.Module,
                 lpips: torch.nn.Module, name: str | None = None,
                 inversion: Mapping[str, Any] | None = None,
                 provenance: Mapping[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Write the bundle folder ``out`` from the networks and return its path.

    model:      the ModelConfig the networks were built from (preset, grid, w+ shape,
                preprocessing).
    encoder:    image [B, 1, R, R] in [-1, 1] -> w+ [B, L, C].
    generator:  w+ [B, L, C] -> image [B, 1, R, R] (``forward`` is the synthesis network;
                ``mapping.w_avg`` is its latent average).
    segmenter:  image [B, 1, R, R] -> logits [B, K, R, R], K = 4 labels.
    lpips:      (x, y) [B, 1, R, R] in [-1, 1] -> distance [B].
    name:       the bundle's name (default: the folder's name).
    inversion:  overrides of INVERSION_DEFAULTS.
    provenance: {"runs": {stage: path}, "command": str or None, and any other JSON data
                (training records, licence, validation figures)} (default: none).
    overwrite:  replace an existing bundle at ``out`` (UsageError otherwise; a folder
                that is not a bundle is never replaced).

    The networks are exported from float32 CPU copies in eval mode. Raises
    ExportVerificationError when a saved program disagrees with its network.
    """
    out = Path(out)
    _check_out(out, overwrite)
    if not out.parent.is_dir():
        raise NoInputError(f"cannot write {out}: the folder {out.parent} does not exist")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise UsageError(f"the bundle name must be a non-empty string, got {name!r}")
    inv = inversion_settings(inversion)
    prov = {"runs": {}, "command": None, **dict(provenance or {})}
    try:
        json.dumps(prov, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UsageError(f"provenance must be plain JSON data (no NaN): {e}") from None
    prov = {**prov, "runs": {str(k): str(v) for k, v in dict(prov["runs"]).items()},
            "command": None if prov["command"] is None else str(prov["command"])}
    r, num_ws, w_dim = model.resolution, model.generator.num_ws, model.generator.w_dim
    labels = {str(k): v for k, v in LABEL_NAMES_LONG.items()}
    if model.unet.n_classes != len(labels):
        raise UsageError(f"the segmenter has {model.unet.n_classes} classes, the label map "
                         f"{len(labels)}")
    specs = graph_specs(resolution=r, num_ws=num_ws, w_dim=w_dim, n_classes=len(labels))
    nets = {g: _prepare(m, g) for g, m in (("encoder", encoder), ("generator", generator),
                                           ("segmenter", segmenter), ("lpips", lpips))}
    w_avg = getattr(getattr(nets["generator"], "mapping", None), "w_avg", None)
    if not isinstance(w_avg, torch.Tensor) or tuple(w_avg.shape) != (w_dim,):
        raise UsageError(f"the generator needs a mapping network with a w_avg buffer "
                         f"[{w_dim}] (a trainer.networks.Generator)")
    w_avg = w_avg.detach().float()

    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        gen = torch.Generator().manual_seed(0)
        checks = {}
        for graph, net in nets.items():
            files = GRAPH_FILES[graph]
            kw = dict(resolution=r, num_ws=num_ws, w_dim=w_dim, w_avg=w_avg, gen=gen)
            t0 = time.perf_counter()
            program = export_program(net, _inputs(graph, EXAMPLE_BATCH, **kw))
            program._example_inputs = None  # torch.export.save would pickle them
            ppath, wpath = tmp / files["torch_program"], tmp / files["weights"]
            ppath.parent.mkdir(exist_ok=True)
            wpath.parent.mkdir(exist_ok=True)
            torch.export.save(program, str(ppath))
            del program
            save_file(_weights(graph, net), str(wpath),
                      metadata={"format": BUNDLE_FORMAT, "graph": graph})
            checks[graph] = _verify_program(graph, ppath, net,
                                            _inputs(graph, VERIFY_BATCH, **kw), specs[graph])
            log.info("%s: exported and verified in %.1f s (max_abs_err %.2g, max_rel_err %.2g)",
                     graph, time.perf_counter() - t0, checks[graph]["max_abs_err"],
                     checks[graph]["max_rel_err"])

        files_meta = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files_meta[p.relative_to(tmp).as_posix()] = {"sha256": sha256_file(p),
                                                             "bytes": p.stat().st_size}
        manifest = {
            "format": BUNDLE_FORMAT, "schema_version": SCHEMA_VERSION,
            "name": name if name is not None else out.name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {"preset": model.name, "resolution": r, "num_ws": num_ws, "w_dim": w_dim,
                      "config": model.to_dict()},
            "preprocess": model.preprocess.to_dict(),
            "labels": labels,
            "inversion": inv,
            "graphs": {g: {**specs[g], "files": dict(GRAPH_FILES[g])} for g in nets},
            "files": files_meta,
            "versions": versions(),
            "provenance": prov,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        _publishable(tmp)
        try:  # the bundle as the runtime will read it
            load_bundle(tmp, verify=True)
        except BundleError as e:  # pragma: no cover - a writer/reader mismatch is a bug
            raise ExportVerificationError(f"the written bundle does not load: {e}") from None
        _replace(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(e["bytes"] for e in files_meta.values())
    log.info("bundle %s written in %.1f s (%d files, %.1f MB)", out,
             time.perf_counter() - t_all, len(files_meta) + 1, total / 1e6)
    return out


def _publishable(folder: Path) -> None:
    """Ordinary permissions (umask applied) on the folder and everything in it:
    ``mkdtemp`` makes a private folder, and a bundle is meant to be read by others."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _verify_program(graph: str, path: Path, net: torch.nn.Module, inputs: tuple,
                    spec: Mapping[str, Any]) -> dict:
    """Load the saved program back (no pickles allowed) and compare it with ``net``."""
    check_program_archive(path, f"{graph} program")
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        ref = net(*inputs)
        got = loaded(*inputs)
    return _compare(graph, got, ref, spec["outputs"], VERIFY_BATCH)


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder onto ``out``; an existing ``out`` (checked
    again: it may have appeared during the export) is moved aside first and removed
    after the rename."""
    _check_out(out, overwrite)
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        os.replace(out, old / "bundle")
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:  # put the previous bundle back
            os.replace(old / "bundle", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- from runs


def _run_folder(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise NoInputError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise UsageError(f"{what} {p} is not a run folder")
    return p.resolve()


def export_bundle(run_dir: str | Path, out: str | Path, *, encoder_run: str | Path | None = None,
                  gan_run: str | Path | None = None,
                  lpips_weights: str | Path | None = None, name: str | None = None,
                  inversion: Mapping[str, Any] | None = None, overwrite: bool = False,
                  command: str | None = None,
                  description: Mapping[str, Any] | None = None) -> Path:
    """Write the bundle of a finished chain of training runs and return its path.

    run_dir:       a finished ``seg`` run (the segmenter). Its run.json names the
                   ``latents`` run, whose run.json names the ``gan`` run (the generator:
                   the EMA generator the gan stage saves) and the ``encoder`` run.
                   A ``seg-direct`` run works too, with both ``encoder_run`` and ``gan_run``.
    encoder_run, gan_run: use these runs instead of the ones the chain names.
    lpips_weights: the shift-tolerant LPIPS weight file (default: the installed
                   stlpips-pytorch wheel's; SHA-256 checked).
    name, inversion, overwrite: as for :func:`build_bundle`.
    command:       the command line, recorded in the manifest's provenance.
    description:   more provenance, merged into the manifest's (e.g. "licence",
                   "training_data", "validation" figures); it may not replace the keys
                   export writes itself ("runs", "command", "training").

    The provenance also records every run of the chain (:func:`_run_record`): stage,
    settings, data, the fingerprint of its training slices, versions and final figures.

    Raises NoInputError for a folder that does not exist, UsageError for a folder that
    is not the right kind of finished run or a chain trained with different presets.
    """
    from deeprecon.trainer.lpips import load_lpips
    from deeprecon.trainer.networks import Encoder, Generator, UNet
    from deeprecon.trainer.run import load_networks, read_run, upstream

    out = Path(out)
    _check_out(out, overwrite)  # before any work
    inversion_settings(inversion)
    clash = {"runs", "command", "training"} & set(description or {})
    if clash:
        raise UsageError(f"the description may not set {sorted(clash)}: export writes them")
    seg_dir = _run_folder(run_dir, "run folder")
    info = read_run(seg_dir)
    stage = info.get("stage")
    if stage not in ("seg", "seg-direct"):
        raise UsageError(f"{seg_dir} is a {stage!r} run; export needs a finished 'seg' run "
                         f"(the segmenter; its chain gives the generator and the encoder)")
    try:
        model = ModelConfig.from_dict(info["model"])
    except (KeyError, TypeError, UsageError) as e:
        raise UsageError(f"{seg_dir}/run.json has no usable model config: {e}") from None
    upstream(seg_dir, stage, model)

    runs: dict[str, Path] = {}
    chain: dict[str, str] = {}
    if stage == "seg":
        lat = info.get("inputs", {}).get("latents")
        if lat is not None and Path(lat).is_dir():
            lat_dir = Path(lat).resolve()
            lat_info = read_run(lat_dir)
            if lat_info.get("stage") != "latents":
                raise UsageError(f"{lat_dir} (the latents run of {seg_dir}) is a "
                                 f"{lat_info.get('stage')!r} run")
            if lat_info.get("model") != model.to_dict():
                raise UsageError(f"{lat_dir} was trained with preset "
                                 f"{lat_info.get('model', {}).get('name')!r}, {seg_dir} with "
                                 f"{model.name!r}")
            runs["latents"] = lat_dir
            chain = lat_info.get("inputs", {})
        elif encoder_run is None or gan_run is None:
            raise UsageError(f"{seg_dir}/run.json names the latents run {lat}, which does not "
                             f"exist (moved?): the generator and the encoder cannot be found",
                             hint="pass --gan RUN and --encoder RUN")
    elif encoder_run is None or gan_run is None:
        raise UsageError(f"{seg_dir} is a seg-direct run: its chain names no generator and "
                         f"encoder", hint="pass --gan RUN and --encoder RUN")
    for st, given, opt in (("gan", gan_run, "--gan"), ("encoder", encoder_run, "--encoder")):
        if given is not None:
            runs[st] = _run_folder(given, f"{opt}")
        elif st in chain:
            runs[st] = _chain_run(chain[st], st, runs.get("latents", seg_dir), opt)
        else:
            raise UsageError(f"the chain of {seg_dir} names no {st} run", hint=f"pass {opt} RUN")
        upstream(runs[st], st, model)
    runs["seg"] = seg_dir
    enc_gan = read_run(runs["encoder"]).get("inputs", {}).get("gan")
    if enc_gan is not None and Path(enc_gan).resolve() != runs["gan"]:
        log.warning("the encoder %s was trained against the generator of %s, the bundle takes "
                    "the generator of %s", runs["encoder"], enc_gan, runs["gan"])

    device = torch.device("cpu")
    G = load_networks(runs["gan"], {"G": lambda: Generator(model.generator)}, device=device)["G"]
    E = load_networks(runs["encoder"], {"E": lambda: Encoder(model.encoder)}, device=device)["E"]
    S = load_networks(seg_dir, {"Seg": lambda: UNet(model.unet)}, device=device)["Seg"]
    lp = load_lpips(weights_path=lpips_weights, layers=model.lpips_layers)
    order = ("gan", "encoder", "latents", "seg")
    return build_bundle(out, model=model, encoder=E, generator=G, segmenter=S, lpips=lp,
                        name=name, inversion=inversion, overwrite=overwrite,
                        provenance={"runs": {k: str(runs[k]) for k in order if k in runs},
                                    "command": command,
                                    "training": {k: _run_record(runs[k]) for k in order if k in runs},
                                    **dict(description or {})})


def _run_record(run_dir: Path) -> dict[str, Any]:
    """What the manifest keeps of one training run: its stage, settings, data and data
    fingerprint, versions, start time and final figures (summary.json)."""
    from deeprecon.trainer.run import read_run

    info = read_run(run_dir)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    return {"stage": info.get("stage"), "started": info.get("started"),
            "config": info.get("config"), "data": info.get("data"),
            "data_options": info.get("data_options"), "versions": info.get("versions"),
            "world_size": info.get("world_size"), "summary": summary}


def _chain_run(recorded: str, stage: str, named_by: Path, option: str) -> Path:
    p = Path(recorded)
    if not p.is_dir():
        raise UsageError(f"{named_by}/run.json names the {stage} run {p}, which does not exist "
                         f"(moved?)", hint=f"pass {option} RUN")
    return p.resolve()


def random_networks(preset: str = "tiny", *, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Seeded, untrained ``encoder``, ``generator`` and ``segmenter`` of a preset (eval,
    float32, CPU), with the generator's ``w_avg`` set to the mean of its mapping network
    over seeded z (not zero, as in a trained G) and copied into the encoder, as the
    encoder stage does. For tests and speed benchmarks, never for results."""
    from deeprecon.trainer.config import get_preset
    from deeprecon.trainer.networks import Encoder, Generator, UNet

    model = get_preset(preset)
    torch.manual_seed(seed)
    G = Generator(model.generator).eval()
    E = Encoder(model.encoder).eval()
    S = UNet(model.unet).eval()
    with torch.no_grad():
        z = torch.randn(256, model.generator.z_dim, generator=torch.Generator().manual_seed(seed))
        G.mapping.w_avg.copy_(G.mapping(z)[:, 0].mean(dim=0))
        E.w_avg.copy_(G.mapping.w_avg)
    return {"encoder": E, "generator": G, "segmenter": S}


def random_bundle(out: str | Path, *, preset: str = "tiny", seed: int = 0,
                  lpips_weights: str | Path | None = None,
                  inversion: Mapping[str, Any] | None = None, overwrite: bool = False,
                  command: str | None = None) -> Path:
    """A bundle of :func:`random_networks` and the real LPIPS, named ``<preset>-random-seed<N>``:
    the whole pipeline runs on it with the speed of a trained bundle of the same preset,
    and meaningless segmentations. For tests and benchmarks."""
    from deeprecon.trainer.config import get_preset
    from deeprecon.trainer.lpips import load_lpips

    model = get_preset(preset)
    return build_bundle(out, model=model, lpips=load_lpips(weights_path=lpips_weights,
                                                           layers=model.lpips_layers),
                        name=f"{preset}-random-seed{seed}", inversion=inversion,
                        provenance={"runs": {}, "command": command},
                        overwrite=overwrite, **random_networks(preset, seed=seed))


__all__ = ["INVERSION_DEFAULTS", "VERIFY_RTOL", "VERIFY_ATOL", "build_bundle", "export_bundle",
           "inversion_settings", "versions", "random_networks", "random_bundle"]
