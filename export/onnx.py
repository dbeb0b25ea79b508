"""torch.export and ONNX export of the networks, with verification against PyTorch.

Runtime-independent helpers: the network tests use them now, and the bundle exporter
uses them to write the ``torch.export`` programs and ONNX graphs of a model bundle.
Export goes through ``torch.export`` (``torch.onnx.export(..., dynamo=True)``), with
the batch dimension dynamic by default. The exporter's per-node provenance (the Python
stack trace, with this checkout's absolute paths and line numbers, and the FX node) is
removed from the written graph: it is not read by any runtime, and without it the same
network gives the same bytes from any checkout. :func:`verify_onnx` runs the written
graph in onnxruntime on the CPU and compares it with the PyTorch module on the same
inputs, stating the maximum absolute and relative error and refusing one above tolerance.

torch, onnx and onnxruntime are imported lazily, inside the functions that need them.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from deeprecon.runtime.errors import DeepreconError, UnavailableError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

BATCH_DIM_NAME = "batch"
MAX_BATCH = 4096  # upper bound of the dynamic batch dimension


class ExportVerificationError(DeepreconError):
    """An exported graph disagrees with the PyTorch module beyond the stated tolerance."""


def _batch_dynamic_shapes(model, example_inputs: tuple, dynamic_batch: bool,
                          batch_inputs: Sequence[bool] | None = None):
    """``dynamic_shapes`` for torch.export: dim 0 of every tensor input (or of those
    ``batch_inputs`` marks) is one shared batch Dim; None when ``dynamic_batch`` is False.
    A ``forward(a, *rest)`` gets the nested structure torch.export wants."""
    import inspect

    import torch

    if not dynamic_batch:
        return None
    if batch_inputs is None:
        batch_inputs = [isinstance(x, torch.Tensor) for x in example_inputs]
    if len(batch_inputs) != len(example_inputs):
        raise ValueError(f"{len(batch_inputs)} batch flags for {len(example_inputs)} inputs")
    batch = torch.export.Dim(BATCH_DIM_NAME, min=1, max=MAX_BATCH)
    flat = tuple({0: batch} if b else None for b in batch_inputs)
    params = list(inspect.signature(model.forward).parameters.values())
    fixed = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return (*flat[:len(fixed)], flat[len(fixed):])
    return flat


def export_program(model: "torch.nn.Module", example_inputs: tuple, *,
                   dynamic_batch: bool = True, batch_inputs: Sequence[bool] | None = None
                   ) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``model`` (switched to eval mode) on ``example_inputs``, with
    dim 0 of every tensor input (or of those ``batch_inputs`` marks) as one dynamic batch
    dimension (1 .. MAX_BATCH).

    The example batch should be >= 2 (a batch of 1 would be specialised by the tracer).
    """
    import torch

    model = model.eval()
    t0 = time.perf_counter()
    dynamic_shapes = _batch_dynamic_shapes(model, example_inputs, dynamic_batch, batch_inputs)
    program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    log.debug("torch.export of %s in %.2f s", type(model).__name__, time.perf_counter() - t0)
    return program


