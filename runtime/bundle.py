"""The model bundle on disk: read its manifest, verify every file, describe it, and hand
the backends its graphs.

A bundle is a folder written by ``deeprecon-rt export`` (:mod:`deeprecon.export.bundle`),
schema 3::

    BUNDLE/
      manifest.json                 everything below, described (schema SCHEMA_VERSION)
      weights/<network>.safetensors float32 weights of encoder, generator, segmenter,
                                    lpips: each weight stored once, read by every artifact
      programs/<graph>.pt2          torch.export programs, batch dynamic, weights as inputs
      <graph>.onnx                  ONNX graphs, batch dynamic, weights as external data
                                    in weights/ (onnxruntime reads external data only
                                    from the graph's folder or below it)

Graphs: ``encoder`` (image -> w+), ``generator`` (w+ -> image), ``segmenter`` (image ->
logits), ``lpips`` (x, y -> distance), and the gradient graphs that let a runtime
without torch invert: ``lpips_features`` (x -> the normalised LPIPS features of x) and
``hybrid_grad`` (w, x, roi, features of x, loss weights -> the inversion loss and
dloss/dw, in one graph). Per graph the manifest holds its inputs and outputs (names, dtypes,
shapes, ``"batch"`` for the dynamic dimension), its batch range (min / opt / max), the
networks whose weights it reads, and its artifacts by backend: ``torch_program``
(file, the ordered state it takes), ``onnx`` (file, opset), ``tensorrt_plan`` (file,
TensorRT version, compute capability: room for it, not written here), each with the
errors measured against PyTorch at export. Besides: the model grid and
preprocessing, the label map, the inversion defaults, every file with its size and
SHA-256, the versions that wrote it and where its networks came from. Older schemas are
refused with a message that says how to export them again: schema 1 copied the weights
into every program and had no gradient graphs, schema 2's hybrid_grad took the NCC/ROI
terms' gradient from the fused kernel between two graphs.

Identity and integrity. The bundle's identity is the SHA-256 of ``manifest.json``'s
bytes (:attr:`Bundle.sha256`): the manifest pins every other file by its hash, so two
bundles with the same manifest hash hold the same bytes. :func:`load_bundle` refuses
(:class:`BundleError`, exit 78) a manifest that is not valid JSON or not a schema this
version reads, inversion defaults that
:class:`~deeprecon.runtime.inversion.InversionSettings` refuses (out of range, wrong
type), a listed file that is missing or whose size or SHA-256 changed, and any file in
the folder that the manifest does not list. An edit of the manifest itself
that keeps it valid and consistent is, by construction, a different bundle (another
identity): the run report records that identity.

No pickles. Programs are zip archives of JSON and raw tensor bytes; one that holds a
pickled member (example inputs, pickled weights or constants, custom objects, compiled
code) is refused before torch ever reads it, so loading a bundle never runs code from
its files. Weights are read with safetensors.

This module imports no torch (nor the trainer or the exporter): the manifest, the
weights (as numpy), :meth:`Bundle.artifact` and :meth:`Bundle.describe` work on a
machine without it; only :meth:`Bundle.load_program` needs torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from deeprecon.runtime.errors import BundleError, NoInputError, UnavailableError, UsageError
from deeprecon.runtime.inversion import LOSS_AND_GRAD, InversionSettings
from deeprecon.runtime.preprocess import PreprocessConfig
from deeprecon.runtime.publish import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "deeprecon-bundle"
SCHEMA_VERSION = 3
MANIFEST = "manifest.json"
BATCH = "batch"  # the name of the dynamic batch dimension in tensor shapes

# The graphs every bundle has, in pipeline order; the gradient graphs a bundle with ONNX
# graphs has (the onnxruntime runner needs them); the networks whose weights it stores.
GRAPH_NAMES = ("encoder", "generator", "segmenter", "lpips")
GRADIENT_GRAPHS = ("lpips_features", "hybrid_grad")
NETWORKS = ("encoder", "generator", "segmenter", "lpips")
ARTIFACT_KINDS = ("torch_program", "onnx", "tensorrt_plan")
# The inversion settings a manifest must give (name -> int or float): the fields of
# InversionSettings, which also holds their defaults and ranges.
INVERSION_KEYS: dict[str, type] = InversionSettings.field_types()
MANIFEST_KEYS = ("format", "schema_version", "name", "created", "model", "preprocess", "labels",
                 "inversion", "weights", "graphs", "files", "versions", "provenance")
MODEL_KEYS = ("preset", "resolution", "num_ws", "w_dim", "config")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_EXPORT_HINT = "export the bundle again: deeprecon-rt export SEG_RUN -o DIR"
_TORCH_HINT = "pip install 'deeprecon-rt[torch]' (or use a backend that needs no torch)"


# ----------------------------------------------------------------------------- tensor specs


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for numpy's ``dtype('float32')``, ``np.float32`` or torch's
    ``torch.float32``: the names manifests use."""
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        return np.dtype(dtype).name
    name = str(dtype)
    return name[len("torch."):] if name.startswith("torch.") else name


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph: its name, dtype name (``"float32"``) and shape,
    a tuple of ints and symbolic dimension names (``"batch"``)."""

    name: str
    dtype: str
    shape: tuple

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "TensorSpec":
        if not isinstance(d, Mapping) or set(d) != {"name", "dtype", "shape"}:
            raise BundleError(f"{where}: a tensor spec needs exactly name, dtype and shape, "
                              f"got {d!r}")
        name, dtype, shape = d["name"], d["dtype"], d["shape"]
        if not isinstance(name, str) or not name or not isinstance(dtype, str):
            raise BundleError(f"{where}: bad tensor name or dtype in {d!r}")
        if not isinstance(shape, list) or not all(
                (isinstance(s, int) and not isinstance(s, bool) and s >= 0)
                or (isinstance(s, str) and s) for s in shape):
            raise BundleError(f"{where}: tensor {name!r} has a bad shape {shape!r} (ints and "
                              f"dimension names)")
        return cls(name=name, dtype=dtype, shape=tuple(shape))

    def __str__(self) -> str:
        return f"{self.name} {self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class GraphSpec:
    """A graph of the bundle: its inputs and outputs (in call order), its artifacts by
    kind (``"torch_program"``, ``"onnx"``, ``"tensorrt_plan"``: dicts with at least
    ``"file"``, relative to the bundle), the networks whose weights it reads and its
    batch range {"min", "opt", "max"}. Graphs a runner composes have none of these."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    artifacts: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    weights: tuple[str, ...] = ()
    batch: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __hash__(self) -> int:  # artifacts is a dict: hash the files
        return hash((self.name, self.inputs, self.outputs, tuple(sorted(self.files.items()))))

    @property
    def files(self) -> dict[str, str]:
        """Artifact kind -> its file (relative to the bundle)."""
        return {kind: a["file"] for kind, a in self.artifacts.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "weights": list(self.weights),
                "batch": dict(self.batch), "artifacts": {k: dict(a) for k, a in self.artifacts.items()}}

    def check_feeds(self, feeds: Mapping[str, Any]) -> None:
        """Check ``feeds`` (input name -> numpy array or torch tensor) against the inputs:
        the same names, each with the spec's dtype (numpy or torch names), rank and
        fixed dimensions, and one value per symbolic dimension (``"batch"``) across all
        inputs. Raises UsageError naming the graph, the input, what was expected and
        what was given."""
        want = [t.name for t in self.inputs]
        missing = [n for n in want if n not in feeds]
        extra = sorted(set(feeds) - set(want))
        if missing or extra:
            raise UsageError(f"graph {self.name!r}: expected the inputs {want}, got "
                             f"{sorted(feeds)}"
                             + (f" (missing {missing})" if missing else "")
                             + (f" (unknown {extra})" if extra else ""))
        symbols: dict[str, tuple[str, int]] = {}
        for spec in self.inputs:
            x = feeds[spec.name]
            try:
                shape = tuple(int(d) for d in x.shape)
                dtype = dtype_name(x.dtype)
            except (AttributeError, TypeError):
                raise UsageError(f"graph {self.name!r} input {spec.name!r}: expected an array "
                                 f"{spec}, got a {type(x).__name__}") from None
            if dtype != spec.dtype:
                raise UsageError(f"graph {self.name!r} input {spec.name!r}: expected dtype "
                                 f"{spec.dtype}, got {dtype}")
            if len(shape) != len(spec.shape):
                raise UsageError(f"graph {self.name!r} input {spec.name!r}: expected shape "
                                 f"{_fmt_shape(spec.shape)} ({len(spec.shape)} dimensions), got "
                                 f"{list(shape)}")
            for axis, (w, g) in enumerate(zip(spec.shape, shape)):
                if isinstance(w, str):
                    if g < 1:
                        raise UsageError(f"graph {self.name!r} input {spec.name!r}: dimension "
                                         f"{axis} ({w}) must be >= 1, got {list(shape)}")
                    first = symbols.setdefault(w, (spec.name, g))
                    if first[1] != g:
                        raise UsageError(f"graph {self.name!r}: dimension {w!r} is {g} in input "
                                         f"{spec.name!r} but {first[1]} in input {first[0]!r}")
                elif w != g:
                    raise UsageError(f"graph {self.name!r} input {spec.name!r}: expected shape "
                                     f"{_fmt_shape(spec.shape)}, got {list(shape)} (dimension "
                                     f"{axis})")


