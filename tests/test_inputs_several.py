"""Issue 12, section 1: several inputs form one study (`reconstruct ED.nii.gz ES.nii.gz`,
repeated -i), phases named ED/ES from the file names or --phase-names, a folder with an
ED/ES pair beside long-axis files, and a single phase measured as what it is named.

`reconstruct` is given a bundle path that does not exist where only the loading is
tested: exit 66 naming the missing bundle shows the inputs were accepted, exit 65 or 2
that they were refused first.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from deeprecon.runtime.cli import run
from deeprecon.runtime.errors import ExitCode, UsageError
from deeprecon.runtime.io import AmbiguousInputError, GeometryMismatchError, load_studies, load_study, phase_name_of
from deeprecon.runtime.measures import study_measures
from deeprecon.runtime.phantom import make_phantom, write_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(slices=4, phases=2, matrix=(40, 40), lax_matrix=(40, 40),
                        pixel_spacing_mm=3.0, lax_pixel_spacing_mm=3.0, thickness_samples=1)


def _write_phase(study, p: int, path: Path, *, labels: bool = True) -> Path:
    sitk.WriteImage(study.to_sitk(study.images[p]), str(path))
    if labels:
        sitk.WriteImage(study.to_sitk(study.labels[p]),
                        str(path.with_name(path.name.replace(".nii.gz", "_gt.nii.gz"))))
    return path


@pytest.fixture()
def ed_es(phantom, tmp_path):
    """The phantom's ED and ES as two 3D NIfTI files with label siblings."""
    st = phantom.study
    ed = _write_phase(st, st.ed_phase, tmp_path / "case01_SA_ED.nii.gz")
    es = _write_phase(st, st.es_phase, tmp_path / "case01_SA_ES.nii.gz")
    return ed, es


@pytest.mark.parametrize("name,want", [
    ("case01_SA_ED.nii.gz", "ED"), ("patient_es.nii", "ES"), ("ES.nii.gz", "ES"),
    ("sub-01_end-diastole.nii.gz", "ED"), ("x_diastole.nii.gz", "ED"), ("systole", "ES"),
    ("cine_sa.nii.gz", None), ("bed.nii.gz", None), ("ED_ES.nii.gz", None)])
def test_phase_name_from_file_names(name, want):
    assert phase_name_of(name) == want


def test_two_phase_files_are_one_study_ordered_and_named(phantom, ed_es):
    st = phantom.study
    ed, es = ed_es
    got = load_studies([es, ed])                        # given ES first: ED comes first
    assert got.n_phases == 2 and (got.ed_phase, got.es_phase) == (0, 1)
    np.testing.assert_allclose(got.images[0], st.images[st.ed_phase], rtol=1e-6)
    np.testing.assert_allclose(got.images[1], st.images[st.es_phase], rtol=1e-6)
    assert np.array_equal(got.labels[1], st.labels[st.es_phase])
    assert got.info["phase_names"] == ["ED", "ES"] and got.info["phase_names_from"] == "from the file names"
    m = study_measures(got)
    assert m["ed_es_from"] == "given" and m["LVEF (%)"] > 20
    # names given instead: the same files called the other way round
    swapped = load_studies([ed, es], phase_names=["ES", "ED"])
    assert (swapped.ed_phase, swapped.es_phase) == (0, 1)
    np.testing.assert_allclose(swapped.images[0], st.images[st.es_phase], rtol=1e-6)


def test_a_folder_with_an_ed_es_pair_and_long_axis_files(phantom, ed_es, tmp_path):
    # a long-axis file of the same case beside the pair (named as M&Ms-2 does)
    lax = write_phantom(phantom, tmp_path / "ph")["lax_4ch"]
    shutil.copy(lax, tmp_path / "case01_LA_ED.nii.gz")
    got = load_study(tmp_path)
    assert (got.n_phases, got.ed_phase, got.es_phase) == (2, 0, 1)
    assert any("case01_LA_ED.nii.gz" in w and "long-axis" in w for w in got.warnings)
    # no pair any more: ambiguous (65), and the hint names a short-axis file
    (tmp_path / "case01_SA_ES.nii.gz").rename(tmp_path / "other.nii.gz")
    with pytest.raises(AmbiguousInputError) as e:
        load_study(tmp_path)
    assert "LA_ED" not in e.value.hint and "ED and ES files" in e.value.hint


