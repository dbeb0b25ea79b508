"""The reference bundle that ships with the package (runtime/models/reference): it is
complete (every file's SHA-256), within the package's size budget, describes itself
(training data, preset, validation figures, licence), and `reconstruct` with no --bundle
runs it and names it in the report. With the ACDC data present, it segments a
validation-split patient it was never trained on: the figures asserted are far below the
measured ones (training/cpu64w/README.md), so that the test fails on a broken model, a
wrong preprocessing or a mixed-up label order, not on noise. Skipped while none ships."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deeprecon.runtime.bundle import MANIFEST, SHIPPED_BUNDLE, load_bundle
from deeprecon.runtime.cli import run

pytestmark = pytest.mark.skipif(not (SHIPPED_BUNDLE / MANIFEST).is_file(),
                                reason="no reference bundle ships in this tree")

MAX_BYTES = 40 * 2**20   # the budget for the package's bundle
SPLIT = Path(__file__).resolve().parents[1] / "trainer" / "splits" / "acdc.json"


def test_reference_bundle_is_complete_small_and_describes_itself(monkeypatch, capsys):
    monkeypatch.delenv("DEEPRECON_BUNDLE", raising=False)
    b = load_bundle(SHIPPED_BUNDLE)          # checks every file's SHA-256
    size = sum(p.stat().st_size for p in SHIPPED_BUNDLE.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"{size / 2**20:.1f} MiB"
    prov = b.manifest["provenance"]
    assert "non-commercial" in prov["licence"] and "ACDC" in prov["licence"]
    assert prov["training_data"]["dataset"] == "ACDC"
    val = prov["validation"]
    assert set(val["dice"]) >= {"LVC", "LVM", "RVC"} and val["patients"] == 20
    assert run(["bundle", "info", "--json"]) == 0        # no argument: the shipped one
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == b.sha256 and info["provenance"]["licence"] == prov["licence"]


def test_reconstruct_without_bundle_runs_the_reference_on_a_validation_patient(
        acdc_root, tmp_path, monkeypatch, capsys):
    import SimpleITK as sitk

    from deeprecon.runtime.metrics import evaluate_segmentation
    from deeprecon.runtime.io import load_study

    monkeypatch.delenv("DEEPRECON_BUNDLE", raising=False)
    pid = json.loads(SPLIT.read_text())["val"][0]
    out = tmp_path / "out"
    # K = 20 instead of the bundle's 100: a quarter of the time, and far above the bounds
    assert run(["reconstruct", str(acdc_root / pid), "-o", str(out), "--json", "--steps", "20"]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    report = json.loads((out / "run_report.json").read_text())
    assert Path(report["bundle"]["path"]) == SHIPPED_BUNDLE
    assert report["bundle"]["sha256"] == load_bundle(SHIPPED_BUNDLE).sha256
    assert "licence" in report["bundle"]["provenance"]
    study = load_study(acdc_root / pid)
    for p, frame in enumerate(study.phase_ids):
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation" / f"seg_frame{frame:02d}.nii.gz")))
        m = evaluate_segmentation(pred, study.labels[p], (10.0, 1.0, 1.0))
        for name, least in (("LVC", 0.6), ("LVM", 0.4), ("RVC", 0.2)):
            assert m[name]["dice"] >= least, (pid, frame, name, m[name]["dice"])