def export_onnx(model: "torch.nn.Module | torch.export.ExportedProgram", example_inputs: tuple,
                path: str | Path, *,
                input_names: Sequence[str], output_names: Sequence[str],
                dynamic_batch: bool = True, opset: int | None = None,
                external_data: bool = False, optimize: bool = True) -> Path:
    """Write ``model`` (switched to eval mode) as an ONNX graph at ``path``; returns the path.

    ``model`` may also be the program of :func:`export_program` (traced once, reused; its
    dynamic dimensions are the ones it was exported with, ``dynamic_batch`` is ignored).

    Traced by ``torch.onnx.export(..., dynamo=True)`` on ``example_inputs`` (a tuple of
    tensors, batch >= 2 when ``dynamic_batch``), with the given input and output names;
    with ``dynamic_batch`` dim 0 of every input and output is the symbolic "batch".
    ``opset`` None uses the exporter's recommended opset. ``external_data`` False keeps
    the weights inside the .onnx file (ONNX's 2 GB protobuf limit applies). ``optimize``
    False skips the exporter's graph optimisation, whose constant folding turns
    weight x gain products into new constants: a bundle keeps the plain weights, so that
    they can be stored once (:func:`link_external_weights`), and lets onnxruntime fold
    them when it opens the graph.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(input_names) != len(example_inputs):
        raise ValueError(f"{len(input_names)} input names for {len(example_inputs)} inputs")
    if isinstance(model, torch.export.ExportedProgram):
        dyn = None
    else:
        model = model.eval()
        dyn = _batch_dynamic_shapes(model, example_inputs, dynamic_batch)
        if dyn is not None:
            dyn = {name: d for name, d in zip(_forward_arg_names(model, len(dyn)), dyn)}
    t0 = time.perf_counter()
    for name in ("onnx_ir", "onnxscript"):  # their INFO lines name every rewrite
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    program = torch.onnx.export(model, tuple(example_inputs), dynamo=True, verbose=False,
                                input_names=list(input_names), output_names=list(output_names),
                                opset_version=opset, dynamic_shapes=dyn,
                                external_data=external_data, optimize=optimize)
    program.save(str(path), external_data=external_data)
    strip_node_metadata(path)
    log.info("ONNX export of %s -> %s in %.2f s", _name(model), path,
             time.perf_counter() - t0)
    return path


def _name(model) -> str:
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        return f"ExportedProgram({type(model.module()).__name__})"
    return type(model).__name__


def _forward_arg_names(model, n: int) -> list[str]:
    """The names of the first ``n`` parameters of ``model.forward`` (dynamic_shapes keys)."""
    import inspect

    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if len(params) < n:
        raise ValueError(f"{type(model).__name__}.forward takes {len(params)} positional "
                         f"arguments, got {n} example inputs")
    return params[:n]


def verify_onnx(path: str | Path, model: "torch.nn.Module", inputs: tuple, *,
                rtol: float = 1e-4, atol: float = 0.0) -> dict[str, Any]:
    """Run the ONNX graph at ``path`` in onnxruntime (CPUExecutionProvider) on ``inputs``
    and compare every output with ``model(*inputs)`` (eval mode, no grad, on the CPU).

    The relative error is relative to the largest |reference| of each output:
    ``max|onnx - torch| / max|torch|``. Passes when, for every output,
    ``max_abs_err <= atol + rtol * max|torch|``. Returns ``{"max_abs_err",
    "max_rel_err", "providers", "outputs": [per-output dicts]}``; raises
    :class:`ExportVerificationError` above tolerance, :class:`UnavailableError` if
    onnxruntime or its CPU provider is missing.
    """
    import numpy as np
    import torch

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UnavailableError("onnxruntime is not installed",
                               hint="pip install 'deeprecon-rt[train]'") from e
    model = model.eval()
    with torch.no_grad():  # the reference first: onnxruntime's threads then have the CPU
        ref = model(*[x.cpu() for x in inputs])
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    options = ort.SessionOptions()
    # No spin-waiting after a run: idle spinning threads would slow whatever runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    providers = session.get_providers()
    if "CPUExecutionProvider" not in providers:
        raise UnavailableError(f"onnxruntime did not load the CPU provider (got {providers})")
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != len(inputs):
        raise ValueError(f"graph {path} has {len(graph_inputs)} inputs, got {len(inputs)}")
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(graph_inputs, inputs)}
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, feeds)
    del session
    if len(refs) != len(got):
        raise ExportVerificationError(f"{path}: {len(got)} outputs, PyTorch gives {len(refs)}")
    per_output, failures = [], []
    for name, r, g in zip(names, refs, got):
        r = r.detach().cpu().numpy().astype(np.float64)
        g = np.asarray(g, dtype=np.float64)
        if r.shape != g.shape:
            raise ExportVerificationError(f"{path}: output {name!r} has shape {g.shape}, "
                                          f"PyTorch gives {r.shape}")
        scale = float(np.abs(r).max()) if r.size else 0.0
        abs_err = float(np.abs(g - r).max()) if r.size else 0.0
        rel_err = abs_err / scale if scale > 0 else abs_err
        ok = abs_err <= atol + rtol * scale and np.isfinite(g).all()
        per_output.append({"name": name, "max_abs_err": abs_err, "max_rel_err": rel_err,
                           "max_abs_ref": scale, "ok": bool(ok)})
        if not ok:
            failures.append(f"{name}: max_abs_err {abs_err:.3g}, max_rel_err {rel_err:.3g} "
                            f"(|ref| max {scale:.3g})")
    report = {"max_abs_err": max(o["max_abs_err"] for o in per_output),
              "max_rel_err": max(o["max_rel_err"] for o in per_output),
              "providers": providers, "outputs": per_output}
    if failures:
        raise ExportVerificationError(
            f"ONNX graph {path} disagrees with PyTorch beyond rtol {rtol:g}, atol {atol:g}: "
            + "; ".join(failures))
    log.info("verified %s against PyTorch: max_abs_err %.3g, max_rel_err %.3g",
             Path(path).name, report["max_abs_err"], report["max_rel_err"])
    return report


def strip_node_metadata(onnx_path: str | Path) -> int:
    """Remove every node's ``metadata_props`` (torch.onnx's stack traces, FX nodes, class
    hierarchies and name scopes) from the graph at ``onnx_path``, in the main graph and in
    local functions, rewriting the file in place (external data left where it is).
    Returns the number of entries removed."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    removed = 0
    for nodes in [model.graph.node] + [f.node for f in model.functions]:
        for node in nodes:
            removed += len(node.metadata_props)
            del node.metadata_props[:]
    if removed:
        onnx.save(model, str(onnx_path))
    return removed