def _fmt_shape(shape: tuple) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def graph_specs(*, resolution: int, num_ws: int, w_dim: int, n_classes: int,
                lpips_shapes: list[tuple[int, int, int]] | None = None
                ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The inputs and outputs of a bundle's graphs for a model grid of ``resolution``
    px, w+ of ``[num_ws, w_dim]`` and ``n_classes`` labels, as the manifest writes them
    (the exporter writes these; the loader checks them).

    encoder:   image float32 [batch, 1, R, R] in [-1, 1] -> w float32 [batch, L, C]
    generator: w float32 [batch, L, C] -> image float32 [batch, 1, R, R]
    segmenter: image float32 [batch, 1, R, R] -> logits float32 [batch, K, R, R]
    lpips:     x, y float32 [batch, 1, R, R] in [-1, 1] -> distance float32 [batch]

    With ``lpips_shapes`` (C, H, W) of each LPIPS feature map, also the gradient graphs:

    lpips_features: x [batch, 1, R, R] -> fx0, fx1, ... [batch, C_k, H_k, W_k]
                    (unit-normalised over channels)
    hybrid_grad:    w [batch, L, C], x, roi [batch, 1, R, R], fx0 ... (the features
                    of x), lambdas [3] (lambda1, lambda2, lambda3), ncc_window int64 [1]
                    -> loss [batch] (the inversion loss, deeprecon.runtime.inversion),
                       grad [batch, L, C] (dloss/dw)
    """
    r, f = resolution, "float32"
    image = [BATCH, 1, r, r]
    w = [BATCH, num_ws, w_dim]

    def t(name: str, shape: list, dtype: str = f) -> dict[str, Any]:
        return {"name": name, "dtype": dtype, "shape": list(shape)}

    specs = {
        "encoder": {"inputs": [t("image", image)], "outputs": [t("w", w)]},
        "generator": {"inputs": [t("w", w)], "outputs": [t("image", image)]},
        "segmenter": {"inputs": [t("image", image)],
                      "outputs": [t("logits", [BATCH, n_classes, r, r])]},
        "lpips": {"inputs": [t("x", image), t("y", image)], "outputs": [t("distance", [BATCH])]},
    }
    if lpips_shapes is not None:
        fx = [t(f"fx{k}", [BATCH, *map(int, shape)]) for k, shape in enumerate(lpips_shapes)]
        specs["lpips_features"] = {"inputs": [t("x", image)], "outputs": fx}
        specs["hybrid_grad"] = {"inputs": [t("w", w), t("x", image), t("roi", image), *fx,
                                           t("lambdas", [3]), t("ncc_window", [1], "int64")],
                                "outputs": [t("loss", [BATCH]), t("grad", w)]}
    return specs


def gradient_graph_specs(*, resolution: int, num_ws: int, w_dim: int
                         ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The inputs and outputs of the graph the inversion runs over, in the format of
    :func:`graph_specs`::

        loss_and_grad: x, roi float32 [batch, 1, R, R], w float32 [batch, L, C]
                       -> loss float32 [batch], grad float32 [batch, L, C] (dloss/dw)

    with the loss weights (lambda1, lambda2, lambda3, ncc_window) as attributes
    (:mod:`deeprecon.runtime.inversion`). A bundle does not hold it as one graph: each
    runner composes it (the onnxruntime runner from the bundle's ``lpips_features`` graph,
    once per image, and its ``hybrid_grad`` graph; the torch runner by autograd through
    the generator, the encoder and LPIPS programs with the fused kernel).
    """
    image = [BATCH, 1, resolution, resolution]
    w = [BATCH, num_ws, w_dim]

    def t(name: str, shape: list) -> dict[str, Any]:
        return {"name": name, "dtype": "float32", "shape": list(shape)}

    return {LOSS_AND_GRAD: {"inputs": [t("x", image), t("roi", image), t("w", w)],
                            "outputs": [t("loss", [BATCH]), t("grad", w)]}}


# ----------------------------------------------------------------------------- files


def check_relpath(rel: Any, where: str) -> str:
    """A bundle-relative POSIX path: not absolute, no ``..``, no empty part, not the
    manifest. Raises BundleError otherwise; returns it."""
    if not isinstance(rel, str) or not rel or "\\" in rel:
        raise BundleError(f"{where}: bad file path {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")) or rel == MANIFEST:
        raise BundleError(f"{where}: file path {rel!r} leaves the bundle or names the manifest")
    return rel


