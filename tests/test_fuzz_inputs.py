"""Hostile inputs through ``deeprecon-rt study info`` (issue 13, section 1): a seeded fuzzer.

A small DICOM series (4 slices x 2 phases, 16 x 16, written by ``dicom_series``), a
small 4D NIfTI (int16 and float32) and a tiny ACDC folder (its Info.cfg) are mutated one
way per case: a header value
replaced by NaN, inf, 0, a negative, 1e-30, 1e308 or text; an element given the wrong
VR; Rows/Columns/PixelData sizes that disagree; truncation; raw header bytes of the
NIfTI overwritten; NaN voxels. Each case runs in-process through the CLI and must end
with exit 0, 65 or 66 (never 70), without a traceback and within a few seconds; exit 0
only with finite, positive geometry.

Runs in the normal suite (no marker): a few hundred cases in well under a minute.
"""
from __future__ import annotations

import json
import shutil
import struct
import sys
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

from deeprecon.runtime.cli import run  # noqa: E402

SEED = 1313
N_DICOM = 240
N_NIFTI = 120
N_ACDC = 40
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
    [(f"srow[{k}]", 280 + 4 * k, "<f") for k in range(12)]
FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-30, 3e38, -3e38, 2.5]
INTS = [-5, -1, 0, 1, 2, 7, 8, 32767, -32768]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    import logging
    logging.getLogger("pydicom").setLevel(logging.ERROR)   # invalid values are the point here
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
    # a tiny ACDC patient folder: frames 1 and 3 of 3, with labels, and Info.cfg
    acdc = root / "patient001"
    acdc.mkdir()
    for frame in (1, 3):
        a = (np.arange(4 * 8 * 8).reshape(4, 8, 8) % 50).astype(np.int16)    # [S, H, W]
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((1.5, 1.5, 8.0))
        sitk.WriteImage(img, str(acdc / f"patient001_frame{frame:02d}.nii.gz"))
        lab = sitk.GetImageFromArray((a % 4).astype(np.uint8))
        lab.CopyInformation(img)
        sitk.WriteImage(lab, str(acdc / f"patient001_frame{frame:02d}_gt.nii.gz"))
    (acdc / "Info.cfg").write_text("ED: 1\nES: 3\nGroup: NOR\nHeight: 180.0\nNbFrame: 3\n"
                                   "Weight: 80.0\n")
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
                del ds["PixelSpacing"]
                ds.save_as(path, enforce_file_format=False)
                what = "PixelSpacing deleted (fallback)"
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
        v = float(rng.choice(FLOATS)) if fmt == "<f" else int(rng.choice(INTS))
        struct.pack_into(fmt, data, off, v)
        descr.append(f"{name}={v}")
    path.write_bytes(bytes(data))
    return ", ".join(descr)


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


def test_fuzz_study_info(bases, tmp_path, capsys):
    rng = np.random.default_rng(SEED)
    outcomes: Counter = Counter()
    failures: list[str] = []
    t_start = time.perf_counter()
    cases = (["dicom"] * N_DICOM + ["nifti_i16"] * (N_NIFTI // 2) + ["nifti_f32"] * (N_NIFTI // 2)
             + ["acdc"] * N_ACDC)
    for i, base in enumerate(cases):
        work = tmp_path / f"case{i:04d}"
        if base in ("dicom", "acdc"):
            shutil.copytree(bases[base], work)
            what = (_mutate_dicom if base == "dicom" else _mutate_acdc)(work, rng)
            target = work
        else:
            work.mkdir()
            target = work / "sax.nii"
            shutil.copyfile(bases[base], target)
            what = _mutate_nifti(target, rng)
        capsys.readouterr()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = run(["study", "info", "--json", str(target)])
        dt = time.perf_counter() - t0
        out, err = capsys.readouterr()
        outcomes[int(rc)] += 1
        label = f"case {i} ({base}: {what}): exit {rc}"
        if rc not in ALLOWED:
            failures.append(f"{label}: {err.strip()[-300:]}")
        elif "Traceback" in err or "Traceback" in out:
            failures.append(f"{label}: traceback in the output")
        elif dt > CASE_TIME_LIMIT_S:
            failures.append(f"{label}: took {dt:.1f} s")
        elif rc == 0:
            why = _geometry_ok(json.loads(out))
            if why:
                failures.append(f"{label}: accepted with {why}")
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    print(f"fuzz: {len(cases)} cases in {total:.1f} s, exit codes {dict(sorted(outcomes.items()))}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:20])
    assert outcomes[65] > len(cases) // 3, outcomes     # the mutations do break things
    assert outcomes[0] > 0, outcomes                    # and some are harmless
    assert total < 60.0, f"{total:.1f} s"
