"""`deeprecon-rt reconstruct`, `adapt-motion` and `bundle info` end to end with a tiny
bundle: every output file, a second run into the same folder, runs killed midway, and
the exit codes of bad studies, bad bundles and bad options."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from deeprecon.runtime import bundle as runtime_bundle
from deeprecon.runtime.cli import run
from deeprecon.runtime.errors import ExitCode
from deeprecon.runtime.phantom import make_phantom, write_phantom

EXE = shutil.which("deeprecon-rt") or str(Path(sys.executable).parent / "deeprecon-rt")


def _outputs_manifest(out: Path) -> dict:
    return json.loads((out / "outputs.json").read_text())


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_reconstruct_acdc_writes_every_output(tiny_bundle, acdc_patient001, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run(["reconstruct", str(acdc_patient001), "-o", str(out), "--bundle", str(tiny_bundle),
              "--steps", "2", "--interp", "2", "--json", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    man = _outputs_manifest(out)
    files = {f for f in man["files"]}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == files | {"outputs.json"}
    for must in ("measures.csv", "measures.json", "report.html", "run_report.json"):
        assert must in files
    segs = sorted(f for f in files if f.startswith("segmentation/") and f.endswith(".nii.gz"))
    assert len(segs) == 2                                    # ED and ES
    ref = sitk.ReadImage(str(acdc_patient001 / "patient001_frame01.nii.gz"))
    seg = sitk.ReadImage(str(out / segs[0]))
    assert seg.GetSize() == ref.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(seg.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(seg.GetDirection(), ref.GetDirection(), atol=1e-5)
    hr = [f for f in files if f.startswith("hr/") and "label" in f]
    assert len(hr) == 2
    hri = sitk.ReadImage(str(out / sorted(hr)[0]))
    assert hri.GetSize()[2] == (ref.GetSize()[2] - 1) * 2 + 1
    assert hri.GetSpacing()[2] == pytest.approx(ref.GetSpacing()[2] / 2, rel=1e-4)
    np.testing.assert_allclose(hri.GetDirection(), ref.GetDirection(), atol=1e-5)
    report = json.loads((out / "run_report.json").read_text())
    assert report["bundle"]["sha256"] and report["timings_s"]["invert"] >= 0
    assert report["options"]["backend_info"]["threads"] == 1          # --threads, recorded
    assert summary["measures"]["native"]["LVEDV (mL)"] >= 0
    islands = report["options"]["largest_component"]   # on by default, recorded
    assert islands["bridge_mm"] == 10.0 and len(islands["removed_native"]) == 2

    # a second run into the same folder replaces it, leaving nothing else behind
    first = man["files"]["measures.json"]["sha256"]
    rc = run(["reconstruct", str(acdc_patient001), "-o", str(out), "--bundle", str(tiny_bundle),
              "--fast", "--interp", "1", "--json", "--keep-islands"])
    assert rc == 0
    assert _leftovers(tmp_path, {"out"}) == []
    report = json.loads((out / "run_report.json").read_text())
    assert report["options"]["largest_component"] is None
    man2 = _outputs_manifest(out)
    assert man2["files"]["measures.json"]["sha256"] != first
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(man2["files"]) | {"outputs.json"}   # nothing left of the first run


def test_adapt_motion_and_bundle_info(tiny_bundle, tmp_path, capsys):
    for seed in (1, 2):
        write_phantom(make_phantom(slices=5, phases=2, seed=seed, matrix=(64, 72),
                                   pixel_spacing_mm=3.0), tmp_path / f"p{seed}", preview=False)
    out = tmp_path / "motion"
    rc = run(["adapt-motion", str(tmp_path / "p1"), str(tmp_path / "p2"), "-o", str(out),
              "--bundle", str(tiny_bundle), "--steps", "1", "--interp", "2"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "report.html").is_file() and (out / "measures.csv").is_file()
    capsys.readouterr()
    assert run(["bundle", "info", str(tiny_bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"encoder", "generator", "segmenter", "lpips"} <= set(info["graphs"])
    assert run(["bundle", "info", str(tiny_bundle)]) == 0


def test_default_bundle_shipped_or_from_the_environment(tiny_bundle, tmp_path, capsys,
                                                        monkeypatch):
    """Without --bundle, `reconstruct` and `bundle info` use $DEEPRECON_BUNDLE when set,
    else the shipped reference bundle; a set-but-invalid $DEEPRECON_BUNDLE is a one-line
    exit 69 (never a fallback to the shipped one), and so is a missing reference bundle.
    The run report names the bundle and carries the plausibility flags."""
    write_phantom(make_phantom(slices=5, phases=2, seed=3, matrix=(64, 72),
                               pixel_spacing_mm=3.0), tmp_path / "study", preview=False)
    study = str(tmp_path / "study")
    none = tmp_path / "no_reference"
    monkeypatch.delenv("DEEPRECON_BUNDLE", raising=False)

    def info_path() -> str:
        assert run(["bundle", "info", "--json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)["path"]

    def reconstruct(out: Path) -> dict:
        rc = run(["reconstruct", study, "-o", str(out), "--fast", "--interp", "1", "--json"])
        assert rc == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out)
        report = json.loads((out / "run_report.json").read_text())
        assert summary["plausibility"] == report["plausibility"]
        return report

    # the shipped reference bundle (its location monkeypatched to the tiny bundle)
    monkeypatch.setattr(runtime_bundle, "SHIPPED_BUNDLE", Path(tiny_bundle))
    assert Path(info_path()) == Path(tiny_bundle)
    assert run(["bundle", "info"]) == 0                       # the human-readable table
    capsys.readouterr()
    report = reconstruct(tmp_path / "out_shipped")
    assert Path(report["bundle"]["path"]) == Path(tiny_bundle)
    assert report["bundle"]["preset"] == "tiny" and len(report["bundle"]["sha256"]) == 64
    assert report["bundle"]["provenance"]["command"] == "tests/bundles.py make_tiny_bundle"
    # untrained networks: implausible measures, each flag also a warning
    assert report["plausibility"], "a random bundle's measures should be flagged"
    for f in report["plausibility"]:
        assert f["message"] in report["warnings"] and f["source"] in ("native", "hr")
    page = (tmp_path / "out_shipped" / "report.html").read_text()
    assert 'class="alert"' in page and "preset tiny" in page

    # $DEEPRECON_BUNDLE, with no reference bundle shipped
    monkeypatch.setattr(runtime_bundle, "SHIPPED_BUNDLE", none)
    monkeypatch.setenv("DEEPRECON_BUNDLE", str(tiny_bundle))
    assert Path(info_path()) == Path(tiny_bundle).resolve()
    report = reconstruct(tmp_path / "out_env")
    assert Path(report["bundle"]["path"]) == Path(tiny_bundle).resolve()

    # set but invalid: an error naming the variable, even though a bundle ships
    monkeypatch.setattr(runtime_bundle, "SHIPPED_BUNDLE", Path(tiny_bundle))
    for bad, why in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "holds no manifest.json")):
        monkeypatch.setenv("DEEPRECON_BUNDLE", str(bad))
        for args in (["bundle", "info"], ["reconstruct", study, "-o", str(tmp_path / "o")]):
            assert run(args) == ExitCode.UNAVAILABLE
            err = capsys.readouterr().err
            assert "DEEPRECON_BUNDLE" in err and why in err and "Traceback" not in err
            assert err.startswith("deeprecon-rt: error:")
    assert not (tmp_path / "o").exists()

    # empty counts as unset; with no reference bundle: the one-line exit 69 of today
    monkeypatch.setenv("DEEPRECON_BUNDLE", "")
    monkeypatch.setattr(runtime_bundle, "SHIPPED_BUNDLE", none)
    for args in (["bundle", "info"], ["reconstruct", study, "-o", str(tmp_path / "o")]):
        assert run(args) == ExitCode.UNAVAILABLE
        err = capsys.readouterr().err
        assert "no reference bundle ships" in err and "--bundle" in err


def _broken_study(kind: str, root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from dicom_series import synthetic_study, write_dicom_series
    st = synthetic_study(phases=2, slices=5, rows=24, cols=24, slice_spacing=10.0)
    if kind == "missing_slice":
        write_dicom_series(st, root, edit=lambda ds, p, s: None if s == 2 else ds)
    elif kind == "non_mr":
        write_dicom_series(st, root, modality="CT")
    elif kind == "garbage":
        root.mkdir(parents=True)
        (root / "a.dcm").write_bytes(b"DICM" * 100)
    elif kind == "empty":
        root.mkdir(parents=True)
    return root


@pytest.mark.parametrize("kind,code", [("missing_slice", ExitCode.DATA), ("non_mr", ExitCode.DATA),
                                       ("garbage", ExitCode.DATA), ("empty", ExitCode.NO_INPUT)])
def test_bad_studies_exit_codes(tiny_bundle, tmp_path, kind, code, capsys):
    study = _broken_study(kind, tmp_path / "study")
    rc = run(["reconstruct", str(study), "-o", str(tmp_path / "out"), "--bundle", str(tiny_bundle)])
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err and "deeprecon-rt: error:" in err
    assert "bundle" not in err                 # the study is checked before the bundle opens
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path, {"study"}) == []


def test_bad_options_bundles_and_devices(tiny_bundle, acdc_patient001, tmp_path, capsys,
                                        monkeypatch):
    args = [str(acdc_patient001), "-o", str(tmp_path / "out")]
    assert run(["reconstruct", str(tmp_path / "nope"), "-o", str(tmp_path / "o"),
                "--bundle", str(tiny_bundle)]) == ExitCode.NO_INPUT
    assert run(["reconstruct", *args, "--bundle", str(tiny_bundle), "--fast",
                "--steps", "3"]) == ExitCode.USAGE
    assert run(["reconstruct", *args, "--bundle", str(tiny_bundle),
                "--backend", "nope"]) == ExitCode.USAGE
    assert run(["reconstruct", *args, "--bundle", str(tiny_bundle),
                "--phases", "ed,99"]) == ExitCode.USAGE
    assert run(["reconstruct", *args, "--bundle", str(tiny_bundle),
                "--threads", "0"]) == ExitCode.USAGE
    import torch
    if not torch.cuda.is_available():
        assert run(["reconstruct", *args, "--bundle", str(tiny_bundle),
                    "--device", "cuda"]) == ExitCode.UNAVAILABLE
    capsys.readouterr()
    monkeypatch.delenv("DEEPRECON_BUNDLE", raising=False)             # no default bundle
    monkeypatch.setattr(runtime_bundle, "SHIPPED_BUNDLE", tmp_path / "no_reference")
    assert run(["reconstruct", *args]) == ExitCode.UNAVAILABLE
    assert "no reference bundle" in capsys.readouterr().err
    # a bundle with one byte changed
    bad = tmp_path / "bad_bundle"
    shutil.copytree(tiny_bundle, bad)
    f = bad / "programs" / "generator.pt2"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert run(["reconstruct", *args, "--bundle", str(bad)]) == ExitCode.BAD_BUNDLE
    assert "generator.pt2" in capsys.readouterr().err
    assert run(["bundle", "info", str(bad)]) == ExitCode.BAD_BUNDLE
    # an output folder holding someone else's files is refused before any work
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert run(["reconstruct", str(acdc_patient001), "-o", str(foreign),
                "--bundle", str(tiny_bundle)]) == ExitCode.USAGE
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_leaves_no_partial_output(tiny_bundle, acdc_patient001, tmp_path, sig):
    """A run killed during the inversion: no output folder; a SIGKILLed run's staging
    folder (if any) is removed by the next run into the same parent."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([EXE, "reconstruct", str(acdc_patient001), "-o", str(out),
                          "--bundle", str(tiny_bundle), "--steps", "100000", "--patience", "0",
                          "--interp", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        # the bundle is opened just before the pipeline starts; the inversion follows
        lines = []
        while p.poll() is None and not any("opened" in ln for ln in lines):
            lines.append(p.stderr.readline())
        time.sleep(3.0)
        assert p.poll() is None, lines
        p.send_signal(sig)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == (128 + 15 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert _leftovers(tmp_path, set()) == []
    rc = run(["-q", "reconstruct", str(acdc_patient001), "-o", str(out),
              "--bundle", str(tiny_bundle), "--fast", "--interp", "1"])
    assert rc == 0
    assert _leftovers(tmp_path, {"out"}) == []
