"""The `deeprecon-rt` command line: a thin layer over the Python API.

Every failure leaves through :func:`main`, which turns it into a message on stderr and
an exit code (see :mod:`deeprecon.runtime.errors`); a traceback is printed only with
``-v``/``--verbose``.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from deeprecon.runtime import __version__
from deeprecon.runtime.errors import (FOREIGN_ERRORS, DeepreconError, ExitCode, UsageError,
                                      exit_code_of)
from deeprecon.runtime.signals import Terminated, terminating_signals_raise

log = logging.getLogger("deeprecon")

app = typer.Typer(
    name="deeprecon-rt",
    help="Cardiac cine MRI: segmentation, 3D reconstruction and motion adaptation "
         "by GAN inversion (DeepRecon). Runs offline; never makes network calls.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
study_app = typer.Typer(help="Inspect a study (DICOM folder, NIfTI file, ACDC patient folder).",
                        no_args_is_help=True)
eval_app = typer.Typer(help="Compare results with references.", no_args_is_help=True)
bundle_app = typer.Typer(help="Inspect and check a model bundle.", no_args_is_help=True)
app.add_typer(study_app, name="study")
app.add_typer(bundle_app, name="bundle")
app.add_typer(eval_app, name="eval")

PLUGIN_GROUP = "deeprecon_rt.commands"


def _add_plugins() -> None:
    """Command groups of other parts of the package (``train`` from the trainer, later
    ``export``), registered as entry points so that the runtime never imports them by
    name. A plug-in that cannot be loaded is left out with a warning naming it."""
    from importlib.metadata import distributions

    # Every distribution's metadata is read (not the first per name, as entry_points()
    # does): a stale *.egg-info left in the working folder by a build must not hide the
    # installed package's commands.
    found = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == PLUGIN_GROUP:
                found.setdefault(ep.name, ep)
    for ep in sorted(found.values(), key=lambda e: e.name):
        try:
            plugin = ep.load()
        except Exception as e:  # a broken optional part must not take the CLI down
            log.warning("command %r is unavailable: %s: %s", ep.name, type(e).__name__, e)
            continue
        app.add_typer(plugin, name=ep.name)


_add_plugins()

_verbosity = {"level": logging.INFO}


def _version_callback(value: bool):
    if value:
        typer.echo(f"deeprecon-rt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging; tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
):
    if verbose and quiet:
        raise UsageError("--verbose and --quiet exclude each other")
    _verbosity["level"] = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    _setup_logging(_verbosity["level"])


def _setup_logging(level: int) -> None:
    root = logging.getLogger("deeprecon")
    root.handlers.clear()
    if sys.stderr.isatty():
        from rich.logging import RichHandler
        handler: logging.Handler = RichHandler(show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


# --------------------------------------------------------------------------- study
_STUDY_HELP = ("DICOM folder, NIfTI file (3D or 4D) or ACDC patient folder; or several one-phase "
               "files of one stack (e.g. ED.nii.gz ES.nii.gz), named ED/ES from their file names.")
_INPUT_HELP = "An input, as STUDY (repeatable: -i ED.nii.gz -i ES.nii.gz)."
_PHASE_NAMES_HELP = ("ED/ES name of each input, comma-separated in input order (- for unnamed), "
                     "instead of reading them from the file names.")
_SERIES_HELP = ("The series to use when the DICOM folder holds several short-axis series: its "
                "SeriesInstanceUID, or PatientID:StudyInstanceUID:SeriesNumber as listed when the "
                "files have none.")


def _load_input(study: Optional[List[Path]], inputs: Optional[List[Path]], series: Optional[str],
                phase_names: Optional[str]):
    """The study of the positional inputs and the -i/--input ones, acquisition-checked."""
    from deeprecon.runtime.io import check_acquisition, load_studies

    paths = list(study or []) + list(inputs or [])
    if not paths:
        raise UsageError("no study given", hint="pass a study folder or file, or -i FILE (repeatable)")
    names = None if phase_names is None else [n for n in phase_names.split(",")]
    return check_acquisition(load_studies(paths, series=series, phase_names=names))


@study_app.command("info")
def study_info(
    path: Optional[List[Path]] = typer.Argument(None, help=_STUDY_HELP, show_default=False),
    inputs: Optional[List[Path]] = typer.Option(None, "--input", "-i", help=_INPUT_HELP, show_default=False),
    series: Optional[str] = typer.Option(None, "--series", help=_SERIES_HELP),
    phase_names: Optional[str] = typer.Option(None, "--phase-names", help=_PHASE_NAMES_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
):
    """Print what was found: series, phases, slices, matrix, spacing, gap, orientation, warnings.

    A study that is not a cine short-axis stack (a long-axis view, a single slice, a
    perfusion/dynamic series) is refused with exit 65, as reconstruct would refuse it."""
    study = _load_input(path, inputs, series, phase_names)
    desc = study.describe()
    if as_json:
        typer.echo(json.dumps(desc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Study: {desc['source']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("format", desc["format"]),
        ("series", f"{desc['series_uid'] or '-'} {desc['description']}".strip()),
        ("phases", str(desc["phases"])),
        ("slices", str(desc["slices"])),
        ("matrix (rows x cols)", "{} x {}".format(*desc["matrix"])),
        ("pixel spacing (mm)", "{:g} x {:g}".format(*desc["pixel_spacing_mm"])),
        ("slice gap (mm)", "-" if desc["slice_gap_mm"] is None else f"{desc['slice_gap_mm']:g}"),
        ("slice thickness (mm)", "-" if desc["slice_thickness_mm"] is None else f"{desc['slice_thickness_mm']:g}"),
        ("orientation", desc["orientation"]),
        ("ED / ES phase", "unknown" if desc["ed_phase"] is None and desc["es_phase"] is None
         else f"{_fmt(desc['ed_phase'])} / {_fmt(desc['es_phase'])}"),
        ("labels", "yes" if desc["has_labels"] else "no"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    for k, v in desc["info"].items():
        table.add_row(k, str(v))
    console = Console()
    console.print(table)
    for w in desc["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")


# --------------------------------------------------------------------------- phantom
@app.command("phantom")
def phantom(
    out_dir: Path = typer.Argument(..., help="Folder to write the phantom into (created)."),
    slices: int = typer.Option(10, "--slices", min=2, max=64, help="Short-axis slices."),
    phases: int = typer.Option(2, "--phases", min=1, max=100, help="Cardiac phases over one RR interval."),
    seed: int = typer.Option(0, "--seed", help="Random seed (noise, misalignment)."),
    shift_mm: float = typer.Option(0.0, "--shift-mm", min=0.0, help="SD of per-slice in-plane shifts (breath-hold misalignment), mm."),
    preview: bool = typer.Option(True, "--preview/--no-preview", help="Also write preview.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the written files as JSON."),
):
    """Write a synthetic cine short-axis study with exact labels, high-resolution truth and long-axis planes."""
    from deeprecon.runtime.phantom import make_phantom, write_phantom

    ph = make_phantom(slices=slices, phases=phases, seed=seed, shift_mm=shift_mm)
    files = write_phantom(ph, out_dir, preview=preview)
    if as_json:
        typer.echo(json.dumps({k: str(v) for k, v in files.items()}, indent=2))
    else:
        for k, v in files.items():
            typer.echo(f"{k}: {v}")


# --------------------------------------------------------------------------- reconstruct
class _Progress:
    """Progress of the pipeline's stages: rich bars on a terminal, a log line per stage
    (and every 25 % of a long one) otherwise; nothing with --quiet."""

    def __init__(self):
        self.enabled = _verbosity["level"] <= logging.INFO
        self.tty = sys.stderr.isatty()
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._logged: dict[str, int] = {}
        self._started: dict[str, float] = {}

    def __enter__(self):
        if self.enabled and self.tty:
            from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self._bar = Progress(TextColumn("{task.description:<12}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 transient=True)
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            if stage not in self._tasks:
                self._tasks[stage] = self._bar.add_task(stage, total=total)
            self._bar.update(self._tasks[stage], completed=done, total=total)
            return
        now = time.perf_counter()
        t0 = self._started.setdefault(stage, now)
        quarter = (4 * done) // max(total, 1)
        if done == total or quarter > self._logged.get(stage, 0):
            self._logged[stage] = quarter
            elapsed = now - t0
            eta = "" if done == total or done == 0 else f", ETA {elapsed / done * (total - done):.0f} s"
            log.info("%s: %d/%d (%.0f s%s)", stage, done, total, elapsed, eta)


def _open_reconstructor(bundle: Optional[Path], backend: str, device: str,
                        threads: Optional[int] = None):
    from deeprecon.runtime.pipeline import Reconstructor

    return Reconstructor(bundle, backend=backend, device=device, threads=threads)


def _print_summary(result, out: Path, as_json: bool) -> None:
    if as_json:
        from deeprecon.runtime.measures import MEASURE_COLUMNS
        from deeprecon.runtime.jsonsafe import json_safe
        typer.echo(json.dumps(json_safe({
            "output": str(out), "kind": result.kind,
            "measures": {src: {k: m[k] for k in MEASURE_COLUMNS}
                         for src, m in result.measures.items()},
            "timings_s": result.timings, "warnings": result.warnings,
            "plausibility": result.plausibility}), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from deeprecon.runtime.measures import MEASURE_COLUMNS
    table = Table(title=f"{result.kind.replace('_', ' ')} -> {out}")
    table.add_column("measure")
    for src in result.measures:
        table.add_column(src, justify="right")
    for k in MEASURE_COLUMNS:
        table.add_row(k, *(f"{result.measures[src][k]:.1f}" for src in result.measures))
    Console(stderr=False).print(table)
    total = sum(result.timings.values())
    typer.echo("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
               + f" (total {total:.2f} s)")


def _shipped_default() -> str:
    """What --bundle defaults to after $DEEPRECON_BUNDLE, true to this installation."""
    from deeprecon.runtime.bundle import MANIFEST, SHIPPED_BUNDLE

    return ("the reference bundle shipped with the package" if (SHIPPED_BUNDLE / MANIFEST).is_file()
            else "none: no reference bundle ships with this version yet")


_BUNDLE_HELP = f"Model bundle folder (default: $DEEPRECON_BUNDLE when set, else {_shipped_default()})."
_DEVICE_HELP = ("auto, cpu, cuda or cuda:N. auto: CUDA when the backend sees a CUDA device, "
                "else the CPU; a device that cannot be used is an error (never a fallback).")
_THREADS_HELP = ("CPU threads the model may use (default: one per core). On a machine "
                 "shared with other work, fewer threads than cores avoid waiting on each other.")
_ISLANDS_HELP = ("Keep every part of each structure's segmentation. By default each "
                 "structure keeps its largest 3D part (parts up to 10 mm apart count as "
                 "one); the run report says how much was removed.")
_BACKEND_HELP = ("auto, onnxruntime or torch. auto: onnxruntime when it is installed and the "
                 "bundle has its ONNX graphs (no torch needed, faster on a CPU), else torch.")


@app.command("reconstruct")
def reconstruct(
    study: Optional[List[Path]] = typer.Argument(None, help=_STUDY_HELP, show_default=False),
    inputs: Optional[List[Path]] = typer.Option(None, "--input", "-i", help=_INPUT_HELP, show_default=False),
    out: Path = typer.Option(..., "--out", "--output", "-o", help="Output folder (written atomically; a previous output there is replaced)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help=_BUNDLE_HELP),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=_THREADS_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", min=0, help="Inversion steps K (default: the bundle's)."),
    fast: bool = typer.Option(False, "--fast", help="No inversion (K = 0): the encoder's codes only."),
    interp: Optional[int] = typer.Option(None, "--interp", min=1, max=32, help="High-resolution slices per native gap N (default: slice gap / the model's pixel spacing, at least 2 when the gap is larger than that spacing; the log says the choice)."),
    phases: Optional[str] = typer.Option(None, "--phases", help="ed,es | all | phase indices (default: ED and ES when known, else all)."),
    series: Optional[str] = typer.Option(None, "--series", help=_SERIES_HELP),
    phase_names: Optional[str] = typer.Option(None, "--phase-names", help=_PHASE_NAMES_HELP),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Images inverted together (default: the bundle's)."),
    patience: Optional[int] = typer.Option(None, "--patience", min=0, help="Stop an image's inversion after this many steps without improvement (0: never; default: the bundle's)."),
    keep_islands: bool = typer.Option(False, "--keep-islands", help=_ISLANDS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the measures and timings as JSON."),
):
    """Segment a study, reconstruct its high-resolution volume and compute the clinical measures."""
    from deeprecon.runtime.outputs import check_output_dir, write_outputs

    if fast and steps is not None:
        raise UsageError("--fast and --steps exclude each other (--fast means --steps 0)")
    check_output_dir(out)
    # the study first: a bad study (or not a cine SAX stack) fails in a second, before
    # the bundle is opened
    t0 = time.perf_counter()
    loaded = _load_input(study, inputs, series, phase_names)
    t_load = time.perf_counter() - t0
    with _open_reconstructor(bundle, backend, device, threads) as rec, _Progress() as progress:
        result = rec.reconstruct(loaded, steps=0 if fast else steps, interp=interp,
                                 phases=phases, progress=progress, batch=batch,
                                 early_stop_patience=patience,
                                 largest_component=not keep_islands)
        result.timings["load"] = t_load
        result.options["series"] = series
        write_outputs(result, out, progress=progress)
    _print_summary(result, out, as_json)


@app.command("cohort")
def cohort_cmd(
    input_dir: Path = typer.Argument(..., help="Folder with one study per entry: sub-folders (DICOM, ACDC) and NIfTI images."),
    out: Path = typer.Option(..., "--out", "--output", "-o", help="Folder for one output folder per study and the summary CSV."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help=_BUNDLE_HELP),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=_THREADS_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", min=0, help="Inversion steps K (default: the bundle's)."),
    fast: bool = typer.Option(False, "--fast", help="No inversion (K = 0): the encoder's codes only."),
    interp: Optional[int] = typer.Option(None, "--interp", min=1, max=32, help="High-resolution slices per native gap N (default: from each study's slice gap)."),
    phases: Optional[str] = typer.Option(None, "--phases", help="ed,es | all | phase indices, for every study (default: ED and ES when known, else all)."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Images inverted together (default: the bundle's)."),
    keep_islands: bool = typer.Option(False, "--keep-islands", help=_ISLANDS_HELP),
    num_parts: int = typer.Option(1, "--num-parts", min=1, help="Split the cohort into this many parts (run one process per part)."),
    part_id: int = typer.Option(0, "--part-id", min=0, help="Which part this process runs (0 .. num-parts - 1)."),
    engine: str = typer.Option("local", "--engine", help="local (one study after the other here) or ray (Ray Data actors, each loading the bundle once)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address for --engine ray (e.g. ray://head:10001 or auto; default: start a local Ray)."),
    ray_actors: int = typer.Option(1, "--ray-actors", min=1, help="Actors (bundle copies) for --engine ray, one CPU each (and one thread each unless --threads)."),
):
    """Reconstruct every study of a folder with the model loaded once: one output folder
    per study, finished studies skipped, a failing study recorded and the run going on,
    and a summary CSV. Exit 0 when every study is done, 1 when some failed."""
    from deeprecon.runtime.cohort import ENGINES, WorkerSpec, part_of, run_cohort

    if fast and steps is not None:
        raise UsageError("--fast and --steps exclude each other (--fast means --steps 0)")
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}", hint=f"known: {', '.join(ENGINES)}")
    part_of([], num_parts, part_id)  # the part arguments, before the bundle is opened
    worker = WorkerSpec(bundle, backend, device, {"steps": 0 if fast else steps, "interp": interp,
                                                  "phases": phases, "batch": batch,
                                                  "largest_component": not keep_islands},
                        threads=threads)

    def on_study(done: int, total: int, outcome) -> None:
        if _verbosity["level"] <= logging.INFO:
            typer.echo(f"[{done}/{total}] {outcome.name}: {outcome.status}"
                       + (f" (exit {outcome.exit_code}: {outcome.message})"
                          if outcome.status == "failed" else ""), err=True)

    outcomes, summary, warnings = run_cohort(input_dir, out, worker=worker, num_parts=num_parts,
                                             part_id=part_id, engine=engine,
                                             ray_address=ray_address, ray_actors=ray_actors,
                                             on_study=on_study)
    for w in warnings:
        log.warning("%s", w)
    counts = {k: sum(o.status == k for o in outcomes) for k in ("done", "skipped", "failed")}
    typer.echo(f"{len(outcomes)} studies: {counts['done']} done, {counts['skipped']} skipped "
               f"(finished before), {counts['failed']} failed; summary: {summary}")
    if counts["failed"]:
        raise typer.Exit(int(ExitCode.PARTIAL))


@app.command("serve")
def serve_cmd(
    ae_title: str = typer.Option(..., "--ae-title", help="This node's AE title (the one peers call)."),
    port: int = typer.Option(..., "--port", min=0, max=65535, help="TCP port to listen on (0: any free port; the log says which)."),
    storage: Path = typer.Option(..., "--storage", help="Folder of the received studies: incoming/, work/, failed/ (created)."),
    allow: str = typer.Option(..., "--allow", help="Calling AE titles accepted, comma-separated; every other is rejected."),
    send_to: str = typer.Option(..., "--send-to", help="Where the DICOM SEG objects go: AE@HOST:PORT."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    quiet_period: float = typer.Option(10.0, "--quiet-period", min=0.0, help="A study is complete after this many seconds without a new object of it."),
    max_pdu: int = typer.Option(65536, "--max-pdu", min=4096, max=1 << 24, help="Maximum PDU length advertised and enforced, bytes; a longer PDU aborts the association."),
    max_object_mb: float = typer.Option(64.0, "--max-object-mb", min=0.001, help="Largest object (one C-STORE's data set) accepted, MiB; a larger one aborts the association."),
    max_associations: int = typer.Option(8, "--max-associations", min=1, max=1000, help="Concurrent associations accepted; more are rejected."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="Mutual TLS: this node's certificate (PEM)."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="Mutual TLS: its private key (PEM)."),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="Mutual TLS: the CA (PEM) that must sign every peer's certificate."),
    send_tls: bool = typer.Option(False, "--send-tls", help="Send the SEG over TLS too (this node's certificate; the destination's checked against --tls-ca and its host name)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help=_BUNDLE_HELP),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=_THREADS_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", min=0, help="Inversion steps K (default: the bundle's)."),
    fast: bool = typer.Option(False, "--fast", help="No inversion (K = 0): the encoder's codes only."),
    phases: Optional[str] = typer.Option(None, "--phases", help="ed,es | all | phase indices, for every study (default: ED and ES when known, else all)."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Images inverted together (default: the bundle's)."),
    patience: Optional[int] = typer.Option(None, "--patience", min=0, help="Stop an image's inversion after this many steps without improvement (0: never; default: the bundle's)."),
):
    """A DICOM node beside the scanner: receive cine MR studies over C-STORE from the
    allowed AE titles, reconstruct each complete study with the model loaded once, and
    send its segmentation as DICOM SEG to --send-to. Answers C-ECHO. Runs until SIGTERM
    (a clean stop, exit 0) or Ctrl-C; a failing study is logged and kept in
    STORAGE/failed/, and the node goes on."""
    from deeprecon.runtime.dicom_node import DicomNode, Destination, NodeConfig, TLSFiles

    if fast and steps is not None:
        raise UsageError("--fast and --steps exclude each other (--fast means --steps 0)")
    given = [tls_cert, tls_key, tls_ca]
    if any(given) and not all(given):
        raise UsageError("mutual TLS needs --tls-cert, --tls-key and --tls-ca together")
    config = NodeConfig(
        ae_title=ae_title, storage=storage, host=host, port=port,
        allowed=tuple(a.strip() for a in allow.split(",") if a.strip()),
        destination=Destination.parse(send_to), quiet_period_s=quiet_period, max_pdu=max_pdu,
        max_object_bytes=max(1, int(max_object_mb * (1 << 20))),
        max_associations=max_associations,
        tls=TLSFiles(tls_cert, tls_key, tls_ca) if all(given) else None, send_tls=send_tls,
        steps=0 if fast else steps, phases=phases, batch=batch, patience=patience)
    with _open_reconstructor(bundle, backend, device, threads) as rec:
        DicomNode(config, rec).serve_forever()


@app.command("adapt-motion")
def adapt_motion_cmd(
    source: Path = typer.Argument(..., help="Study whose heart is moved (its ED is the start)."),
    target: Path = typer.Argument(..., help="Study whose motion is transferred."),
    out: Path = typer.Option(..., "--out", "--output", "-o", help="Output folder (written atomically)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help=_BUNDLE_HELP),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=_THREADS_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", min=0, help="Inversion steps K (default: the bundle's)."),
    fast: bool = typer.Option(False, "--fast", help="No inversion (K = 0)."),
    interp: Optional[int] = typer.Option(None, "--interp", min=1, max=32, help="High-resolution slices per native gap N."),
    source_phases: Optional[str] = typer.Option(None, "--source-phases", help="Phases of the source to reconstruct (default: ED and ES when known, else all)."),
    target_phases: Optional[str] = typer.Option(None, "--target-phases", help="Phases of the target whose motion is used (default: ED and ES when known, else all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the measures and timings as JSON."),
):
    """Move the SOURCE heart with the TARGET heart's motion (latent-space motion transfer)."""
    from deeprecon.runtime.io import check_acquisition, load_study
    from deeprecon.runtime.motion import adapt_motion
    from deeprecon.runtime.outputs import check_output_dir, write_outputs

    if fast and steps is not None:
        raise UsageError("--fast and --steps exclude each other (--fast means --steps 0)")
    check_output_dir(out)
    source = check_acquisition(load_study(source))
    target = check_acquisition(load_study(target))
    with _open_reconstructor(bundle, backend, device, threads) as rec, _Progress() as progress:
        result = adapt_motion(rec, source, target, steps=0 if fast else steps, interp=interp,
                              source_phases=source_phases, target_phases=target_phases,
                              progress=progress)
        write_outputs(result, out, progress=progress)
    _print_summary(result, out, as_json)


