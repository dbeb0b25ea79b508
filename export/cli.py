"""``deeprecon-rt export``: a finished chain of training runs -> a model bundle.

This module is a plug-in of the ``deeprecon-rt`` command (entry point group
``deeprecon_rt.commands``), so that the runtime's CLI never imports the exporter.
Importing it imports no torch; the command checks for torch and names what is missing.

Example::

    deeprecon-rt export runs/seg -o bundles/small128-v1 --name small128-v1
    deeprecon-rt export runs/seg -o bundles/b --gan runs/gan2 --set steps=50 --overwrite

It prints where the bundle went and its identity, the SHA-256 of its manifest.json.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shlex
import time
from pathlib import Path
from typing import List, Optional

import typer

from deeprecon.runtime.errors import UnavailableError, UsageError

log = logging.getLogger("deeprecon.export")

app = typer.Typer(help="Export a finished seg run and its chain (gan, encoder) as a model "
                       "bundle (needs torch and the LPIPS weights: the project's train extra).",
                  add_completion=False, pretty_exceptions_enable=False)


def _parse_sets(sets: list[str]) -> dict[str, str]:
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _require_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        raise UnavailableError("export needs torch, which is not installed",
                               hint="pip install torch first, then "
                                    "pip install --no-build-isolation 'deeprecon-rt[train]'")


def _command_line(run_dir: Path, out: Path, encoder: Optional[Path], gan: Optional[Path],
                  lpips_weights: Optional[Path], name: Optional[str], sets: list[str],
                  overwrite: bool, describe: Optional[Path] = None, no_onnx: bool = False) -> str:
    """The command as recorded in the manifest's provenance (paths as given)."""
    args = ["deeprecon-rt", "export", str(run_dir), "-o", str(out)]
    for opt, value in (("--encoder", encoder), ("--gan", gan),
                       ("--lpips-weights", lpips_weights), ("--name", name),
                       ("--describe", describe)):
        if value is not None:
            args += [opt, str(value)]
    for item in sets:
        args += ["--set", item]
    if overwrite:
        args.append("--overwrite")
    if no_onnx:
        args.append("--no-onnx")
    return shlex.join(args)


# A group with no subcommands whose callback is the command: ``deeprecon-rt export RUN -o
# DIR`` (a Typer sub-app with one command would need ``export export``). Interspersed
# arguments let options come after RUN_DIR, as in any other command.
@app.callback(invoke_without_command=True, subcommand_metavar="",
              context_settings={"allow_interspersed_args": True})
def export(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A finished seg run (its run.json leads to the latents, gan and encoder runs)."),
    out: Path = typer.Option(..., "--out", "-o", help="The bundle folder to write (new, or an existing bundle with --overwrite)."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="Take the encoder from this encoder run instead of the chain's."),
    gan: Optional[Path] = typer.Option(None, "--gan", help="Take the generator from this gan run instead of the chain's."),
    lpips_weights: Optional[Path] = typer.Option(None, "--lpips-weights", help="alex_shift_tolerant.pth to use instead of the installed stlpips-pytorch wheel's (SHA-256 checked)."),
    name: Optional[str] = typer.Option(None, "--name", help="The bundle's name (default: the folder's name)."),
    set_: List[str] = typer.Option([], "--set", help="Override an inversion default, KEY=VALUE (repeatable): steps, lr, lambda1, lambda2, lambda3, ncc_window, early_stop_patience, early_stop_rel_tol, roi_dilation_mm, batch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle at --out."),
    describe: Optional[Path] = typer.Option(None, "--describe", help="A JSON object merged into the manifest's provenance: e.g. licence, training_data, validation figures."),
    no_onnx: bool = typer.Option(False, "--no-onnx", help="Write a torch-only bundle: no ONNX graphs, so the onnxruntime backend cannot run it."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Write a model bundle: manifest.json, float32 safetensors weights (each stored
    once), verified torch.export programs of the encoder, generator, segmenter and
    LPIPS, and verified ONNX graphs: the forward graphs and the gradient graphs of the
    inversion."""
    sets = _parse_sets(set_)
    description = None
    if describe is not None:
        try:
            description = json.loads(describe.read_text())
        except FileNotFoundError:
            from deeprecon.runtime.errors import NoInputError
            raise NoInputError(f"--describe {describe}: no such file") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"--describe {describe}: not a JSON file ({e})") from None
        if not isinstance(description, dict):
            raise UsageError(f"--describe {describe}: expected a JSON object")
    _require_torch()
    from deeprecon.runtime.bundle import load_bundle

    from .bundle import export_bundle

    t0 = time.perf_counter()
    path = export_bundle(run_dir, out, encoder_run=encoder, gan_run=gan,
                         lpips_weights=lpips_weights, name=name, inversion=sets,
                         overwrite=overwrite, description=description, onnx=not no_onnx,
                         command=_command_line(run_dir, out, encoder, gan, lpips_weights, name,
                                               set_, overwrite, describe, no_onnx))
    bundle = load_bundle(path, verify=False)
    seconds = round(time.perf_counter() - t0, 2)
    if as_json:
        info = bundle.describe()
        typer.echo(json.dumps({"bundle": str(path), "sha256": bundle.sha256, "name": bundle.name,
                               "preset": bundle.preset, "bytes": info["bytes"],
                               "files": len(info["files"]) + 1, "seconds": seconds,
                               "provenance": info["provenance"]}, indent=2))
    else:
        typer.echo(f"bundle {bundle.name!r} ({bundle.preset}) written to {path} in {seconds:.1f} s")
        typer.echo(f"manifest sha256: {bundle.sha256}")