def test_one_phase_named_es_is_measured_as_es(phantom, ed_es):
    _, es = ed_es
    got = load_study(es)
    assert (got.ed_phase, got.es_phase) == (None, 0) and "ES" in got.info["phase_name"]
    m = study_measures(got)
    assert m["LVESV (mL)"] > 0 and math.isnan(m["LVEDV (mL)"]) and math.isnan(m["LVM (g)"])
    assert "named ES" in m["ed_es_from"]
    # --phase-names on a one-phase file overrides the name
    assert load_studies([es], phase_names=["ED"]).ed_phase == 0


def test_several_inputs_refused_when_they_are_not_one_stack(phantom, ed_es, tmp_path):
    ed, es = ed_es
    with pytest.raises(UsageError, match="2 inputs are named ED"):
        load_studies([ed, ed])
    with pytest.raises(UsageError, match="2 phase names for 1 inputs|1 phase names for 2 inputs"):
        load_studies([ed, es], phase_names=["ED"])
    with pytest.raises(UsageError, match="unknown phase name"):
        load_studies([ed, es], phase_names=["ED", "MID"])
    cine = Path(write_phantom(phantom, tmp_path / "ph")["sax"])  # 4D
    with pytest.raises(UsageError, match="several inputs must be one phase"):
        load_studies([cine, es])
    st = phantom.study
    moved = st.to_sitk(st.images[st.es_phase])
    moved.SetOrigin(tuple(np.asarray(moved.GetOrigin()) + 5.0))
    sitk.WriteImage(moved, str(tmp_path / "moved_ES.nii.gz"))
    with pytest.raises(GeometryMismatchError, match="not the same short-axis stack"):
        load_studies([ed, tmp_path / "moved_ES.nii.gz"])


def test_cli_takes_several_inputs_as_arguments_or_repeated_i(ed_es, tmp_path, capsys):
    ed, es = ed_es
    assert run(["study", "info", str(es), str(ed), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["phases"], d["ed_phase"], d["es_phase"]) == (2, 0, 1)
    assert run(["study", "info", "-i", str(ed), "-i", str(es), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["info"]["inputs"] == [str(ed), str(es)]
    # reconstruct accepts them (and -o/--output) and fails only on the missing bundle
    code = run(["reconstruct", "-i", str(ed), "-i", str(es), "--output", str(tmp_path / "out"),
                "--bundle", str(tmp_path / "no-bundle")])
    assert code == ExitCode.NO_INPUT and "no-bundle does not exist" in capsys.readouterr().err
    assert run(["reconstruct", str(ed), str(ed), "-o", str(tmp_path / "out")]) == ExitCode.USAGE
    assert "named ED" in capsys.readouterr().err
    assert run(["study", "info"]) == ExitCode.USAGE


def test_progress_lines_carry_an_eta(caplog, monkeypatch):
    """Without a terminal the progress is a log line per quarter of a stage, with the
    elapsed time and an ETA until the stage is done."""
    import logging

    from deeprecon.runtime import cli

    ticks = iter([0.0, 2.0, 4.0, 8.0])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(ticks))
    with caplog.at_level(logging.INFO, logger="deeprecon"):
        with cli._Progress() as progress:
            progress.tty = False
            for done in (0, 1, 2, 4):
                progress("invert", done, 4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("invert")]
    assert lines == ["invert: 1/4 (2 s, ETA 6 s)", "invert: 2/4 (4 s, ETA 4 s)", "invert: 4/4 (8 s)"]


def test_cli_dicom_without_series_uid(tmp_path, capsys):
    """Two patients' cine series without SeriesInstanceUID in one folder: `study info`
    exits 65 listing both by PatientID:StudyInstanceUID:SeriesNumber, and that key
    picks one."""
    import sys as _sys
    _sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dicom_series import synthetic_study, write_dicom_series

    def no_uids(ds, p, s):
        del ds.SeriesInstanceUID
        del ds.StudyInstanceUID
        return ds

    for pid, seed in (("DSB_1", 0), ("DSB_2", 1)):
        write_dicom_series(synthetic_study(phases=3, slices=4, rows=32, cols=32, seed=seed),
                           tmp_path / pid, series_number=5, patient_id=pid, edit=no_uids)
    assert run(["study", "info", str(tmp_path)]) == ExitCode.DATA
    err = capsys.readouterr().err
    assert "DSB_1:-:5" in err and "DSB_2:-:5" in err and "2 patients" in err and "Traceback" not in err
    assert run(["study", "info", str(tmp_path), "--series", "DSB_2:-:5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["series_uid"] == "DSB_2:-:5"