@bundle_app.command("info")
def bundle_info(
    path: Optional[Path] = typer.Argument(None, help=f"Bundle folder (default: $DEEPRECON_BUNDLE when set, else {_shipped_default()})."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
):
    """Check a model bundle (every file's SHA-256) and describe it: networks, graphs, preprocessing, inversion defaults."""
    from deeprecon.runtime.bundle import default_bundle_path, load_bundle, validation_summary

    b = load_bundle(default_bundle_path() if path is None else path)
    desc = b.describe()
    if as_json:
        typer.echo(json.dumps(desc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"Bundle {desc['name']} ({desc['path']})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for k in ("sha256", "preset", "resolution", "num_ws", "w_dim", "created"):
        table.add_row(k, str(desc.get(k)))
    table.add_row("preprocess", json.dumps(desc["preprocess"]))
    prov = dict(desc["provenance"])
    # what a user must read first: the licence, the data, the validation and its status
    for key in ("licence", "status"):
        if isinstance(prov.get(key), str):
            table.add_row(key, prov.pop(key))
    if isinstance(prov.get("training_data"), dict):
        table.add_row("training data", ", ".join(f"{k} {v}" for k, v in prov.pop("training_data").items()))
    summary = validation_summary(prov)
    if summary is not None:
        met = {True: "yes", False: "no", None: "not recorded"}[summary[1]]
        table.add_row("validation", f"{summary[0]}; meets the project's bar: {met}")
    table.add_row("provenance", json.dumps(prov))
    table.add_row("inversion", json.dumps(desc["inversion"]))
    for name, g in desc["graphs"].items():
        table.add_row(f"graph {name}",
                      f"({', '.join(g['inputs'])}) -> ({', '.join(g['outputs'])})")
    total = sum(desc["files"].values())
    table.add_row("files", f"{len(desc['files'])}, {total / 1e6:.1f} MB, all hashes verified")
    console.print(table)


# --------------------------------------------------------------------------- eval
@eval_app.command("seg")
def eval_seg(
    pred: Path = typer.Argument(..., help="Predicted label NIfTI (project labels 1 LVC, 2 LVM, 3 RVC)."),
    ref: Path = typer.Argument(..., help="Reference label NIfTI on the same grid."),
    ref_convention: str = typer.Option("auto", "--ref-convention", help="Labels of REF: 'auto' (ACDC's patientNNN_frameNN_gt files: 'acdc', else 'project'), 'project' (1 LVC, 2 LVM, 3 RVC) or 'acdc' (1 RV, 2 MYO, 3 LV)."),
    pred_convention: str = typer.Option("auto", "--pred-convention", help="Labels of PRED: 'auto', 'project' or 'acdc', as --ref-convention."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
):
    """Dice, HD95 and ASSD (mm) per structure between two label volumes. Says which label
    convention it read each file in (on stderr; in the JSON as *_convention)."""
    from deeprecon.runtime.metrics import compare_label_files

    for opt, value in (("--ref-convention", ref_convention), ("--pred-convention", pred_convention)):
        if value not in ("auto", "project", "acdc"):
            raise UsageError(f"{opt} must be 'auto', 'project' or 'acdc', got {value!r}")
    result = compare_label_files(pred, ref, ref_convention=ref_convention,
                                 pred_convention=pred_convention)
    for what, key in (("reference", "ref"), ("prediction", "pred")):
        conv = result[f"{key}_convention"]
        names = "1 RV, 2 MYO, 3 LV" if conv == "acdc" else "1 LVC, 2 LVM, 3 RVC"
        typer.echo(f"{what} {result[key]}: {conv} label convention ({names}; "
                   f"{result[f'{key}_convention_from']})", err=True)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{pred} vs {ref}")
    for col in ("structure", "Dice", "HD95 (mm)", "ASSD (mm)"):
        table.add_column(col)
    for name, m in result["structures"].items():
        table.add_row(name, *(_fmt(m.get(k)) for k in ("dice", "hd95_mm", "assd_mm")))
    Console().print(table)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the process exit code."""
    code = run(argv)
    sys.exit(code)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code instead of exiting (for tests and embedding).
    SIGTERM and SIGHUP end the command with 143 / 129 after every staging folder is
    removed, Ctrl-C with 130 (the one signal policy: :mod:`deeprecon.runtime.signals`)."""
    _setup_logging(logging.INFO)
    with terminating_signals_raise():
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    try:
        # standalone mode: typer prints usage errors itself and exits with 2
        app(args=argv, prog_name="deeprecon-rt")
        return ExitCode.OK
    except Terminated as e:  # SIGTERM or SIGHUP (a SystemExit: typer lets it through)
        _error(f"terminated ({e.signal_name}); no partial output was left")
        return e.code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else ExitCode.USAGE)
    except (DeepreconError, *FOREIGN_ERRORS) as e:  # FOREIGN_ERRORS: e.g. cpp_ext's, exit 69
        _error(str(e), exc=e)
        return exit_code_of(e)
    except MemoryError as e:
        _error("out of memory: the study is too large for this machine's memory; "
               "process fewer phases at a time or use a machine with more memory", exc=e)
        return ExitCode.OUT_OF_MEMORY
    except KeyboardInterrupt:  # Ctrl-C
        _error("interrupted")
        return 130
    except Exception as e:  # a bug: say so, and how to report it
        if type(e).__name__ == "OutOfMemoryError":  # torch's device out-of-memory error
            _error(f"out of memory on the device: {str(e).splitlines()[0]}; use a smaller "
                   "--batch or another device", exc=e)
            return ExitCode.OUT_OF_MEMORY
        _error(f"internal error: {type(e).__name__}: {e}\n"
               "  this is a bug in deeprecon-rt; rerun with -v for the traceback and report it",
               exc=e)
        return ExitCode.INTERNAL


def _error(message: str, exc: BaseException | None = None) -> None:
    sys.stderr.write(f"deeprecon-rt: error: {message}\n")
    if exc is not None and _verbosity["level"] <= logging.DEBUG:
        import traceback
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


if __name__ == "__main__":
    main()
