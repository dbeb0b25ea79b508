"""Write a model bundle: trained networks -> manifest + safetensors weights + torch.export
programs + ONNX graphs (forward and gradient), verified before the bundle exists.

:func:`build_bundle` takes the four networks (encoder E, generator G, segmenter U-Net,
LPIPS) and their :class:`~deeprecon.trainer.config.ModelConfig`; :func:`export_bundle`
finds them in a chain of training runs (``seg`` -> ``latents`` -> ``gan``,
``encoder``), the way ``deeprecon-rt export`` does. The layout and the manifest are
described in :mod:`deeprecon.runtime.bundle`, which reads what this module writes.

How a bundle is written, and why:

- weights are stored once: ``weights/<network>.safetensors`` (float32 state dicts; the
  generator's also holds ``w_avg`` [w_dim] under that plain name, the centre of the
  latent space that inversion starts from; LPIPS only the layers it uses). Every
  artifact reads them from there: a torch program takes them as leading inputs
  (:class:`_Lifted`), an ONNX graph points at them as external data
  (:func:`~deeprecon.export.onnx.link_external_weights`);
- the graphs (:data:`GRAPHS`): encoder, generator, segmenter (torch program and ONNX),
  lpips (torch program: the torch runner differentiates through it), lpips_features
  and hybrid_grad (ONNX: the explicit VJP of :mod:`deeprecon.export.vjp`, so that a
  runtime without torch can invert);
- every program is exported with :func:`deeprecon.export.onnx.export_program` (batch
  dimension dynamic) from a float32 CPU copy in eval mode (the caller's modules are not
  changed); the program's example inputs are dropped before ``torch.export.save``,
  which would otherwise pickle them (the runtime refuses any pickle in a bundle);
- every artifact is loaded back (ONNX graphs in onnxruntime) and run on a fresh random
  batch of 3 (a batch size it was not traced with) against PyTorch: the module, or for
  hybrid_grad autograd of the runtime's inversion loss (``hybrid_loss``: the real
  networks and the fused NCC/ROI op). An output that differs by
  more than ``atol + rtol * max|reference|`` raises :class:`ExportVerificationError`;
  the errors measured go into the manifest (``artifacts.<kind>.check``);
- manifest.json is written last, into a hidden temporary folder beside ``out`` that is
  renamed onto ``out`` only when everything has been written and verified: a bundle
  folder is either complete or absent.
"""
from __future__ import annotations

import copy
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save

from deeprecon.runtime.bundle import (BATCH, BUNDLE_FORMAT, MANIFEST, SCHEMA_VERSION,
                                      check_program_archive, graph_specs, load_bundle)
from deeprecon.runtime.errors import BundleError, NoInputError, UnavailableError, UsageError
from deeprecon.runtime.inversion import InversionSettings, hybrid_loss_and_grad
from deeprecon.runtime.publish import canonical_safetensors, sha256_file, staged_folder
from deeprecon.runtime.study import LABEL_NAMES_LONG
from deeprecon.trainer.config import ModelConfig

from .onnx import (MAX_BATCH, ExportVerificationError, export_onnx, export_program,
                   link_external_weights, verify_onnx)

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
FORWARD_BATCH = 32  # the batch range's "opt" of the forward graphs (the runtime's EVAL_BATCH)

#: graph -> (the networks whose weights it reads, the artifacts export writes for it)
GRAPHS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("encoder",), ("torch_program", "onnx")),
    "generator": (("generator",), ("torch_program", "onnx")),
    "segmenter": (("segmenter",), ("torch_program", "onnx")),
    "lpips": (("lpips",), ("torch_program",)),
    "lpips_features": (("lpips",), ("onnx",)),
    "hybrid_grad": (("generator", "encoder", "lpips"), ("onnx",)),
}
NETWORKS = ("encoder", "generator", "segmenter", "lpips")
#: the graphs only the onnxruntime runner needs (left out with ``onnx=False``)
GRADIENT_GRAPHS = ("lpips_features", "hybrid_grad")


