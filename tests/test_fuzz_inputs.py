"""Hostile inputs through ``deeprecon-rt study info`` (issue 13, section 1): a seeded fuzzer.

A small DICOM series (4 slices x 2 phases, 16 x 16, written by ``dicom_series``), a
small 4D NIfTI (int16 and float32, plain and gzip) and a tiny ACDC folder are mutated
one way per case: a header value replaced by NaN, inf, 0, a negative, 1e-30, 1e308 or
text; an element given the wrong VR; Rows/Columns/PixelData sizes that disagree;
truncation; raw header bytes of the NIfTI overwritten (sform and qform made to
disagree, the time unit changed); NaN voxels; a gzip stream with a broken CRC, length,
body or trailer; Info.cfg values; and a file replaced by, or joined by, a FIFO, a link to
/dev/zero or /dev/urandom, a link leaving the folder or one staying inside it.

Each case runs in-process through the CLI (in a thread, so that a hang fails the test
instead of stopping it) and must end with exit 0, 65 or 66 (never 70), without a
traceback, without a Python warning or library output on stderr (only the error line,
its hint and the runtime's own log lines), within a few seconds; exit 0 only with
finite, positive geometry, and with a warning where the input was repaired or a value
ignored (one file's broken PixelSpacing, a SpacingBetweenSlices the positions
contradict, special files beside a DICOM series).

Runs in the normal suite (no marker): a few hundred cases in well under a minute.
``benchmarks/fuzz_inputs.py`` runs it larger (``DEEPRECON_FUZZ_SCALE`` times the cases,
another ``DEEPRECON_FUZZ_SEED``; the time limit of the suite then does not apply).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import DataElement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_series import synthetic_study, write_dicom_series  # noqa: E402
from test_hardening_inputs import tiny_acdc  # noqa: E402

from deeprecon.runtime.cli import run  # noqa: E402

SEED = int(os.environ.get("DEEPRECON_FUZZ_SEED", "1313"))
SCALE = int(os.environ.get("DEEPRECON_FUZZ_SCALE", "1"))   # benchmarks/fuzz_inputs.py
N_DICOM = 240 * SCALE
N_NIFTI = 120 * SCALE
N_NIFTI_GZ = 40 * SCALE
N_ACDC = 40 * SCALE
N_SPECIAL = 40 * SCALE
CASE_TIME_LIMIT_S = 10.0
ALLOWED = {0, 65, 66}

NUMBERS = ["nan", "inf", "-inf", "0", "-1", "-5", "1e-30", "1e308", "-1e308", "abc", "", "1e5"]
# (keyword, number of values) of the DICOM elements the fuzzer edits
DS_TAGS = [("PixelSpacing", 2), ("ImageOrientationPatient", 6), ("ImagePositionPatient", 3),
           ("SliceThickness", 1), ("TriggerTime", 1), ("SpacingBetweenSlices", 1),
           ("RescaleSlope", 1), ("RescaleIntercept", 1)]
INT_TAGS = ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored",
            "PixelRepresentation", "NumberOfFrames", "InstanceNumber"]
INT_VALUES = [0, 1, 3, 15, 17, 255, 4095, 60000, 65535]
UID_TAGS = ["SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID"]
WRONG_VRS = [("US", 5), ("SS", -1), ("FD", float("nan")), ("OB", b"\x00\xff" * 3),
             ("LO", "x" * 60), ("SQ", []), ("UN", b"\x01\x02\x03")]
TEXT_TAGS = ["Modality", "PhotometricInterpretation", "SeriesDescription", "ImageType"]

# NIfTI-1 header fields: (name, offset, struct format)
NIFTI_FIELDS = [(f"dim[{k}]", 40 + 2 * k, "<h") for k in range(8)] + \
    [(f"pixdim[{k}]", 76 + 4 * k, "<f") for k in range(8)] + \
    [("vox_offset", 108, "<f"), ("scl_slope", 112, "<f"), ("scl_inter", 116, "<f"),
     ("datatype", 70, "<h"), ("bitpix", 72, "<h"), ("qform_code", 252, "<h"),
     ("sform_code", 254, "<h")] + \
    [(n, 256 + 4 * k, "<f") for k, n in enumerate(
        ["quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"])] + \
    [(f"srow[{k}]", 280 + 4 * k, "<f") for k in range(12)] + [("xyzt_units", 123, "<B")]
FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-30, 3e38, -3e38, 2.5]
INTS = [-5, -1, 0, 1, 2, 7, 8, 32767, -32768]
UNITS = [0, 2, 2 | 8, 2 | 16, 2 | 24, 255]   # xyzt_units: mm with sec, msec, usec
SPECIAL_KINDS = ["fifo", "dev_zero", "dev_urandom", "link_out", "link_in"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    import dicom_series
    root = tmp_path_factory.mktemp("fuzz_base")
    study = synthetic_study(phases=2, slices=4, rows=16, cols=16)
    counter = iter(range(10**6))
    original = dicom_series.generate_uid
    dicom_series.generate_uid = lambda: f"1.2.826.0.1.3680043.8.498.1313{next(counter):04d}"
    try:   # the same UIDs every run: byte-level mutations hit the same elements
        write_dicom_series(study, root / "dicom")
    finally:
        dicom_series.generate_uid = original
    out = {"dicom": root / "dicom"}
    for name, dtype in (("nifti_i16", np.int16), ("nifti_f32", np.float32)):
        a = (np.arange(2 * 4 * 8 * 8).reshape(2, 4, 8, 8) % 50).astype(dtype)   # [P, S, H, W]
        img = sitk.GetImageFromArray(a, isVector=False)
        img.SetSpacing((1.5, 1.5, 8.0, 40.0))
        img.SetOrigin((10.0, -20.0, 30.0, 0.0))
        out[name] = root / f"{name}.nii"
        sitk.WriteImage(img, str(out[name]))
    out["nifti_gz"] = root / "nifti_gz.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(out["nifti_i16"])), str(out["nifti_gz"]))
    acdc = tiny_acdc(root / "patient001", "ED: 1\nES: 3\nGroup: NOR\nHeight: 180.0\n"
                                          "NbFrame: 3\nWeight: 80.0\n")
    out["acdc"] = acdc
    return out


# --------------------------------------------------------------------------- mutations
def _value_list(rng, n: int) -> list[str]:
    v = str(rng.choice(NUMBERS))
    if n == 1:
        return [v]
    if rng.random() < 0.5:
        return [v] * n
    vals = ["1", "0", "0", "0", "1", "0"][:n] if n == 6 else ["1.5"] * n
    vals[int(rng.integers(n))] = v
    if rng.random() < 0.2:       # a wrong multiplicity
        vals = vals[: max(1, n - 1)]
    return vals


def _mutate_dataset(ds, rng) -> str:
    """Apply one mutation to a DICOM data set; returns its description."""
    kind = rng.choice(["ds", "ds", "ds", "int", "uid_vr", "wrong_vr", "text", "pixels",
                       "delete", "ts"])
    if kind == "ds":
        tag, n = DS_TAGS[int(rng.integers(len(DS_TAGS)))]
        vals = _value_list(rng, n)
        value = vals if len(vals) > 1 else vals[0]
        try:
            ds[tag] = DataElement(pydicom.datadict.tag_for_keyword(tag), "DS", value)
        except ValueError:   # text pydicom will not hold as DS: written as LO instead
            ds[tag] = DataElement(pydicom.datadict.tag_for_keyword(tag), "LO", value)
        return f"{tag}={vals}"
    if kind == "int":
        tag = str(rng.choice(INT_TAGS))
        v = int(rng.choice(INT_VALUES))
        vr = "IS" if tag in ("NumberOfFrames", "InstanceNumber") else "US"
        ds[tag] = DataElement(pydicom.datadict.tag_for_keyword(tag), vr, str(v) if vr == "IS" else v)
        return f"{tag}={v}"
    if kind in ("uid_vr", "wrong_vr"):
        pool = UID_TAGS if kind == "uid_vr" else [t for t, _ in DS_TAGS] + INT_TAGS
        tag = str(rng.choice(pool))
        vr, v = WRONG_VRS[int(rng.integers(len(WRONG_VRS)))]
        if vr == "SQ":
            from pydicom.sequence import Sequence
            v = Sequence([pydicom.Dataset()])
        ds[tag] = DataElement(pydicom.datadict.tag_for_keyword(tag), vr, v)
        return f"{tag} as VR {vr}"
    if kind == "text":
        tag = str(rng.choice(TEXT_TAGS))
        v = str(rng.choice(["", "RGB", "CT", "MONOCHROME1", "\x00\x01", "LOCALIZER", "x" * 70]))
        setattr(ds, tag, v)
        return f"{tag}={v!r}"
    if kind == "pixels":
        how = str(rng.choice(["double", "half", "minus2", "empty", "plus1row"]))
        px = ds.PixelData
        ds.PixelData = {"double": px * 2, "half": px[: len(px) // 2], "minus2": px[:-2],
                        "empty": b"", "plus1row": px + px[: 2 * int(ds.Columns)]}[how]
        return f"PixelData {how}"
    if kind == "delete":
        tag = str(rng.choice([t for t, _ in DS_TAGS] + ["Rows", "PixelData", "SeriesInstanceUID",
                                                        "Modality", "SOPClassUID"]))
        if tag in ds:
            del ds[tag]
        return f"{tag} deleted"
    v = str(rng.choice(["1.2.3.4.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "junk"]))
    ds.file_meta.TransferSyntaxUID = v
    return f"TransferSyntaxUID={v}"


def _mutate_dicom(folder: Path, rng) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    picks = rng.choice(len(files), size=1 if rng.random() < 0.7 else len(files) // 2, replace=False)
    kind = rng.choice(["dataset"] * 8 + ["truncate", "bytes"])
    descr = []
    for k in picks:
        path = files[int(k)]
        if kind == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: int(rng.integers(0, len(data)))])
            descr.append(f"{path.name} truncated")
            continue
        if kind == "bytes":
            data = bytearray(path.read_bytes())
            for i in rng.integers(128, min(len(data), 900), size=8):
                data[int(i)] = int(rng.integers(256))
            path.write_bytes(bytes(data))
            descr.append(f"{path.name} header bytes flipped")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            try:
                what = _mutate_dataset(ds, rng)
                ds.save_as(path, enforce_file_format=False)
            except Exception:  # noqa: BLE001 - pydicom cannot encode it: a deletion instead
                ds = pydicom.dcmread(path)
                # the first of these the file still has (an earlier mutation may have
                # removed one)
                tag = next(t for t in ("PixelSpacing", "ImagePositionPatient", "Rows")
                           if t in ds)
                del ds[tag]
                ds.save_as(path, enforce_file_format=False)
                what = f"{tag} deleted (fallback)"
        descr.append(f"{path.name}: {what}")
    return "; ".join(descr)


def _mutate_nifti(path: Path, rng) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(["field"] * 6 + ["two_fields", "truncate", "nan_voxels"])
    if kind == "truncate":
        path.write_bytes(bytes(data[: int(rng.integers(0, len(data)))]))
        return "truncated"
    if kind == "nan_voxels":
        off = int(struct.unpack_from("<f", data, 108)[0])
        if struct.unpack_from("<h", data, 70)[0] == 16:
            i = off + 4 * int(rng.integers((len(data) - off) // 4))
            struct.pack_into("<f", data, i, float(rng.choice(FLOATS[:3])))
            path.write_bytes(bytes(data))
            return f"voxel at byte {i} = NaN/inf"
        kind = "field"
    descr = []
    for _ in range(2 if kind == "two_fields" else 1):
        name, off, fmt = NIFTI_FIELDS[int(rng.integers(len(NIFTI_FIELDS)))]
        v = (float(rng.choice(FLOATS)) if fmt == "<f" else int(rng.choice(UNITS)) if fmt == "<B"
             else int(rng.choice(INTS)))
        struct.pack_into(fmt, data, off, v)
        descr.append(f"{name}={v}")
    path.write_bytes(bytes(data))
    return ", ".join(descr)


def _mutate_gzip(path: Path, rng) -> tuple[str, int | None]:
    """The gzip stream of a .nii.gz damaged (CRC-32, length, a byte of the body, the end
    cut, bytes appended) or its NIfTI header mutated inside an intact stream. Returns
    (description, the exit code it must give or None when either is right)."""
    data = bytearray(path.read_bytes())
    kind = rng.choice(["crc", "isize", "body", "truncate", "trailing", "inner", "inner"])
    if kind in ("crc", "isize"):
        i = len(data) - (8 if kind == "crc" else 4) + int(rng.integers(4))
        data[i] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
        return f"gzip {kind} byte {i} flipped", 65
    if kind == "body":
        i = int(rng.integers(10, len(data) - 8))
        data[i] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
        return f"gzip body byte {i} flipped", None   # a padding bit may change nothing
    if kind == "truncate":
        path.write_bytes(bytes(data[: int(rng.integers(0, len(data)))]))
        return "gzip truncated", None if len(data) == 0 else 65
    if kind == "trailing":
        path.write_bytes(bytes(data) + b"junk" * int(rng.integers(1, 5)))
        return "gzip with trailing bytes", 65
    raw = path.with_suffix("")             # .nii: mutate the header, compress again
    raw.write_bytes(gzip.decompress(bytes(data)))
    what = _mutate_nifti(raw, rng)
    path.write_bytes(gzip.compress(raw.read_bytes()))
    raw.unlink()
    return f"inside gzip: {what}", None


def _make_special(path: Path, kind: str, outside: Path) -> None:
    """``path`` (removed first when it exists) made a FIFO or a symlink."""
    if os.path.lexists(path):
        if kind == "link_in":              # the real file moves to a hidden name inside
            path.rename(path.with_name("." + path.name + ".real"))
        else:
            path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link_in":
        os.symlink(path.with_name("." + path.name + ".real"), path)
    else:
        os.symlink({"dev_zero": "/dev/zero", "dev_urandom": "/dev/urandom",
                    "link_out": str(outside)}[kind], path)


def _mutate_special(work: Path, rng, bases: dict[str, Path]) -> tuple[Path, str, int, str | None]:
    """A DICOM folder, a NIfTI folder or an ACDC folder in ``work`` with one file replaced
    by (or, for DICOM, joined by) a FIFO or a symlink. Returns (target, description, the
    exit code it must give, a phrase its stderr or warnings must hold)."""
    kind = str(rng.choice(SPECIAL_KINDS))
    which = str(rng.choice(["dicom", "nifti", "acdc"]))
    if which == "nifti":
        work.mkdir()
        shutil.copyfile(bases["nifti_gz"], work / "sax.nii.gz")
        name = str(rng.choice(["sax.nii.gz", "sax_gt.nii.gz"]))
        if name == "sax_gt.nii.gz" and kind == "link_in":
            name = "sax.nii.gz"            # a label linked inside: not on the image's grid
        _make_special(work / name, kind, outside=bases["nifti_gz"])
    else:
        shutil.copytree(bases[which], work)
        files = sorted(p.name for p in work.iterdir())
        name = files[int(rng.integers(len(files)))]
        beside = which == "dicom" and kind != "link_in" and rng.random() < 0.5
        if beside:
            name = "extra" + ("" if rng.random() < 0.5 else ".dcm")
        outside = next(p for p in sorted(bases[which].iterdir()) if p.name != name) \
            if which == "dicom" else bases["nifti_gz"]
        _make_special(work / name, kind, outside=outside)
        if which == "dicom":
            what = f"dicom: {name} {'added as' if beside else 'replaced by'} {kind}"
            if kind == "link_in":
                return work, what, 0, None
            # beside: skipped with a warning; replaced: the error names it (a missing image)
            return work, what, 0 if beside else 65, "not regular files" if beside else name
    what = f"{which}: {name} replaced by {kind}"
    if kind == "link_in":
        return work, what, 0, None
    return work, what, 65, "not a regular file"


def _mutate_acdc(folder: Path, rng) -> str:
    """One or two Info.cfg values replaced (ED, ES, NbFrame, Height, Weight), a line
    dropped, or the file emptied."""
    cfg = folder / "Info.cfg"
    lines = cfg.read_text().splitlines()
    kind = rng.choice(["value"] * 6 + ["drop", "empty", "binary"])
    if kind == "empty":
        cfg.write_text("")
        return "Info.cfg empty"
    if kind == "binary":
        cfg.write_bytes(bytes(rng.integers(0, 256, size=64, dtype=np.uint8)))
        return "Info.cfg binary"
    if kind == "drop":
        k = int(rng.integers(len(lines)))
        dropped = lines.pop(k)
        cfg.write_text("\n".join(lines))
        return f"Info.cfg without {dropped!r}"
    descr = []
    for _ in range(int(rng.integers(1, 3))):
        k = int(rng.integers(len(lines)))
        key = lines[k].split(":")[0]
        v = str(rng.choice(NUMBERS + ["2", "3", "4", "1.5", "-0", "1" * 40]))
        lines[k] = f"{key}: {v}"
        descr.append(f"{key}={v}")
    cfg.write_text("\n".join(lines))
    return "Info.cfg " + ", ".join(descr)


# --------------------------------------------------------------------------- the check
# what stderr may hold: the error line, its indented continuation and hint lines, and the
# runtime's own log lines; anything else (library warnings, nifticlib/VNL output) is noise
_OWN_LINE = re.compile(r"^(deeprecon-rt: error: |  |\S+ \S+ (WARNING|INFO|ERROR) deeprecon\.)")

def _geometry_ok(info: dict) -> str | None:
    """None when the summary's geometry is finite and positive, else what is wrong."""
    ps = info["pixel_spacing_mm"]
    if not all(np.isfinite(v) and v > 0 for v in ps):
        return f"pixel spacing {ps}"
    for key in ("row_direction", "column_direction"):
        v = np.asarray(info[key], dtype=np.float64)
        if not np.all(np.isfinite(v)) or abs(np.linalg.norm(v) - 1) > 1e-3:
            return f"{key} {info[key]}"
    if abs(float(np.dot(info["row_direction"], info["column_direction"]))) > 1e-3:
        return "directions not orthogonal"
    t = info["slice_thickness_mm"]
    if t is not None and not (np.isfinite(t) and t > 0):
        return f"slice thickness {t}"
    gaps = info["slice_gap_range_mm"]
    if gaps is not None and not all(np.isfinite(g) and g > 0 for g in gaps):
        return f"slice gaps {gaps}"
    if info["slices"] < 1 or info["phases"] < 1 or min(info["matrix"]) < 1:
        return f"shape {info['phases']} x {info['slices']} x {info['matrix']}"
    tt = [v for v in info["trigger_times_ms"] if v is not None]
    if not all(np.isfinite(v) for v in tt):
        return f"trigger times {info['trigger_times_ms']}"
    return None