# Members of a torch.export archive (after its root folder) that hold pickles or code.
_CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia/", "xl_model_weights/")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".so", ".dll", ".dylib")
_PAYLOAD_PREFIXES = {"data/weights/": "weight_", "data/constants/": "tensor_"}


def check_program_archive(path: str | Path, name: str | None = None) -> None:
    """Refuse (BundleError) a torch.export archive (``.pt2``) that holds anything torch
    would unpickle or run: non-empty example inputs (``data/sample_inputs/*.pt``), a
    weight or constant whose config entry says ``"use_pickle": true`` or that is a
    custom or opaque object, compiled code, or any other ``*.pt``/``*.pkl``/``*.so``
    member. Reads only the zip directory and the two JSON payload configs."""
    path = Path(path)
    name = name or path.name
    bad: list[str] = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                inner = "/".join(parts[1:]) if len(parts) > 1 else info.filename
                low = inner.lower()
                if info.is_dir():
                    continue
                if low.startswith("data/sample_inputs/"):
                    if info.file_size:
                        bad.append(f"{info.filename} (pickled example inputs)")
                    continue
                if low.startswith(_CODE_DIRS):
                    bad.append(f"{info.filename} (compiled code or non-export payload)")
                    continue
                if low.endswith(_PICKLE_SUFFIXES):
                    bad.append(f"{info.filename} (pickle or shared library)")
                    continue
                for folder, prefix in _PAYLOAD_PREFIXES.items():
                    if low.startswith(folder) and low.endswith("_config.json"):
                        bad += _pickled_payloads(zf, info.filename, prefix)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise BundleError(f"program {name} is not a readable torch.export archive: {e}",
                          hint=_EXPORT_HINT) from None
    if bad:
        raise BundleError(f"program {name} holds pickled data or code, which a bundle must "
                          f"not: {', '.join(bad)}", hint=_EXPORT_HINT)


