"""Output folders: layout, manifest, NIfTI geometry, measures, the offline report, and the
atomic write (replacement, refusal of foreign folders, cleanup after errors and signals).

The Result is synthetic (no networks): a phantom's labels as the segmentation, the
preprocessed images as input and (slightly perturbed) reconstruction, a high-resolution
volume made by repeating the model-grid slices ``interp`` times.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from deeprecon.runtime import outputs
from deeprecon.runtime.errors import UsageError
from deeprecon.runtime.measures import MEASURE_COLUMNS, clinical_measures, voxel_volume_ml
from deeprecon.runtime.outputs import pictures, tables
from deeprecon.runtime.outputs import (MANIFEST_NAME, is_outputs_folder, staging_dir,
                                       verify_outputs, write_outputs)
from deeprecon.runtime.phantom import make_phantom
from deeprecon.runtime.preprocess import PreprocessConfig, prepare
from deeprecon.runtime.qc import lv_centre
from deeprecon.runtime.result import Result
from deeprecon.runtime.study import Geometry

TESTS = Path(__file__).resolve().parent
EVIL = '<b onmouseover="x">"cine" & <script>alert(1)</script></b>'


def _hr_geometry(mg: Geometry, interp: int) -> Geometry:
    """The model geometry with ``interp - 1`` slices interpolated between neighbours."""
    S = mg.n_slices
    t = np.arange((S - 1) * interp + 1) / interp
    i = np.minimum(np.floor(t).astype(int), S - 2) if S > 1 else np.zeros(t.size, int)
    f = (t - i)[:, None]
    origins = mg.origins[i] * (1 - f) + mg.origins[np.minimum(i + 1, S - 1)] * f
    thick = None if mg.slice_thickness is None else mg.slice_thickness / interp
    return dataclasses.replace(mg, origins=origins, slice_thickness=thick)


def make_result(*, slices: int = 8, phases: int = 3, recon_phases=(0, 1), matrix=(72, 80),
                size: int = 48, spacing_mm: float = 3.0, interp: int = 2, seed: int = 0,
                evil: bool = True) -> Result:
    """A synthetic reconstruction Result from a phantom (no networks).

    The study has ``phases`` phases with frame numbers 1, 4, 7, ...; ``recon_phases`` of
    them are "reconstructed". Labels are the phantom's; the HR volume repeats each model
    slice ``interp`` times (so HR slice k * interp equals model slice k exactly).
    """
    ph = make_phantom(slices=slices, phases=phases, matrix=matrix, seed=seed)
    study = ph.study
    study.phase_ids = [1 + 3 * p for p in range(phases)]
    if evil:
        study.description = EVIL
        study.warnings.append("study warning: <i>unescaped?</i>")
    model, transform = prepare(study, PreprocessConfig(size=size, spacing_mm=spacing_mm))
    sel = list(recon_phases)
    P, S = len(sel), study.n_slices
    rng = np.random.default_rng(seed)
    labels = study.labels[sel]
    model_images = model[sel]
    model_labels = transform.labels_to_model(labels)
    model_recon = np.clip(model_images + rng.normal(0, 0.05, model_images.shape), -1, 1).astype(np.float32)
    S_hr = (S - 1) * interp + 1
    hr_images = np.repeat(model_images, interp, axis=1)[:, :S_hr]
    hr_labels = np.repeat(model_labels, interp, axis=1)[:, :S_hr]
    mg = transform.model_geometry(study.geometry)
    hr_geometry = _hr_geometry(mg, interp)
    ed, es = study.ed_phase, study.es_phase
    ed_i = sel.index(ed) if ed in sel else None
    es_i = sel.index(es) if es in sel else None
    measures = {
        "native": clinical_measures(labels, voxel_volume_ml(study.geometry), ed_phase=ed_i, es_phase=es_i),
        "hr": clinical_measures(hr_labels, voxel_volume_ml(hr_geometry), ed_phase=ed_i, es_phase=es_i),
    }
    n = P * S
    inversion = {"steps": rng.integers(5, 10, n).tolist(), "loss_init": rng.uniform(1, 2, n).tolist(),
                 "loss": rng.uniform(0.2, 0.5, n).tolist(), "psnr_init": rng.uniform(20, 22, n).tolist(),
                 "psnr": rng.uniform(25, 28, n).tolist(), "stopped_early": (rng.random(n) < 0.3).tolist()}
    timings = {"load": 0.12, "preprocess": 0.03, "encode": 0.2, "invert": 3.4, "segment": 0.1,
               "map_back": 0.02, "interpolate": 0.5, "measures": 0.01}
    options = {"steps": 10, "interp": interp, "phases": sel, "backend": "onnxruntime",
               "device": "cpu", "note": EVIL if evil else "plain"}
    bundle = {"path": "/bundles/tiny", "name": "tiny <test>" if evil else "tiny", "sha256": "ab" * 32,
              "preset": "tiny"}
    return Result(study=study, phases=tuple(sel), transform=transform, labels=labels,
                  model_images=model_images, model_recon=model_recon, model_labels=model_labels,
                  latents=rng.standard_normal((P, S, 4, 8)).astype(np.float32),
                  hr_images=hr_images, hr_labels=hr_labels, hr_geometry=hr_geometry, interp=interp,
                  measures=measures, inversion=inversion, timings=timings, options=options,
                  bundle=bundle, warnings=["result warning & <more>"] if evil else [])


@pytest.fixture(scope="module")
def result() -> Result:
    return make_result()


@pytest.fixture(scope="module")
def written(result, tmp_path_factory) -> Path:
    return write_outputs(result, tmp_path_factory.mktemp("out") / "case001")


@pytest.fixture
def fast_pictures(monkeypatch):
    """One tiny picture instead of the QC set (seconds of matplotlib), for the tests of
    the atomic write; the real pictures are checked on ``written`` and in the motion test."""
    from PIL import Image

    def tiny(result, stage):
        (stage / "qc").mkdir()
        Image.new("L", (4, 4)).save(stage / "qc" / "tiny.png")
        return {"volume_curves": "qc/tiny.png"}

    monkeypatch.setattr(pictures, "write_pictures", tiny)


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def _frames(result: Result) -> list[int]:
    return [result.study.phase_ids[p] for p in result.phases]


# ----------------------------------------------------------------------------- layout
def test_every_file_listed_with_its_hash(result, written):
    frames = _frames(result)
    assert frames == [1, 4]
    expected = {"run_report.json", "report.html", "measures.csv", "measures.json",
                "qc/volume_curves.png", "qc/overlay_native_1.png", "qc/recon_model_1.png",
                "qc/long_axis.png"}
    for f in frames:
        expected |= {f"segmentation/seg_frame{f:02d}.nii.gz", f"hr/image_frame{f:02d}.nii.gz",
                     f"hr/labels_frame{f:02d}.nii.gz"}
    present = {p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file()}
    assert present == expected | {MANIFEST_NAME}
    manifest = json.loads((written / MANIFEST_NAME).read_text())
    assert manifest["format"] == "deeprecon-outputs" and manifest["schema"] == 1
    assert manifest["kind"] == "reconstruction"
    assert set(manifest["files"]) == expected
    for rel, entry in manifest["files"].items():
        data = (written / rel).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert verify_outputs(written)["files"] == manifest["files"]
    # the manifest is the last file written
    mtimes = {rel: (written / rel).stat().st_mtime_ns for rel in expected}
    assert (written / MANIFEST_NAME).stat().st_mtime_ns >= max(mtimes.values())


def test_verify_outputs_detects_a_changed_file(result, tmp_path, fast_pictures):
    out = write_outputs(result, tmp_path / "o")
    with open(out / "measures.csv", "a") as f:
        f.write("tampered\n")
    with pytest.raises(UsageError, match="measures.csv"):
        verify_outputs(out)


def test_native_segmentation_nifti(result, written):
    g = result.study.geometry
    for p, f in enumerate(_frames(result)):
        img = sitk.ReadImage(str(written / "segmentation" / f"seg_frame{f:02d}.nii.gz"))
        arr = sitk.GetArrayFromImage(img)
        assert arr.dtype == np.uint8 and arr.shape == result.study.images.shape[1:]
        assert np.array_equal(arr, result.labels[p])
        assert img.GetSpacing() == pytest.approx(g.spacing_xyz, abs=1e-5)
        assert img.GetOrigin() == pytest.approx(tuple(g.origins[0]), abs=1e-4)
        assert np.asarray(img.GetDirection()) == pytest.approx(g.direction.ravel(), abs=1e-6)


def test_high_resolution_nifti(result, written):
    g = result.hr_geometry
    native_sz = result.study.geometry.slice_spacing
    model_sp = result.transform.spacing_mm
    raw_model = result.transform.denormalise(result.model_images)
    for p, f in enumerate(_frames(result)):
        lab = sitk.ReadImage(str(written / "hr" / f"labels_frame{f:02d}.nii.gz"))
        img = sitk.ReadImage(str(written / "hr" / f"image_frame{f:02d}.nii.gz"))
        for im in (lab, img):
            assert im.GetSize() == (result.transform.size, result.transform.size, g.n_slices)
            assert im.GetSpacing() == pytest.approx((model_sp, model_sp, native_sz / result.interp),
                                                    abs=1e-5)
            assert im.GetOrigin() == pytest.approx(tuple(g.origins[0]), abs=1e-4)
            assert np.asarray(im.GetDirection()) == pytest.approx(g.direction.ravel(), abs=1e-6)
        assert np.array_equal(sitk.GetArrayFromImage(lab), result.hr_labels[p])
        arr = sitk.GetArrayFromImage(img)
        assert arr.dtype == np.float32
        # the HR slices at native positions are copies of the model slices: in the study's
        # intensity units they equal the denormalised model images
        np.testing.assert_allclose(arr[::result.interp], raw_model[p], rtol=1e-5, atol=1e-2)


def test_measures_csv_and_json(result, written):
    with open(written / "measures.csv", newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        header = next(csv.reader(f))
    assert header == ["source", *MEASURE_COLUMNS, "ED frame", "ES frame"]
    assert [r["source"] for r in rows] == ["native", "hr"]
    for r in rows:
        m = result.measures[r["source"]]
        for col in MEASURE_COLUMNS:
            assert float(r[col]) == m[col]          # full precision round trip
        assert int(r["ED frame"]) == _frames(result)[m["ed_phase"]] == 1
        assert int(r["ES frame"]) == _frames(result)[m["es_phase"]] == 4
    data = json.loads((written / "measures.json").read_text())
    assert data["frame_ids"] == [1, 4]
    assert data["measures"]["hr"]["volume_curves_ml"]["LVC"] == \
        pytest.approx(result.measures["hr"]["volume_curves_ml"]["LVC"])


def test_run_report(result, written):
    rr = json.loads((written / "run_report.json").read_text())
    assert rr["kind"] == "reconstruction" and rr["bundle"]["sha256"] == "ab" * 32
    assert rr["backend"] == "onnxruntime" and rr["device"] == "cpu"
    assert rr["timings_s"] == result.timings and rr["outputs_s"] > 0
    assert rr["versions"]["numpy"] == np.__version__ and rr["versions"]["deeprecon"]
    assert ("torch" in rr["versions"]) == ("torch" in sys.modules)
    assert rr["inversion"]["psnr_mean"] == pytest.approx(np.mean(result.inversion["psnr"]))
    assert rr["inversion"]["psnr_init_mean"] == pytest.approx(np.mean(result.inversion["psnr_init"]))
    assert rr["inversion"]["images"] == 16
    assert rr["warnings"] == ["result warning & <more>", "study warning: <i>unescaped?</i>"]
    assert rr["study"]["slices"] == 8 and rr["study"]["frame_ids"] == [1, 4]
    assert rr["hr_volume"]["slice_spacing_mm"] == pytest.approx(5.0)


def test_report_is_offline_escaped_and_complete(written):
    page = (written / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert not [r for r in refs if r.startswith("//") or "://" in r]
    files = [r for r in refs if not r.startswith("#")]
    imgs = re.findall(r'<img src="([^"]*)"', page)
    assert {"qc/volume_curves.png", "qc/overlay_native_1.png", "qc/recon_model_1.png",
            "qc/long_axis.png"} <= set(imgs)
    for r in files:
        assert (written / r).is_file(), r
    assert "<script" not in page.lower() and "<b onmouseover" not in page
    assert "&lt;script&gt;" in page and "tiny &lt;test&gt;" in page
    assert "LVEF (%)" in page and "ab" * 8 in page


# ----------------------------------------------------------------------------- atomicity
def test_rewrite_replaces_previous_outputs(result, tmp_path, fast_pictures):
    out = tmp_path / "case"
    write_outputs(result, out)
    (out / "stray.txt").write_text("from the first run")
    first = json.loads((out / MANIFEST_NAME).read_text())
    calls = []
    write_outputs(result, out, progress=lambda *a: calls.append(a))
    assert not (out / "stray.txt").exists()
    assert _siblings(tmp_path) == ["case"]           # no partial or trash folder left
    assert set(json.loads((out / MANIFEST_NAME).read_text())["files"]) == set(first["files"])
    verify_outputs(out)
    assert calls[-1][1] == calls[-1][2] and [c[1] for c in calls] == list(range(1, len(calls) + 1))
    with pytest.raises(UsageError, match="already holds"):
        write_outputs(result, out, overwrite=False)


def test_empty_folder_is_used(result, tmp_path, fast_pictures):
    out = tmp_path / "empty"
    out.mkdir()
    write_outputs(result, out)
    assert is_outputs_folder(out) and _siblings(tmp_path) == ["empty"]


def test_foreign_folder_is_refused_and_untouched(result, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "sub").mkdir()
    with pytest.raises(UsageError, match="not empty") as err:
        write_outputs(result, out)
    assert err.value.hint
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt", "sub"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert _siblings(tmp_path) == ["mine"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        write_outputs(result, tmp_path / "afile")


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_error_midway_leaves_nothing(result, tmp_path, monkeypatch, exc):
    def failing(res, stage):
        (stage / "qc").mkdir()
        (stage / "qc" / "half.png").write_bytes(b"half")
        raise exc

    monkeypatch.setattr(pictures, "write_pictures", failing)
    with pytest.raises(type(exc)):
        write_outputs(result, tmp_path / "new")
    assert _siblings(tmp_path) == []


def test_error_while_replacing_keeps_previous(result, tmp_path, monkeypatch, fast_pictures):
    out = write_outputs(result, tmp_path / "case")
    before = json.loads((out / MANIFEST_NAME).read_text())

    def failing(res, stage):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tables, "write_measures", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_outputs(result, out)
    assert _siblings(tmp_path) == ["case"]
    assert verify_outputs(out)["files"] == before["files"]


def test_check_output_dir(tmp_path):
    assert outputs.check_output_dir(tmp_path / "new") == tmp_path.resolve() / "new"
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a.dcm").write_bytes(b"")
    with pytest.raises(UsageError):
        outputs.check_output_dir(tmp_path / "user")
    with pytest.raises(UsageError):
        outputs.check_output_dir(tmp_path / "..")


def test_staging_dir_for_other_writers(tmp_path):
    with staging_dir(tmp_path / "x", kind="custom") as stage:
        assert stage.parent == tmp_path and stage.name.startswith(f".x.partial-{os.getpid()}-")
        (stage / "a.txt").write_text("a")
    assert verify_outputs(tmp_path / "x")["kind"] == "custom"
    assert _siblings(tmp_path) == ["x"]


_CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_outputs import make_result
from deeprecon.runtime import outputs
from deeprecon.runtime.outputs import pictures

def slow(result, stage):
    (stage / "qc").mkdir()
    (stage / "qc" / "partial.png").write_bytes(b"partial")
    Path({marker!r}).write_text(str(stage))
    time.sleep(120)

pictures.write_pictures = slow
outputs.write_outputs(make_result(evil=False), {out!r})
"""