def link_external_weights(onnx_path: str | Path, weight_files: Sequence[str | Path]
                          ) -> dict[str, int]:
    """Store each weight once: every initializer of the ONNX graph at ``onnx_path`` whose
    dtype, shape and bytes equal a tensor of one of the safetensors ``weight_files``
    becomes ONNX external data pointing into that file (location relative to the
    graph's folder, byte offset, length); the rest (folded constants, resampling
    matrices) stays in the graph. The weight files must lie in the graph's folder or
    below it (onnxruntime refuses external data outside the model's folder).

    Returns {"linked": count, "linked_bytes": n, "inline_bytes": n}.
    """
    import hashlib
    import json
    import struct

    import numpy as np
    import onnx
    from onnx import numpy_helper

    onnx_path = Path(onnx_path)
    index: dict[tuple, tuple[str, int, int]] = {}
    for wf in weight_files:
        wf = Path(wf)
        rel = wf.resolve().relative_to(onnx_path.parent.resolve()).as_posix()
        raw = wf.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            data = raw[8 + n + a:8 + n + b]
            dt = {"F32": "float32", "F16": "float16", "I64": "int64"}.get(meta["dtype"])
            if dt is None:
                continue
            index.setdefault((dt, tuple(meta["shape"]), hashlib.sha256(data).digest()),
                             (rel, 8 + n + a, b - a))
    model = onnx.load(str(onnx_path))
    stats = {"linked": 0, "linked_bytes": 0, "inline_bytes": 0}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        key = (np.dtype(arr.dtype).name, tuple(arr.shape),
               hashlib.sha256(np.ascontiguousarray(arr).tobytes()).digest())
        hit = index.get(key)
        if hit is None:
            stats["inline_bytes"] += arr.nbytes
            continue
        for field in ("raw_data", "float_data", "int64_data", "int32_data", "double_data"):
            init.ClearField(field)
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for k, v in (("location", hit[0]), ("offset", str(hit[1])), ("length", str(hit[2]))):
            entry = init.external_data.add()
            entry.key, entry.value = k, v
        stats["linked"] += 1
        stats["linked_bytes"] += arr.nbytes
    onnx.save(model, str(onnx_path))
    return stats


__all__ = ["ExportVerificationError", "link_external_weights", "strip_node_metadata",
           "export_program", "export_onnx", "verify_onnx", "BATCH_DIM_NAME", "MAX_BATCH"]