def _pickled_payloads(zf: zipfile.ZipFile, member: str, prefix: str) -> list[str]:
    """Entries of a torch.export weights/constants config that torch would unpickle."""
    try:
        config = json.loads(zf.read(member))
        entries = config["config"]
        if not isinstance(entries, dict):
            raise ValueError("config is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        return [f"{member} (unreadable: {e})"]
    bad = []
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            bad.append(f"{member}:{fqn} (unreadable entry)")
        elif meta.get("use_pickle") is not False:
            bad.append(f"{fqn} (use_pickle: {meta.get('use_pickle')})")
        elif not str(meta.get("path_name", "")).startswith(prefix):
            bad.append(f"{fqn} (stored as {meta.get('path_name')!r}, not a raw tensor)")
    return bad


# ----------------------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class Bundle:
    """A loaded (and, unless ``verify=False``, verified) model bundle.

    path:        the bundle folder.
    manifest:    manifest.json as parsed (treat as read-only).
    sha256:      SHA-256 of manifest.json's bytes: the bundle's identity.
    preprocess:  how studies are brought onto the model grid.
    graphs:      the graphs by name (``encoder``, ``generator``, ``segmenter``, ``lpips``).
    labels:      label value -> name (0 background, 1 LV cavity, 2 LV myocardium, 3 RV cavity).
    inversion:   the inversion defaults (steps, lr, lambda1..3, ncc_window, early stop,
                 roi_dilation_mm, batch).
    name, preset, resolution (R), num_ws (L), w_dim (C): the model.
    """

    path: Path
    manifest: dict
    sha256: str
    preprocess: PreprocessConfig
    graphs: dict[str, GraphSpec]
    labels: dict[int, str]
    inversion: dict
    name: str
    preset: str
    resolution: int
    num_ws: int
    w_dim: int

    def __hash__(self) -> int:  # the manifest identifies the bundle (dict fields are unhashable)
        return hash((str(self.path), self.sha256))

    # --------------------------------------------------------------- files

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """Every file but the manifest: relative path -> {"sha256", "bytes"}."""
        return self.manifest["files"]

    def file(self, relpath: str) -> Path:
        """The path of a file the manifest lists (BundleError for any other)."""
        if relpath not in self.files:
            raise BundleError(f"bundle {self.path} lists no file {relpath!r}")
        return self.path / relpath

    def _checked_file(self, relpath: str) -> Path:
        """:meth:`file`, after checking its size and SHA-256 against the manifest."""
        p = self.file(relpath)
        _check_file(self.path, relpath, self.files[relpath])
        return p

    def verify(self) -> None:
        """Check every listed file (present, same size and SHA-256), that the folder holds
        no file the manifest does not list, and that no program holds a pickle.
        Raises BundleError naming the first file that fails."""
        for rel, entry in self.files.items():
            _check_file(self.path, rel, entry)
        unlisted = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_symlink():
                raise BundleError(f"bundle {self.path}: {rel} is a symbolic link; bundle files "
                                  f"must be regular files", hint=_EXPORT_HINT)
            if p.is_file() and rel != MANIFEST and rel not in self.files:
                unlisted.append(rel)
        if unlisted:
            raise BundleError(f"bundle {self.path} holds files its manifest does not list: "
                              f"{', '.join(unlisted)}",
                              hint="remove them, or export the bundle again")
        for spec in self.graphs.values():
            rel = spec.files.get("torch_program")
            if rel is not None:
                check_program_archive(self.path / rel, rel)

    # --------------------------------------------------------------- graphs

    def graph(self, name: str) -> GraphSpec:
        """The spec of graph ``name`` (UsageError naming the graphs for an unknown one)."""
        try:
            return self.graphs[name]
        except KeyError:
            raise UsageError(f"bundle {self.name!r} has no graph {name!r}",
                             hint=f"graphs: {', '.join(self.graphs)}") from None

    def artifact(self, graph: str, kind: str) -> tuple[Path, dict[str, Any]]:
        """The verified file of ``graph``'s artifact ``kind`` (``"onnx"``,
        ``"torch_program"``) and its manifest entry. The file's and the graph's weight
        files' sizes and SHA-256 are checked again (an ONNX graph reads its weights
        from them). BundleError naming what is missing: a graph the bundle lacks (the
        gradient graphs come with ONNX export) or an artifact it was exported without."""
        if graph not in GRAPH_NAMES + GRADIENT_GRAPHS:
            self.graph(graph)  # UsageError: not a graph of any bundle
        if graph not in self.graphs:
            raise BundleError(f"bundle {self.name!r} has no graph {graph!r} (graphs: "
                              f"{', '.join(self.graphs)}); it was exported without it",
                              hint=_EXPORT_HINT)
        spec = self.graphs[graph]
        entry = spec.artifacts.get(kind)
        if entry is None:
            raise BundleError(f"bundle {self.name!r}: graph {graph!r} has no {kind} artifact "
                              f"(it has: {', '.join(spec.artifacts) or 'none'})",
                              hint=_EXPORT_HINT)
        for net in spec.weights:
            self._checked_file(self.manifest["weights"][net])
        return self._checked_file(entry["file"]), dict(entry)

    def load_program(self, graph: str, *, device: "str | torch.device" = "cpu") -> "BoundProgram":
        """The torch.export program of ``graph`` with its weights, as a callable on
        ``device``: ``program(*inputs)`` in the order of the graph's inputs (which
        :meth:`GraphSpec.check_feeds` can check). The weights come from the bundle's
        safetensors files (the program takes them as leading inputs) and require no
        grad: gradients flow to the inputs (inversion uses them).

        Re-checks the files' SHA-256 and refuses a program with a pickled member before
        torch reads it (BundleError). Needs torch (UnavailableError naming the ``torch``
        extra when it is missing); a CUDA device must be available (UnavailableError).
        """
        path, entry = self.artifact(graph, "torch_program")
        rel = entry["file"]
        check_program_archive(path, rel)
        try:
            import torch
        except ImportError:
            raise UnavailableError("loading a bundle's torch programs needs torch, which is "
                                   "not installed", hint=_TORCH_HINT) from None
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise UsageError(f"bad device {device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UnavailableError(f"device {device!r} asked for, but torch {torch.__version__} "
                                   f"sees no CUDA device", hint="use --device cpu")
        weights = {net: self.load_weights(net) for net in {n for n, _ in entry["state"]}}
        try:
            state = [torch.from_numpy(weights[net][key]).to(dev) for net, key in entry["state"]]
        except KeyError as e:
            raise BundleError(f"bundle {self.name!r}: program {rel} takes the weight {e}, "
                              f"which its weight file lacks", hint=_EXPORT_HINT) from None
        try:
            program = torch.export.load(str(path))
            if dev.type != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, dev)
            module = program.module()
        except Exception as e:  # noqa: BLE001 - any failure to read the archive is a bad bundle
            raise BundleError(f"bundle {self.name!r}: cannot load program {rel}: "
                              f"{type(e).__name__}: {e}", hint=_EXPORT_HINT) from None
        module.to(dev)
        for p in module.parameters():
            p.requires_grad_(False)
        log.debug("loaded program %s of bundle %s on %s", rel, self.name, dev)
        return BoundProgram(module, state)

    def load_weights(self, network: str) -> dict[str, np.ndarray]:
        """The float32 weights of ``network`` (``encoder``, ``generator``, ``segmenter``,
        ``lpips``) as numpy arrays (safetensors; the file's SHA-256 is checked first).
        The generator's also holds ``w_avg`` [w_dim], the centre of its latent space."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        rel = self.manifest["weights"].get(network)
        if rel is None:
            raise UsageError(f"bundle {self.name!r} has no weights of {network!r}",
                             hint=f"networks: {', '.join(self.manifest['weights'])}")
        path = self._checked_file(rel)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(f"bundle {self.name!r}: cannot read {rel}: {e}",
                              hint=_EXPORT_HINT) from None

    # --------------------------------------------------------------- description

    def describe(self) -> dict[str, Any]:
        """What ``deeprecon-rt bundle info`` prints: JSON-serialisable."""
        m = self.manifest
        return {
            "name": self.name, "path": str(self.path), "sha256": self.sha256,
            "created": m["created"], "preset": self.preset, "resolution": self.resolution,
            "num_ws": self.num_ws, "w_dim": self.w_dim,
            "preprocess": self.preprocess.to_dict(),
            "labels": {str(k): v for k, v in self.labels.items()},
            "inversion": dict(self.inversion),
            "graphs": {n: {"inputs": [str(t) for t in g.inputs],
                           "outputs": [str(t) for t in g.outputs], "files": dict(g.files),
                           "weights": list(g.weights), "batch": dict(g.batch),
                           "checks": {k: a.get("check") for k, a in g.artifacts.items()}}
                       for n, g in self.graphs.items()},
            "weights": dict(m["weights"]),
            "files": {rel: e["bytes"] for rel, e in self.files.items()},
            "bytes": sum(e["bytes"] for e in self.files.values()),
            "versions": dict(m["versions"]), "provenance": m["provenance"],
        }


class BoundProgram:
    """A loaded torch program with its weights bound: ``program(*inputs)`` calls the
    module with the weights first (:meth:`Bundle.load_program`)."""

    def __init__(self, module: Any, state: list):
        self.module = module
        self.state = state

    def __call__(self, *inputs: Any) -> Any:
        return self.module(*self.state, *inputs)


def _check_file(root: Path, rel: str, entry: Mapping[str, Any]) -> None:
    p = root / rel
    if p.is_symlink() or not p.is_file():
        raise BundleError(f"bundle {root}: {rel} is missing"
                          + (" (a symbolic link)" if p.is_symlink() else ""), hint=_EXPORT_HINT)
    size = p.stat().st_size
    if size != entry["bytes"]:
        raise BundleError(f"bundle {root}: {rel} changed since export ({size} bytes, the "
                          f"manifest says {entry['bytes']})", hint=_EXPORT_HINT)
    try:
        digest = sha256_file(p)
    except OSError as e:
        raise BundleError(f"bundle {root}: cannot read {rel}: {e.strerror or e}") from None
    if digest != entry["sha256"]:
        raise BundleError(f"bundle {root}: {rel} changed since export (its SHA-256 is "
                          f"{digest}, the manifest says {entry['sha256']})", hint=_EXPORT_HINT)


# ----------------------------------------------------------------------------- loading


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read the bundle folder at ``path``.

    Parses and validates manifest.json (format, schema version, keys, specs consistent
    with the model) and, with ``verify`` (the default), checks every file with
    :meth:`Bundle.verify`: SHA-256 and size of every listed file, no unlisted file, no
    pickle in a program. ``verify=False`` only reads the manifest (for a quick look);
    :meth:`Bundle.load_program` and :meth:`Bundle.load_weights` check their own file's
    hash either way.

    Raises NoInputError (exit 66) when ``path`` does not exist, BundleError (exit 78)
    for anything wrong with the bundle.
    """
    path = Path(path)
    if not path.exists():
        raise NoInputError(f"model bundle {path} does not exist")
    if not path.is_dir():
        raise BundleError(f"{path} is not a model bundle (a bundle is a folder with {MANIFEST})")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path} is not a model bundle: it has no {MANIFEST}",
                          hint="make one with: deeprecon-rt export SEG_RUN -o DIR")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{mpath} is not valid JSON: {e}", hint=_EXPORT_HINT) from None
    bundle = _parse(path, manifest, hashlib.sha256(raw).hexdigest())
    if verify:
        bundle.verify()
    return bundle