def _repair_expected(what: str) -> str | None:
    """The warning an accepted DICOM case must carry, from its (single) mutation."""
    m = re.fullmatch(r"IM\d+\.dcm: (PixelSpacing|SpacingBetweenSlices)=\[([^];]*)\]", what)
    if m is None:
        return None
    values = [v.strip(" '") for v in m.group(2).split(",")]
    if m.group(1) == "SpacingBetweenSlices":
        return "SpacingBetweenSlices" if values != [""] else None
    nums = [float(v) for v in values if re.fullmatch(r"[-+0-9.einf]+", v)]
    if len(values) == 2 and len(nums) == 2 and not all(np.isfinite(v) and v > 0 for v in nums):
        return "repaired"
    return None


def _run_cli(argv: list[str], timeout: float):
    """run(argv) in a daemon thread: (finished, exit code, warnings caught)."""
    box: dict = {}

    def target():
        box["rc"] = run(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(timeout)
    return not t.is_alive(), box.get("rc"), list(caught)


def test_fuzz_study_info(bases, tmp_path, capfd):
    rng = np.random.default_rng(SEED)
    outcomes: Counter = Counter()
    checked: Counter = Counter()          # accepted cases whose warning was checked
    failures: list[str] = []
    t_start = time.perf_counter()
    cases = (["dicom"] * N_DICOM + ["nifti_i16"] * (N_NIFTI // 2) + ["nifti_f32"] * (N_NIFTI // 2)
             + ["nifti_gz"] * N_NIFTI_GZ + ["acdc"] * N_ACDC + ["special"] * N_SPECIAL)
    for i, base in enumerate(cases):
        work = tmp_path / f"case{i:04d}"
        must_rc = must_say = None
        if base in ("dicom", "acdc"):
            shutil.copytree(bases[base], work)
            what = (_mutate_dicom if base == "dicom" else _mutate_acdc)(work, rng)
            target = work
            must_say = _repair_expected(what) if base == "dicom" else None
        elif base == "special":
            target, what, must_rc, must_say = _mutate_special(work, rng, bases)
        else:
            work.mkdir()
            target = work / bases[base].name.replace(base, "sax")
            shutil.copyfile(bases[base], target)
            if base == "nifti_gz":
                what, must_rc = _mutate_gzip(target, rng)
            else:
                what = _mutate_nifti(target, rng)
        capfd.readouterr()
        t0 = time.perf_counter()
        finished, rc, caught = _run_cli(["study", "info", "--json", str(target)],
                                        timeout=CASE_TIME_LIMIT_S)
        dt = time.perf_counter() - t0
        out, err = capfd.readouterr()
        label = f"case {i} ({base}: {what}): exit {rc}"
        if not finished:
            failures.append(f"{label}: still running after {CASE_TIME_LIMIT_S:g} s (a hang)")
            outcomes["timeout"] += 1
            break                          # the hung thread holds the CLI: stop here
        noise = [ln for ln in err.splitlines() if not _OWN_LINE.match(ln)]
        outcomes[int(rc)] += 1
        if rc not in ALLOWED:
            failures.append(f"{label}: {err.strip()[-300:]}")
        elif "Traceback" in err or "Traceback" in out:
            failures.append(f"{label}: traceback in the output")
        elif caught:
            failures.append(f"{label}: warning leaked: {caught[0].category.__name__}: "
                            f"{caught[0].message}"[:400])
        elif noise:
            failures.append(f"{label}: stderr noise: {noise[:3]}"[:400])
        elif dt > CASE_TIME_LIMIT_S:
            failures.append(f"{label}: took {dt:.1f} s")
        elif must_rc is not None and rc != must_rc:
            failures.append(f"{label}: must exit {must_rc}: {err.strip()[-300:]}")
        elif rc == 0:
            info = json.loads(out, parse_constant=lambda c: pytest.fail(f"{label}: {c} in JSON"))
            why = _geometry_ok(info)
            if why:
                failures.append(f"{label}: accepted with {why}")
            elif must_say and not any(must_say in w for w in info["warnings"]):
                failures.append(f"{label}: accepted without a warning saying {must_say!r}: "
                                f"{info['warnings']}")
            elif must_say:
                checked[must_say] += 1
        elif must_rc is not None and must_say and must_say not in err:
            failures.append(f"{label}: the error does not say {must_say!r}: {err.strip()[-300:]}")
        if "special" not in base:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    print(f"fuzz: {len(cases)} cases in {total:.1f} s, exit codes "
          f"{dict(sorted(outcomes.items(), key=str))}, {len(failures)} failures; warnings of "
          f"accepted cases checked: {dict(checked)}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:40])
    assert outcomes[65] > len(cases) // 3, outcomes     # the mutations do break things
    assert outcomes[0] > 0, outcomes                    # and some are harmless
    assert SCALE > 1 or total < 60.0, f"{total:.1f} s"