def _start_child(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    parent = tmp_path / "parent"
    parent.mkdir()
    marker = tmp_path / "marker"
    out = parent / "out"
    code = textwrap.dedent(_CHILD).format(tests=str(TESTS), marker=str(marker), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"child exited early ({proc.returncode}): {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("child did not reach the picture writer in 60 s")
        time.sleep(0.05)
    stage = Path(marker.read_text())
    assert stage.parent == parent and stage.is_dir() and not out.exists()
    return proc, out, stage


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_sigterm_midway_leaves_nothing(tmp_path):
    proc, out, stage = _start_child(tmp_path)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    assert rc == 128 + signal.SIGTERM, proc.stderr.read().decode()
    assert not stage.exists() and not out.exists()
    assert _siblings(out.parent) == []


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_sigkill_leftover_is_removed_by_next_run(tmp_path, result, fast_pictures):
    proc, out, stage = _start_child(tmp_path)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert stage.is_dir() and not out.exists()         # SIGKILL cannot be cleaned up
    write_outputs(result, out)
    assert _siblings(out.parent) == ["out"]
    verify_outputs(out)


# ----------------------------------------------------------------------------- motion, qc
def test_motion_adaptation_outputs(tmp_path):
    source = make_result(phases=2, recon_phases=(0, 1), evil=False, seed=1)
    target = make_result(phases=3, recon_phases=(0, 1, 2), evil=False, seed=2)
    adapted = dataclasses.replace(source, kind="motion_adaptation",
                                  extra={"source": source, "target": target})
    out = write_outputs(adapted, tmp_path / "motion")
    files = set(verify_outputs(out)["files"])
    assert {"adapted/image_frame01.nii.gz", "adapted/image_frame04.nii.gz",
            "qc/volume_curves_motion.png"} <= files
    img = sitk.ReadImage(str(out / "adapted" / "image_frame04.nii.gz"))
    assert img.GetSize() == (80, 72, 8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), adapted.study.images[1])
    with open(out / "measures.csv", newline="") as f:
        sources = [r["source"] for r in csv.DictReader(f)]
    assert sources == ["native", "hr", "source/native", "source/hr", "target/native", "target/hr"]
    page = (out / "report.html").read_text()
    assert "qc/volume_curves_motion.png" in page and "target native" in page


def test_lv_centre():
    lab = np.zeros((3, 10, 12), np.uint8)
    assert lv_centre(lab) is None
    lab[1, 2:5, 6:9] = 2
    assert lv_centre(lab) == pytest.approx((1.0, 3.0, 7.0))
    lab[2, 4, 4] = 1
    assert lv_centre(lab) == pytest.approx((2.0, 4.0, 4.0))


def test_write_from_a_worker_thread(result, tmp_path, fast_pictures):
    """Off the main thread no signal handler can be installed; the write still works."""
    import threading

    errors = []

    def run():
        try:
            write_outputs(result, tmp_path / "t")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=run)
    th.start()
    th.join(60)
    assert not errors and verify_outputs(tmp_path / "t")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_terminating_signals_raise_keeps_other_handlers_and_restores():
    """The one signal policy: SIGTERM and SIGHUP raise Terminated (exit status 128 + n)
    while active, a handler someone else installed is kept, and the previous handlers
    come back afterwards."""
    from deeprecon.runtime.signals import Terminated, terminating_signals_raise

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with terminating_signals_raise():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                handler = signal.getsignal(sig)
                assert handler not in (signal.SIG_DFL, signal.SIG_IGN)
                with pytest.raises(Terminated) as exc:
                    handler(sig, None)
                assert isinstance(exc.value, SystemExit) and exc.value.code == 128 + sig
                assert exc.value.signal_name == signal.Signals(sig).name
            installed = signal.getsignal(signal.SIGTERM)
            with terminating_signals_raise():       # nested: left as it is
                assert signal.getsignal(signal.SIGTERM) is installed
            assert signal.getsignal(signal.SIGTERM) is installed
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
        mine = lambda signum, frame: None  # noqa: E731
        signal.signal(signal.SIGTERM, mine)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)      # as under nohup
        with terminating_signals_raise():
            assert signal.getsignal(signal.SIGTERM) is mine
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGHUP, previous[1])


def test_single_slice_single_phase(tmp_path):
    """No slice spacing (the thickness stands in) and no ES: every writer still works."""
    r = make_result(slices=1, phases=1, recon_phases=(0,), evil=False)
    out = write_outputs(r, tmp_path / "one")
    assert "qc/long_axis.png" in verify_outputs(out)["files"]
    img = sitk.ReadImage(str(out / "hr" / "labels_frame01.nii.gz"))
    assert img.GetSize() == (48, 48, 1) and img.GetSpacing()[2] == pytest.approx(8.0 / r.interp)
    with open(out / "measures.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["ES frame"] == "" and rows[0]["LVEF (%)"] == ""