def _need(d: Mapping[str, Any], key: str, kind: type | tuple, where: str) -> Any:
    if key not in d:
        raise BundleError(f"{where}: missing key {key!r}", hint=_EXPORT_HINT)
    v = d[key]
    ok = isinstance(v, kind) and not (isinstance(v, bool) and kind in (int, float, (int, float)))
    if not ok:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise BundleError(f"{where}: {key!r} must be "
                          f"{' or '.join(k.__name__ for k in kinds)}, got {v!r}",
                          hint=_EXPORT_HINT)
    return v


def _parse(path: Path, m: Any, sha: str) -> Bundle:
    where = f"{path / MANIFEST}"
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise BundleError(f"{where}: not a {BUNDLE_FORMAT} manifest (format {got!r})")
    version = _need(m, "schema_version", int, where)
    if version > SCHEMA_VERSION:
        raise BundleError(f"{where}: schema version {version} is newer than this deeprecon-rt "
                          f"reads ({SCHEMA_VERSION})", hint="upgrade deeprecon-rt")
    if version < 1:
        raise BundleError(f"{where}: bad schema version {version}")
    if version < SCHEMA_VERSION:
        raise BundleError(f"{where}: a schema-{version} bundle; this deeprecon-rt reads schema "
                          f"{SCHEMA_VERSION} (weights stored once, ONNX graphs, the inversion's loss "
                          f"and gradient in one graph)",
                          hint="export it again from its training runs with this version: "
                               "deeprecon-rt export SEG_RUN -o DIR")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise BundleError(f"{where}: missing keys {missing}", hint=_EXPORT_HINT)
    name = _need(m, "name", str, where)
    _need(m, "created", str, where)

    model = _need(m, "model", dict, where)
    preset = _need(model, "preset", str, f"{where} model")
    r, num_ws, w_dim = (_need(model, k, int, f"{where} model") for k in ("resolution", "num_ws", "w_dim"))
    if min(r, num_ws, w_dim) < 1:
        raise BundleError(f"{where}: bad model dimensions {model!r}")
    config = _need(model, "config", dict, f"{where} model")

    try:
        preprocess = PreprocessConfig.from_dict(_need(m, "preprocess", dict, where))
    except (UsageError, TypeError) as e:
        raise BundleError(f"{where}: bad preprocess: {e}", hint=_EXPORT_HINT) from None
    if preprocess.size != r:
        raise BundleError(f"{where}: the preprocessing grid is {preprocess.size} px, the "
                          f"model's resolution {r}")
    if config.get("preprocess", m["preprocess"]) != m["preprocess"]:
        raise BundleError(f"{where}: model config and preprocess disagree")

    raw_labels = _need(m, "labels", dict, where)
    try:
        labels = {int(k): v for k, v in raw_labels.items()}
    except ValueError:
        raise BundleError(f"{where}: label values must be integers, got {sorted(raw_labels)}") from None
    if sorted(labels) != list(range(len(labels))) or not all(isinstance(v, str) for v in labels.values()):
        raise BundleError(f"{where}: labels must map 0 .. K-1 to names, got {raw_labels!r}")

    inversion = _need(m, "inversion", dict, where)
    for key, kind in INVERSION_KEYS.items():
        _need(inversion, key, (int, float) if kind is float else kind, f"{where} inversion")
    try:
        InversionSettings.from_manifest(inversion)
    except UsageError as e:
        raise BundleError(f"{where}: bad inversion defaults: {e.message}",
                          hint=_EXPORT_HINT) from None

    files = _need(m, "files", dict, where)
    for rel, entry in files.items():
        check_relpath(rel, where)
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: file entry {rel!r} must be an object, got {entry!r}")
        digest = _need(entry, "sha256", str, f"{where} files[{rel!r}]")
        if not _SHA256_RE.fullmatch(digest):
            raise BundleError(f"{where}: files[{rel!r}] has a bad sha256 {digest!r}",
                              hint=_EXPORT_HINT)
        if _need(entry, "bytes", int, f"{where} files[{rel!r}]") < 0:
            raise BundleError(f"{where}: files[{rel!r}] has a negative size")

    weights = _need(m, "weights", dict, where)
    if sorted(weights) != sorted(NETWORKS):
        raise BundleError(f"{where}: weights must name the files of {list(NETWORKS)}, got "
                          f"{sorted(weights)}", hint=_EXPORT_HINT)
    for net, rel in weights.items():
        if not isinstance(rel, str) or rel not in files:
            raise BundleError(f"{where}: the weights of {net!r} ({rel!r}) are not in the "
                              f"manifest's files")

    raw_graphs = _need(m, "graphs", dict, where)
    absent = [g for g in GRAPH_NAMES if g not in raw_graphs]
    if absent:
        raise BundleError(f"{where}: missing graphs {absent}", hint=_EXPORT_HINT)
    unknown = [g for g in raw_graphs if g not in GRAPH_NAMES + GRADIENT_GRAPHS]
    if unknown:
        raise BundleError(f"{where}: unknown graphs {unknown}", hint=_EXPORT_HINT)
    if any(g in raw_graphs for g in GRADIENT_GRAPHS) and not all(g in raw_graphs for g in GRADIENT_GRAPHS):
        raise BundleError(f"{where}: the gradient graphs {list(GRADIENT_GRAPHS)} come together",
                          hint=_EXPORT_HINT)
    lpips_shapes = None
    if "lpips_features" in raw_graphs:
        lpips_shapes = _feature_shapes(raw_graphs["lpips_features"], f"{where} graphs['lpips_features']")
    expected = graph_specs(resolution=r, num_ws=num_ws, w_dim=w_dim, n_classes=len(labels),
                           lpips_shapes=lpips_shapes)
    graphs: dict[str, GraphSpec] = {}
    for gname, g in raw_graphs.items():
        gw = f"{where} graphs[{gname!r}]"
        if not isinstance(g, dict):
            raise BundleError(f"{gw}: must be an object")
        inputs = tuple(TensorSpec.from_dict(t, gw) for t in _need(g, "inputs", list, gw))
        outputs = tuple(TensorSpec.from_dict(t, gw) for t in _need(g, "outputs", list, gw))
        want = expected[gname]
        got = {"inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs]}
        if got != want:
            raise BundleError(f"{gw}: the tensor specs {got} do not match the model "
                              f"(R {r}, w+ [{num_ws}, {w_dim}], {len(labels)} labels): "
                              f"expected {want}", hint=_EXPORT_HINT)
        nets = _need(g, "weights", list, gw)
        if not nets or any(n not in weights for n in nets):
            raise BundleError(f"{gw}: weights must name networks of {list(NETWORKS)}, got {nets!r}")
        batch = _need(g, "batch", dict, gw)
        lo, opt, hi = (_need(batch, k, int, f"{gw} batch") for k in ("min", "opt", "max"))
        if not 1 <= lo <= opt <= hi:
            raise BundleError(f"{gw}: bad batch range {batch!r} (1 <= min <= opt <= max)")
        artifacts = _need(g, "artifacts", dict, gw)
        if not artifacts:
            raise BundleError(f"{gw}: has no artifacts", hint=_EXPORT_HINT)
        for kind, a in artifacts.items():
            _check_artifact(kind, a, files, nets, f"{gw} artifacts[{kind!r}]")
        graphs[gname] = GraphSpec(name=gname, inputs=inputs, outputs=outputs,
                                  artifacts={k: dict(a) for k, a in artifacts.items()},
                                  weights=tuple(nets), batch={"min": lo, "opt": opt, "max": hi})

    _need(m, "versions", dict, where)
    prov = _need(m, "provenance", dict, where)
    _need(prov, "runs", dict, f"{where} provenance")
    if prov.get("command") is not None and not isinstance(prov["command"], str):
        raise BundleError(f"{where}: provenance command must be a string or null")

    return Bundle(path=path, manifest=m, sha256=sha, preprocess=preprocess, graphs=graphs,
                  labels=labels, inversion=dict(inversion), name=name, preset=preset,
                  resolution=r, num_ws=num_ws, w_dim=w_dim)


def _feature_shapes(g: Any, where: str) -> list[tuple[int, int, int]]:
    """(C, H, W) of each output of the lpips_features graph (checked again with the
    whole spec by the caller)."""
    outputs = _need(g, "outputs", list, where) if isinstance(g, dict) else None
    if not outputs:
        raise BundleError(f"{where}: needs its outputs", hint=_EXPORT_HINT)
    shapes = []
    for t in outputs:
        shape = t.get("shape") if isinstance(t, dict) else None
        if (not isinstance(shape, list) or len(shape) != 4 or shape[0] != BATCH
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                           for d in shape[1:])):
            raise BundleError(f"{where}: a feature map must be [batch, C, H, W], got {t!r}")
        shapes.append(tuple(shape[1:]))
    return shapes


