"""The console script end to end: help, exit codes, study info, phantom, eval seg."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from deeprecon.runtime.cli import run

EXE = shutil.which("deeprecon-rt") or str((__import__("pathlib").Path(sys.executable).parent / "deeprecon-rt"))


def cli(*args, check_rc=None):
    """Run the installed console script; return (rc, stdout, stderr)."""
    p = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p.returncode, p.stdout, p.stderr


def test_help_and_version():
    rc, out, _ = cli("--help", check_rc=0)
    for cmd in ("study", "phantom", "eval"):
        assert cmd in out
    rc, out, _ = cli("--version", check_rc=0)
    assert out.startswith("deeprecon-rt ")


def test_help_is_true_to_what_ships():
    """--bundle's help names the shipped bundle only when one ships; the commands and the
    input conventions (-i, -o/--output, several inputs, cohort) are listed."""
    from deeprecon.runtime.bundle import MANIFEST, SHIPPED_BUNDLE

    rc, out, _ = cli("reconstruct", "--help", check_rc=0)
    text = " ".join(out.replace("│", " ").split())
    ships = (SHIPPED_BUNDLE / MANIFEST).is_file()
    assert ("no reference bundle ships with this version yet" in text) != ships
    for phrase in ("--input", "--output", "--phase-names", "ED.nii.gz ES.nii.gz", "--device"):
        assert phrase in text, phrase
    rc, out, _ = cli("--help", check_rc=0)
    assert "cohort" in out and "reconstruct" in out


def test_usage_errors_exit_2():
    assert cli("no-such-command")[0] == 2
    assert cli("study", "info")[0] == 2          # missing PATH
    rc, _, err = cli("-v", "-q", "study", "info", "x")
    assert rc == 2 and "exclude each other" in err


def test_missing_input_exits_66_without_traceback(tmp_path):
    rc, out, err = cli("study", "info", tmp_path / "does-not-exist")
    assert rc == 66, err
    assert "Traceback" not in err and "error:" in err


def test_empty_folder_exits_66(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    rc, _, err = cli("study", "info", tmp_path)
    assert rc == 66, err
    assert "Traceback" not in err


def test_study_info_acdc_patient001_json(acdc_patient001):
    rc, out, err = cli("study", "info", acdc_patient001, "--json", check_rc=0)
    d = json.loads(out)
    assert d["phases"] == 2 and d["slices"] == 10
    assert d["pixel_spacing_mm"] == pytest.approx([1.5625, 1.5625])
    assert d["slice_gap_mm"] == pytest.approx(10.0)
    assert d["has_labels"] is True
    assert d["info"]["group"] == "DCM"
    assert (d["ed_phase"], d["es_phase"]) == (0, 1)


def test_study_info_human_readable(acdc_patient001):
    rc, out, _ = cli("study", "info", acdc_patient001, check_rc=0)
    assert "1.5625" in out and "10" in out


def test_phantom_then_study_info_then_eval(tmp_path):
    out_dir = tmp_path / "ph"
    rc, out, err = cli("phantom", out_dir, "--slices", 6, "--phases", 3, "--seed", 1, "--json", check_rc=0)
    files = json.loads(out)
    for key in ("preview",):
        assert key in files
    assert (out_dir / "sax.nii.gz").is_file() and (out_dir / "sax_gt.nii.gz").is_file()
    assert (out_dir / "preview.png").stat().st_size > 10_000
    rc, out, err = cli("study", "info", out_dir, "--json", check_rc=0)
    d = json.loads(out)
    assert (d["phases"], d["slices"], d["has_labels"]) == (3, 6, True)
    # a label file against itself: perfect agreement
    gt = out_dir / "sax_gt.nii.gz"
    rc, out, err = cli("eval", "seg", gt, gt, "--json", check_rc=0)
    res = json.loads(out)
    for name in ("LVC", "LVM", "RVC"):
        assert res["structures"][name]["dice"] == pytest.approx(1.0)
        assert res["structures"][name]["hd95_mm"] == pytest.approx(0.0)


def test_eval_seg_grid_mismatch_exits_65(tmp_path):
    import SimpleITK as sitk
    a = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.uint8))
    b = sitk.GetImageFromArray(np.zeros((4, 8, 9), np.uint8))
    sitk.WriteImage(a, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(b, str(tmp_path / "b.nii.gz"))
    rc, _, err = cli("eval", "seg", tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    assert rc == 65, err
    rc, _, err = cli("eval", "seg", tmp_path / "a.nii.gz", tmp_path / "missing.nii.gz")
    assert rc == 66, err


def test_run_returns_code_in_process(tmp_path):
    # the embedding entry point returns codes instead of exiting
    assert run(["study", "info", str(tmp_path / "nope")]) == 66
    assert run(["--version"]) == 0