def weight_file(net: str) -> str:
    return f"weights/{net}.safetensors"


def artifact_file(graph: str, kind: str) -> str:
    # ONNX graphs sit above weights/: onnxruntime reads external data only from the
    # graph's folder or below it
    return f"programs/{graph}.pt2" if kind == "torch_program" else f"{graph}.onnx"


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

    v = {"deeprecon": __version__, "torch": torch.__version__,
         "python": platform.python_version()}
    for dist in ("onnx", "onnxruntime"):
        try:
            v[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return v


# ----------------------------------------------------------------------------- build


def _prepare(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """A float32 CPU copy of ``module`` in eval mode, frozen."""
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"build_bundle: {name} must be a torch.nn.Module, got "
                         f"{type(module).__name__}")
    m = copy.deepcopy(module).to(device="cpu", dtype=torch.float32).eval()
    return m.requires_grad_(False)


class _Lifted(torch.nn.Module):
    """``net`` with its state as leading inputs: ``forward(*state, *inputs)``. The
    network is hidden from the module tree, so the exported program holds no weights:
    the runtime feeds them from the bundle's safetensors files (stored once)."""

    def __init__(self, net: torch.nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self._net = [net]
        self.keys = keys

    def forward(self, *args: torch.Tensor):
        k = len(self.keys)
        return torch.func.functional_call(self._net[0], dict(zip(self.keys, args[:k])),
                                          tuple(args[k:]), strict=False)


def _state(net: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What weights/<net>.safetensors holds: the float32 state dict of ``module``
    (independent contiguous CPU tensors; LPIPS: the layers it uses), plus ``w_avg`` for
    the generator."""
    sd = module.used_state_dict() if net == "lpips" else module.state_dict()
    tensors = {}
    for key, value in sd.items():
        t = value.detach().to("cpu")
        tensors[key] = (t.float() if t.is_floating_point() else t).contiguous().clone()
    if net == "generator":
        tensors["w_avg"] = module.mapping.w_avg.detach().float().cpu().contiguous().clone()
    return tensors


def _graph_module(graph: str, nets: Mapping[str, torch.nn.Module]) -> torch.nn.Module:
    """The module whose artifacts are ``graph``'s."""
    from .vjp import HybridGrad, LpipsFeatures

    if graph in NETWORKS:
        return nets[graph]
    if graph == "lpips_features":
        return LpipsFeatures(nets["lpips"]).eval()
    from deeprecon.trainer.networks import Encoder, Generator

    if not isinstance(nets["generator"], Generator) or not isinstance(nets["encoder"], Encoder):
        raise UsageError("the inversion's gradient graph is written for the trainer's "
                         "Generator and Encoder (deeprecon.trainer.networks)",
                         hint="build the bundle with onnx=False for other networks")
    return HybridGrad(nets["generator"], nets["encoder"], nets["lpips"]).eval()


class _Inputs:
    """Random inputs of the graphs (float32, CPU): images uniform in [-1, 1]
    [B, 1, R, R]; w+ = w_avg + N(0, 1) [B, L, C]; the LPIPS features of random images;
    a 0/1 ROI of a disc of random centre and radius; lambdas (lambda1, lambda2, lambda3)
    and the NCC window of the inversion defaults."""

    def __init__(self, model: ModelConfig, w_avg: torch.Tensor, lpips_features, lambdas,
                 ncc_window: int, seed: int):
        self.r, self.num_ws, self.w_dim = model.resolution, model.generator.num_ws, model.generator.w_dim
        self.w_avg, self.features, self.lambdas = w_avg, lpips_features, lambdas
        self.ncc_window = torch.tensor([ncc_window], dtype=torch.int64)
        self.gen = torch.Generator().manual_seed(seed)

    def roi(self, batch: int) -> torch.Tensor:
        c = (0.25 + 0.5 * torch.rand(batch, 2, generator=self.gen)) * self.r
        radius = (0.1 + 0.2 * torch.rand(batch, generator=self.gen)) * self.r
        yy, xx = torch.meshgrid(torch.arange(self.r), torch.arange(self.r), indexing="ij")
        d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
        return (d2 <= radius[:, None, None] ** 2).float()[:, None].contiguous()

    def image(self, batch: int) -> torch.Tensor:
        return torch.rand(batch, 1, self.r, self.r, generator=self.gen) * 2 - 1

    def w(self, batch: int) -> torch.Tensor:
        return self.w_avg[None, None] + torch.randn(batch, self.num_ws, self.w_dim, generator=self.gen)

    def __call__(self, graph: str, batch: int) -> tuple[torch.Tensor, ...]:
        if graph == "generator":
            return (self.w(batch),)
        if graph == "lpips":
            return (self.image(batch), self.image(batch))
        if graph == "hybrid_grad":
            x = self.image(batch)
            with torch.no_grad():
                fx = self.features(x)
            return (self.w(batch), x, self.roi(batch), *fx, self.lambdas.clone(),
                    self.ncc_window.clone())
        return (self.image(batch),)


class _HybridReference(torch.nn.Module):
    """The hybrid_grad graph's outputs by autograd of the inversion loss as the runtime
    defines it (:func:`deeprecon.runtime.inversion.hybrid_loss`: the real networks and
    the fused NCC/ROI op): the reference its explicit VJP is checked against. Same inputs
    and outputs as the graph (:func:`~deeprecon.runtime.bundle.graph_specs`)."""

    def __init__(self, G, E, lp):
        super().__init__()
        self._nets = (G, E, lp)  # not submodules: nothing of this module is exported

    def forward(self, w, x, roi, *args):
        G, E, lp = self._nets
        *fx, lam, ncc_window = args
        return hybrid_loss_and_grad(w, x.contiguous(), roi.contiguous(), generator=G, encoder=E,
                                    lpips_to_x=lambda y: lp.distance_to(list(fx), y),
                                    lambda1=float(lam[0]), lambda2=float(lam[1]),
                                    lambda3=float(lam[2]), ncc_window=int(ncc_window[0]))


def _compare(graph: str, got: Any, ref: Any, spec_outputs: list[dict], batch: int) -> dict:
    """Max abs and relative error of an artifact's outputs against the reference;
    ExportVerificationError above ``atol + rtol * max|reference|`` or on a shape that
    breaks the spec."""
    rtol, atol = VERIFY_RTOL, VERIFY_ATOL
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    gots = [got] if isinstance(got, torch.Tensor) else list(got)
    if len(refs) != len(gots) or len(refs) != len(spec_outputs):
        raise ExportVerificationError(f"{graph}: the artifact gives {len(gots)} outputs, the "
                                      f"reference {len(refs)}, the spec {len(spec_outputs)}")
    worst = {"max_abs_err": 0.0, "max_rel_err": 0.0}
    for spec, r, g in zip(spec_outputs, refs, gots):
        want = [batch if d == "batch" else d for d in spec["shape"]]
        if list(r.shape) != want or list(g.shape) != want:
            raise ExportVerificationError(
                f"{graph}: output {spec['name']!r} has shape {list(g.shape)} (artifact) / "
                f"{list(r.shape)} (reference), the manifest says {spec['shape']} (batch {batch})")
        r64, g64 = r.detach().double(), g.detach().double()
        scale = float(r64.abs().max())
        err = float((g64 - r64).abs().max())
        if not torch.isfinite(g64).all() or err > atol + rtol * scale:
            raise ExportVerificationError(
                f"{graph}: the exported artifact disagrees with PyTorch on output "
                f"{spec['name']!r}: max_abs_err {err:.3g} (|ref| max {scale:.3g}), tolerance "
                f"atol {atol:g} + rtol {rtol:g} * |ref| max")
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


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UnavailableError(f"writing the ONNX graphs of a bundle needs {', '.join(missing)}, "
                               f"which {'is' if len(missing) == 1 else 'are'} not installed",
                               hint="pip install 'deeprecon-rt[train]' (or build the bundle "
                                    "with onnx=False: a torch-only bundle)")


def build_bundle(out: str | Path, *, model: ModelConfig, encoder: torch.nn.Module,
                 generator: torch.nn.Module, segmenter: torch.nn.Module,
                 lpips: torch.nn.Module, name: str | None = None,
                 inversion: Mapping[str, Any] | None = None,
                 provenance: Mapping[str, Any] | None = None,
                 overwrite: bool = False, onnx: bool = True) -> Path:
    """Write the bundle folder ``out`` from the networks and return its path.

    model:      the ModelConfig the networks were built from (preset, grid, w+ shape,
                preprocessing).
    encoder:    image [B, 1, R, R] in [-1, 1] -> w+ [B, L, C].
    generator:  w+ [B, L, C] -> image [B, 1, R, R] (``forward`` is the synthesis network;
                ``mapping.w_avg`` is its latent average).
    segmenter:  image [B, 1, R, R] -> logits [B, K, R, R], K = 4 labels.
    lpips:      the trainer's LPIPS module ((x, y) [B, 1, R, R] in [-1, 1] -> distance [B]).
    name:       the bundle's name (default: the folder's name).
    inversion:  overrides of INVERSION_DEFAULTS.
    provenance: {"runs": {stage: path}, "command": str or None, and any other JSON data
                (training records, licence, validation figures)} (default: none).
    overwrite:  replace an existing bundle at ``out`` (UsageError otherwise; a folder
                that is not a bundle is never replaced).
    onnx:       also write the ONNX graphs (forward and gradient graphs), which the
                onnxruntime runner needs; False writes a torch-only bundle (faster, for
                tests of other parts).

    The networks are exported from float32 CPU copies in eval mode. Raises
    ExportVerificationError when a written artifact disagrees with PyTorch.
    """
    out = Path(out)
    _check_out(out, overwrite)
    if not out.parent.is_dir():
        raise NoInputError(f"cannot write {out}: the folder {out.parent} does not exist")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise UsageError(f"the bundle name must be a non-empty string, got {name!r}")
    if onnx:
        _require_onnx()
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
    nets = {n: _prepare(m, n) for n, m in zip(NETWORKS, (encoder, generator, segmenter, lpips))}
    w_avg = getattr(getattr(nets["generator"], "mapping", None), "w_avg", None)
    if not isinstance(w_avg, torch.Tensor) or tuple(w_avg.shape) != (w_dim,):
        raise UsageError(f"the generator needs a mapping network with a w_avg buffer "
                         f"[{w_dim}] (a trainer.networks.Generator)")
    w_avg = w_avg.detach().float()
    features = _graph_module("lpips_features", nets)
    with torch.no_grad():
        probe = features(torch.zeros(1, 1, r, r))
    specs = graph_specs(resolution=r, num_ws=num_ws, w_dim=w_dim, n_classes=len(labels),
                        lpips_shapes=[tuple(f.shape[1:]) for f in probe])
    graphs = [g for g in GRAPHS if onnx or g not in GRADIENT_GRAPHS]
    lambdas = torch.tensor([inv["lambda1"], inv["lambda2"], inv["lambda3"]], dtype=torch.float32)
    inputs = _Inputs(model, w_avg, features, lambdas, int(inv["ncc_window"]), seed=0)

    t_all = time.perf_counter()
    # published atomically: a staging folder beside out, renamed onto it once verified
    with staged_folder(out, check=lambda target: _check_out(target, overwrite)) as tmp:
        (tmp / "weights").mkdir()
        (tmp / "programs").mkdir()
        states = {n: _state(n, nets[n]) for n in NETWORKS}
        for n in NETWORKS:  # every weight once: the artifacts read these files
            (tmp / weight_file(n)).write_bytes(canonical_safetensors(
                save(states[n], metadata={"format": BUNDLE_FORMAT, "network": n})))
        entries = {}
        for g in graphs:
            net_names, kinds = GRAPHS[g]
            t0 = time.perf_counter()
            module = features if g == "lpips_features" else _graph_module(g, nets)
            artifacts = {}
            for kind in kinds:
                if kind == "onnx" and not onnx:
                    continue
                rel = artifact_file(g, kind)
                if kind == "torch_program":
                    artifacts[kind] = _write_program(tmp, rel, g, module, net_names[0],
                                                     states, inputs, specs[g])
                else:
                    artifacts[kind] = _write_onnx(tmp, rel, g, module, net_names, inputs,
                                                  specs[g], nets)
            opt = inv["batch"] if g in GRADIENT_GRAPHS else FORWARD_BATCH
            entries[g] = {**specs[g], "weights": list(net_names),
                          "batch": {"min": 1, "opt": opt, "max": MAX_BATCH},
                          "artifacts": artifacts}
            log.info("%s: %s written and verified in %.1f s (%s)", g, " + ".join(artifacts),
                     time.perf_counter() - t0,
                     ", ".join(f"{k} max_rel_err {a['check']['max_rel_err']:.2g}"
                               for k, a in artifacts.items()))

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
            "weights": {n: weight_file(n) for n in NETWORKS},
            "graphs": entries,
            "files": files_meta,
            "versions": versions(),
            "provenance": prov,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        try:  # the bundle as the runtime will read it
            load_bundle(tmp, verify=True)
        except BundleError as e:  # pragma: no cover - a writer/reader mismatch is a bug
            raise ExportVerificationError(f"the written bundle does not load: {e}") from None
    total = sum(e["bytes"] for e in files_meta.values())
    log.info("bundle %s written in %.1f s (%d files, %.1f MB)", out,
             time.perf_counter() - t_all, len(files_meta) + 1, total / 1e6)
    return out


def _write_program(tmp: Path, rel: str, graph: str, module: torch.nn.Module, net: str,
                   states: Mapping[str, dict], inputs: _Inputs, spec: Mapping[str, Any]) -> dict:
    """The torch.export program of ``graph`` with its weights as leading inputs (read
    from weights/<net>.safetensors), loaded back and checked against ``module``."""
    own = module.state_dict()
    keys = tuple(k for k in states[net] if k in own)
    lifted = _Lifted(module, keys)
    state = [states[net][k] for k in keys]
    example = inputs(graph, EXAMPLE_BATCH)
    program = export_program(lifted, (*state, *example),
                             batch_inputs=[False] * len(keys) + [True] * len(example))
    program._example_inputs = None  # torch.export.save would pickle them
    path = tmp / rel
    torch.export.save(program, str(path))
    del program
    check_program_archive(path, f"{graph} program")
    loaded = torch.export.load(str(path)).module()
    saved = load_file(str(tmp / weight_file(net)))  # the state as the runtime reads it
    x = inputs(graph, VERIFY_BATCH)
    with torch.no_grad():
        ref = module(*x)
        got = loaded(*[saved[k] for k in keys], *x)
    check = _compare(graph, got, ref, spec["outputs"], VERIFY_BATCH)
    return {"file": rel, "state": [[net, k] for k in keys],
            "check": {**check, "reference": "module", "batch": VERIFY_BATCH}}


def _write_onnx(tmp: Path, rel: str, graph: str, module: torch.nn.Module,
                net_names: tuple[str, ...], inputs: _Inputs, spec: Mapping[str, Any],
                nets: Mapping[str, torch.nn.Module]) -> dict:
    """The ONNX graph of ``graph`` (batch dynamic), its weights linked into the
    safetensors files, run in onnxruntime and checked: forward graphs against the
    module, ``hybrid_grad`` against autograd of the runtime's ``hybrid_loss``."""
    import onnx as onnx_lib

    example = inputs(graph, EXAMPLE_BATCH)
    flags = [bool(t["shape"]) and t["shape"][0] == BATCH for t in spec["inputs"]]
    program = export_program(module, example, batch_inputs=flags)
    path = tmp / rel
    export_onnx(program, example, path, input_names=[t["name"] for t in spec["inputs"]],
                output_names=[t["name"] for t in spec["outputs"]], optimize=False)
    del program
    link = link_external_weights(path, [tmp / weight_file(n) for n in net_names])
    opset = next(o.version for o in onnx_lib.load(str(path), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    if graph == "hybrid_grad":
        reference, what = _HybridReference(nets["generator"], nets["encoder"], nets["lpips"]), \
            "autograd of hybrid_loss"
    else:
        reference, what = module, "module"
    report = verify_onnx(path, reference, inputs(graph, VERIFY_BATCH), rtol=VERIFY_RTOL,
                         atol=VERIFY_ATOL)
    return {"file": rel, "opset": int(opset),
            "check": {"max_abs_err": report["max_abs_err"], "max_rel_err": report["max_rel_err"],
                      "reference": what, "batch": VERIFY_BATCH,
                      "weights_linked_bytes": link["linked_bytes"],
                      "inline_bytes": link["inline_bytes"]}}


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
                  description: Mapping[str, Any] | None = None, onnx: bool = True) -> Path:
    """Write the bundle of a finished chain of training runs and return its path.

    run_dir:       a finished ``seg`` run (the segmenter). Its run.json names the
                   ``latents`` run, whose run.json names the ``gan`` run (the generator:
                   the EMA generator the gan stage saves) and the ``encoder`` run.
                   A ``seg-direct`` run works too, with both ``encoder_run`` and ``gan_run``.
    encoder_run, gan_run: use these runs instead of the ones the chain names.
    lpips_weights: the shift-tolerant LPIPS weight file (default: the installed
                   stlpips-pytorch wheel's; SHA-256 checked).
    name, inversion, overwrite, onnx: as for :func:`build_bundle`.
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
    validation = (description or {}).get("validation")
    described_k = validation.get("steps") if isinstance(validation, Mapping) else None
    if described_k is not None and described_k != inversion_settings(inversion)["steps"]:
        raise UsageError(f"the description's validation figures are of K = {described_k} "
                         f"inversion steps, but this bundle would run K = "
                         f"{inversion_settings(inversion)['steps']} by default",
                         hint=f"export with --set steps={described_k}, or describe the row "
                              "of the bundle's K")
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
                        name=name, inversion=inversion, overwrite=overwrite, onnx=onnx,
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
                  command: str | None = None, onnx: bool = True) -> Path:
    """A bundle of :func:`random_networks` and the real LPIPS, named ``<preset>-random-seed<N>``:
    the whole pipeline runs on it with the speed of a trained bundle of the same preset,
    and meaningless segmentations. For tests and benchmarks (``onnx`` as for
    :func:`build_bundle`)."""
    from deeprecon.trainer.config import get_preset
    from deeprecon.trainer.lpips import load_lpips

    model = get_preset(preset)
    return build_bundle(out, model=model, lpips=load_lpips(weights_path=lpips_weights,
                                                           layers=model.lpips_layers),
                        name=f"{preset}-random-seed{seed}", inversion=inversion,
                        provenance={"runs": {}, "command": command},
                        overwrite=overwrite, onnx=onnx, **random_networks(preset, seed=seed))


__all__ = ["INVERSION_DEFAULTS", "VERIFY_RTOL", "VERIFY_ATOL", "GRAPHS", "NETWORKS",
           "GRADIENT_GRAPHS", "build_bundle", "export_bundle",
           "inversion_settings", "versions", "random_networks", "random_bundle"]