def _check_artifact(kind: str, a: Any, files: Mapping[str, Any], nets: list, where: str) -> None:
    if kind not in ARTIFACT_KINDS:
        raise BundleError(f"{where}: unknown artifact kind (known: {', '.join(ARTIFACT_KINDS)})",
                          hint="upgrade deeprecon-rt")
    if not isinstance(a, dict):
        raise BundleError(f"{where}: must be an object")
    rel = _need(a, "file", str, where)
    if rel not in files:
        raise BundleError(f"{where}: its file {rel!r} is not in the manifest's files")
    if kind == "onnx":
        if _need(a, "opset", int, where) < 1:
            raise BundleError(f"{where}: bad opset {a['opset']!r}")
    elif kind == "torch_program":
        state = _need(a, "state", list, where)
        if not all(isinstance(e, list) and len(e) == 2 and e[0] in nets and isinstance(e[1], str)
                   for e in state):
            raise BundleError(f"{where}: state must list [network, key] pairs of the graph's "
                              f"networks {nets}")
    else:  # tensorrt_plan: built for one TensorRT version and GPU architecture
        _need(a, "tensorrt", str, where)
        _need(a, "compute_capability", str, where)


# ----------------------------------------------------------------------------- shipped bundle


#: where the reference bundle ships inside the package (setup.py's package_data
#: ``models/reference/**``; an editable install reads it from the source tree)
SHIPPED_BUNDLE = Path(__file__).resolve().parent / "models" / "reference"
#: environment variable naming a site-wide default bundle (before the shipped one)
BUNDLE_ENV = "DEEPRECON_BUNDLE"


