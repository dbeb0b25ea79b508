"""Issue 12, section 4: `deeprecon-rt cohort` over a folder of studies with one model
load: one output folder per study, a broken study recorded with its exit code and the
run going on, parts as nnU-Net splits them, resuming (finished studies skipped by their
verified outputs.json, a tampered one redone) and the summary CSV."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import SimpleITK as sitk

from deeprecon.runtime.cli import run
from deeprecon.runtime.cohort import SUMMARY_COLUMNS, list_studies, part_of
from deeprecon.runtime.errors import ExitCode, NoInputError, UsageError
from deeprecon.runtime.phantom import make_phantom


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Six studies: five phantoms (4D NIfTI files) and one corrupt file; beside them a
    label file and a text file, which are not studies."""
    root = tmp_path_factory.mktemp("cohort") / "in"
    root.mkdir()
    for k in range(5):
        st = make_phantom(slices=6, phases=2, seed=k, matrix=(64, 64), pixel_spacing_mm=3.0).study
        sitk.WriteImage(st.to_sitk(st.images), str(root / f"sub{k}.nii.gz"))
        if k == 0:
            sitk.WriteImage(st.to_sitk(st.labels), str(root / "sub0_gt.nii.gz"))
    (root / "sub9.nii.gz").write_bytes(b"\x1f\x8b not a nifti at all")
    (root / "notes.txt").write_text("cohort exported 2026-12-01")
    return root


def _summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == list(SUMMARY_COLUMNS)
    return {r["study"]: r for r in rows}


def test_listing_and_parts(cohort, tmp_path):
    studies, warnings = list_studies(cohort)
    assert [p.name for p in studies] == [f"sub{k}.nii.gz" for k in (0, 1, 2, 3, 4, 9)]
    assert any("notes.txt" in w for w in warnings)
    assert [p.name for p in part_of(studies, 2, 1)] == ["sub1.nii.gz", "sub3.nii.gz", "sub9.nii.gz"]
    with pytest.raises(UsageError):
        part_of(studies, 2, 2)
    (tmp_path / "a.nii").write_bytes(b"")
    (tmp_path / "a.nii.gz").write_bytes(b"")
    with pytest.raises(UsageError, match="would both write a/"):
        list_studies(tmp_path)
    with pytest.raises(NoInputError):
        list_studies(tmp_path / "missing")


def test_cohort_in_two_parts_then_resumed(cohort, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["cohort", str(cohort), "-o", str(out), "--bundle", str(tiny_bundle), "--fast",
            "--backend", "torch", "--device", "cpu"]
    # part 0 of 2: sub0, sub2, sub4, all good
    assert run(base + ["--num-parts", "2", "--part-id", "0"]) == ExitCode.OK
    part0 = _summary(out / "cohort_summary.part0-of-2.csv")
    assert set(part0) == {"sub0", "sub2", "sub4"} and {r["status"] for r in part0.values()} == {"done"}
    assert all(float(r["hr LVEDV (mL)"]) > 0 for r in part0.values())
    # part 1 of 2 holds the broken file: recorded (65), the others written, exit 1
    assert run(base + ["--num-parts", "2", "--part-id", "1"]) == ExitCode.PARTIAL
    part1 = _summary(out / "cohort_summary.part1-of-2.csv")
    assert part1["sub9"]["status"] == "failed" and part1["sub9"]["exit_code"] == "65"
    assert "sub9.nii.gz" in part1["sub9"]["message"] and part1["sub9"]["hr LVEDV (mL)"] == ""
    assert part1["sub1"]["status"] == part1["sub3"]["status"] == "done"
    assert not (out / "sub9").exists()
    for k in range(5):
        assert (out / f"sub{k}" / "outputs.json").is_file()
    err = capsys.readouterr().err
    assert "[3/3] sub9: failed (exit 65" in err and "Traceback" not in err

    # resumed as one part: the five finished studies are skipped, the broken one retried
    (out / "sub3" / "measures.csv").write_text("tampered")
    assert run(base) == ExitCode.PARTIAL
    whole = _summary(out / "cohort_summary.csv")
    assert [whole[f"sub{k}"]["status"] for k in (0, 1, 2, 4)] == ["skipped"] * 4
    assert whole["sub3"]["status"] == "done"          # its outputs no longer verified
    assert whole["sub9"]["status"] == "failed"
    assert whole["sub0"]["hr LVEDV (mL)"] == part0["sub0"]["hr LVEDV (mL)"]  # read back
    assert "4 skipped (finished before), 1 failed" in capsys.readouterr().out


def test_cohort_on_ray_gives_what_the_local_engine_gives(cohort, tiny_bundle, tmp_path):
    """--engine ray on a local Ray instance: the same statuses, exit codes and measures
    as the local engine (K = 0 is deterministic), one actor loading the bundle once."""
    import ray  # noqa: F401  (the [test] extra installs it: its absence fails the test)

    runs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        code = run(["cohort", str(cohort), "-o", str(out), "--bundle", str(tiny_bundle), "--fast",
                    "--backend", "torch", "--device", "cpu", "--engine", engine, "--ray-actors", "1"])
        assert code == ExitCode.PARTIAL
        runs[engine] = _summary(out / "cohort_summary.csv")
    local, on_ray = runs["local"], runs["ray"]
    assert set(local) == set(on_ray)
    for name in local:
        for col in ("status", "exit_code", "message", "flags", "hr LVEDV (mL)", "native LVEF (%)"):
            assert local[name][col] == on_ray[name][col], (name, col)
    assert on_ray["sub9"]["status"] == "failed" and on_ray["sub9"]["exit_code"] == "65"


def test_worker_records_every_kind_of_failure(tmp_path):
    """CohortWorker.run_one never raises for a study: a DeepreconError keeps its code, a
    foreign error its mapped code (the kernel's, 69), memory 75, anything else 70."""
    from deeprecon.cpp_ext.errors import KernelUnavailableError
    from deeprecon.runtime.cohort import CohortWorker
    from deeprecon.runtime.errors import InvalidStudyError

    worker = CohortWorker.__new__(CohortWorker)   # no bundle needed: process is replaced
    cases = [(InvalidStudyError("bad slice\n gap"), 65, "bad slice gap"),
             (KernelUnavailableError("no fused kernel"), 69, "no fused kernel"),
             (MemoryError(), 75, "out of memory"), (ZeroDivisionError("x"), 70, "internal error: ZeroDivisionError: x")]
    for exc, code, text in cases:
        def boom(path, out, exc=exc):
            raise exc
        worker.process = boom
        status, got, message, seconds = worker.run_one(tmp_path / "s", tmp_path / "o")
        assert (status, got) == ("failed", code) and message.startswith(text), (exc, message)
    with pytest.raises(KeyboardInterrupt):
        worker.process = lambda p, o: (_ for _ in ()).throw(KeyboardInterrupt())
        worker.run_one(tmp_path / "s", tmp_path / "o")


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_missing_bundle_is_one_line_and_its_own_exit_code(cohort, tmp_path, capsys, engine):
    """Checked before any study (and before Ray starts): exit 66 naming the bundle."""
    code = run(["cohort", str(cohort), "-o", str(tmp_path / "out"), "--bundle", str(tmp_path / "none"),
                "--fast", "--engine", engine])
    err = capsys.readouterr().err
    assert code == ExitCode.NO_INPUT and "none does not exist" in err and "Traceback" not in err