def default_bundle_path() -> Path:
    """The bundle used when none is given (``--bundle`` omitted, ``Reconstructor(None)``).

    1. ``$DEEPRECON_BUNDLE`` when it is set and not empty: a site-wide default. A value
       that is not a bundle folder (no ``manifest.json``) is an UnavailableError naming
       the variable: never a silent fallback to the shipped bundle.
    2. the reference bundle shipped inside the package
       (``deeprecon/runtime/models/reference``); UnavailableError while none ships.

    Only the folder is checked here; :func:`load_bundle` verifies its files.
    """
    env = os.environ.get(BUNDLE_ENV, "")
    if env.strip():
        path = Path(env).expanduser()
        if not (path / MANIFEST).is_file():
            what = "does not exist" if not path.exists() else f"holds no {MANIFEST}"
            raise UnavailableError(
                f"{BUNDLE_ENV}={env} is not a model bundle folder (it {what})",
                hint=f"point {BUNDLE_ENV} at a bundle folder, pass --bundle DIR, or unset "
                     f"{BUNDLE_ENV} to use the shipped reference bundle")
        return path.resolve()
    path = SHIPPED_BUNDLE
    if not (path / MANIFEST).is_file():
        raise UnavailableError("no reference bundle ships with this version yet",
                               hint="pass --bundle DIR; make one with "
                                    "`deeprecon-rt export SEG_RUN -o DIR`")
    return path


def validation_summary(provenance: Mapping[str, Any] | None) -> tuple[str, bool | None] | None:
    """The validation a bundle's provenance records (``validation``, written at export with
    ``--describe``) as one line, ``"Dice LVC 0.914 / LVM 0.817 / RVC 0.803 on 20 ACDC
    validation patients"``, and whether it meets the project's bar (None: not recorded).
    None when no per-structure Dice is recorded. What ``bundle info``, the results'
    warning and the report header say of the model."""
    val = (provenance or {}).get("validation")
    if not isinstance(val, dict) or not isinstance(val.get("dice"), dict):
        return None
    figures = " / ".join(f"{k} {v:.3g}" for k, v in val["dice"].items()
                         if isinstance(v, (int, float)))
    text = (f"Dice {figures or '?'} on {val.get('patients', '?')} "
            f"{val.get('dataset', '')} validation patients")
    met = val.get("meets_bar")
    return text, met if isinstance(met, bool) else None


__all__ = ["BUNDLE_FORMAT", "SCHEMA_VERSION", "MANIFEST", "BATCH", "GRAPH_NAMES",
           "GRADIENT_GRAPHS", "NETWORKS", "ARTIFACT_KINDS", "BoundProgram",
           "INVERSION_KEYS", "TensorSpec", "GraphSpec", "Bundle", "load_bundle",
           "graph_specs", "gradient_graph_specs", "check_program_archive",
           "default_bundle_path", "validation_summary",
           "SHIPPED_BUNDLE", "BUNDLE_ENV",
           "dtype_name"]
