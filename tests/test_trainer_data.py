"""The patient split, the 2D slice data sets and the batch sampler (trainer/split.py, data.py)."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from deeprecon.runtime.errors import InvalidStudyError, NoInputError, UsageError  # noqa: E402
from deeprecon.runtime.phantom import make_phantom, write_phantom  # noqa: E402
from deeprecon.runtime.preprocess import PreprocessConfig  # noqa: E402
from deeprecon.trainer import data as data_mod  # noqa: E402
from deeprecon.trainer.config import get_preset  # noqa: E402
from deeprecon.trainer.data import BatchSampler, SliceSet, build_slices  # noqa: E402
from deeprecon.trainer.split import load_split, make_acdc_split, read_patients_csv  # noqa: E402

TINY = get_preset("tiny").preprocess          # 32 x 32 at 6 mm
GRID128 = PreprocessConfig(size=128, spacing_mm=1.5)
GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")


def _n_slices(patient_dir: Path) -> int:
    """Slices of an ACDC patient from the NIfTI header (without reading the voxels)."""
    import SimpleITK as sitk

    frame = sorted(p for p in patient_dir.glob("*_frame??.nii.gz"))[0]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(frame))
    reader.ReadImageInformation()
    return int(reader.GetSize()[2])


def _check_slices(s: SliceSet, preprocess: PreprocessConfig):
    R = preprocess.size
    N = len(s)
    assert s.images.shape == (N, 1, R, R) and s.images.dtype == torch.float32
    assert s.roi.shape == (N, 1, R, R) and s.roi.dtype == torch.float32
    assert s.phase.dtype == torch.int16 and s.slice_index.dtype == torch.int16
    assert float(s.images.min()) >= -1.0 and float(s.images.max()) <= 1.0
    assert float(s.images.min()) == -1.0 and float(s.images.max()) == 1.0  # clipped percentiles
    assert torch.isfinite(s.images).all()
    assert set(torch.unique(s.roi).tolist()) <= {0.0, 1.0}
    assert s.preprocess == preprocess.to_dict()
    if s.labels is not None:
        assert s.labels.shape == (N, R, R) and s.labels.dtype == torch.uint8
        assert set(torch.unique(s.labels).tolist()) <= {0, 1, 2, 3}
        fg = s.labels > 0
        assert (s.roi[:, 0] > 0)[fg].all(), "the ROI must cover every labelled pixel"
        # on labelled slices the ROI is the labels dilated by 10 mm (within the field of
        # view, where images are not exactly -1): between square dilations of 10 / sqrt(2)
        # and 10 mm
        labelled = fg.flatten(1).any(1)
        r = 10.0 / preprocess.spacing_mm
        x = fg[labelled][:, None].float()  # [n, 1, R, R]
        roi = s.roi[labelled] > 0
        inner = int(r / 2 ** 0.5)
        inner = torch.nn.functional.max_pool2d(x, 2 * inner + 1, 1, inner) > 0
        outer = int(math.ceil(r))
        outer = torch.nn.functional.max_pool2d(x, 2 * outer + 1, 1, outer) > 0
        assert (roi | ~inner | (s.images[labelled] == -1)).all()
        assert (~roi | outer).all()
        assert roi.sum() > fg[labelled].sum()
    assert (s.roi.flatten(1).sum(1) > 0).all(), "every slice has a non-empty ROI"


# ----------------------------------------------------------------------------- split

def test_committed_split_matches_generator(acdc_root):
    committed = load_split("acdc")
    assert committed == make_acdc_split(acdc_root.parent / "patients.csv")
    train, val = committed["train"], committed["val"]
    assert len(train) == 60 and len(val) == 20
    assert train == sorted(train) and val == sorted(val)
    assert not set(train) & set(val)
    groups = read_patients_csv(acdc_root.parent / "patients.csv")
    assert set(train) | set(val) == set(groups) and len(groups) == 80
    assert committed["group"] == groups
    assert Counter(groups[p] for p in train) == {g: 12 for g in GROUPS}
    assert Counter(groups[p] for p in val) == {g: 4 for g in GROUPS}
    # every id is a patient folder of the data set
    assert all((acdc_root / p).is_dir() for p in groups)


def test_split_is_deterministic_and_depends_on_seed(acdc_root):
    csv = acdc_root.parent / "patients.csv"
    assert make_acdc_split(csv, seed=1) == make_acdc_split(csv, seed=1)
    assert make_acdc_split(csv, seed=1)["val"] != make_acdc_split(csv, seed=0)["val"]
    other = make_acdc_split(csv, n_val_per_group=2)
    assert len(other["val"]) == 10 and len(other["train"]) == 70
    with pytest.raises(UsageError):
        make_acdc_split(csv, n_val_per_group=16)


def test_split_cli_regenerates_the_file(acdc_root, tmp_path):
    out = tmp_path / "acdc.json"
    proc = subprocess.run([sys.executable, "-m", "deeprecon.trainer.split",
                           str(acdc_root.parent / "patients.csv"), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    repo_file = Path(__file__).resolve().parents[1] / "trainer" / "splits" / "acdc.json"
    assert out.read_text() == repo_file.read_text()


def test_split_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown split"):
        load_split("nope")
    with pytest.raises(NoInputError):
        make_acdc_split(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,kind\n1,a\n")
    with pytest.raises(InvalidStudyError, match="columns"):
        make_acdc_split(bad)


# ----------------------------------------------------------------------------- ACDC slices

@pytest.fixture(scope="module")
def acdc_tiny(acdc_root):
    return build_slices(acdc_root, TINY, max_patients=2)


def test_acdc_slices_tiny_grid(acdc_root, acdc_tiny):
    s = acdc_tiny
    _check_slices(s, TINY)
    split = load_split("acdc")
    expected_patients = sorted(split["train"])[:2]
    assert s.patients == expected_patients
    n_slices = {p: _n_slices(acdc_root / p) for p in expected_patients}
    assert len(s) == sum(2 * n for n in n_slices.values())
    assert s.labels is not None
    assert (s.labels > 0).flatten(1).any(1).float().mean() >= 0.7, "most slices are labelled"
    for p, n in n_slices.items():
        rows = [i for i, q in enumerate(s.patient) if q == p]
        assert len(rows) == 2 * n
        assert s.phase[rows].tolist() == [0] * n + [1] * n
        assert s.slice_index[rows].tolist() == list(range(n)) * 2
        assert {s.group[i] for i in rows} == {split["group"][p]}
    assert s.source == str(acdc_root.resolve())


def test_acdc_selection(acdc_root, acdc_tiny):
    # the root above training/ works the same; patients override the split
    s = build_slices(acdc_root.parent, TINY, patients=["patient003"])
    assert s.patients == ["patient003"]          # a validation patient, named explicitly
    assert s.group[0] == "DCM"
    assert torch.equal(s.images, build_slices(acdc_root / "patient003", TINY).images)
    val = build_slices(acdc_root, TINY, split="val", max_patients=1)
    assert val.patients == [load_split("acdc")["val"][0]]
    with pytest.raises(UsageError, match="unknown patient"):
        build_slices(acdc_root, TINY, patients=["patient999"])
    with pytest.raises(UsageError, match="split"):
        build_slices(acdc_root, TINY, split="test")
    with pytest.raises(UsageError, match="validation"):
        build_slices(acdc_root / "patient003", TINY, split="val")


def test_acdc_slices_128_grid(acdc_root):
    s = build_slices(acdc_root, GRID128, patients=["patient001"], require_labels=True)
    _check_slices(s, GRID128)
    n = _n_slices(acdc_root / "patient001")
    assert len(s) == 2 * n
    assert (s.labels > 0).flatten(1).any(1).float().mean() >= 0.7
    # the crop is heart-centred: the labelled centroid lies near the grid centre
    ys, xs = torch.nonzero(s.labels > 0, as_tuple=True)[1:]
    assert abs(ys.float().mean() - 64) < 20 and abs(xs.float().mean() - 64) < 20


def test_broken_study_names_its_folder(acdc_root, tmp_path):
    root = tmp_path / "acdc"
    shutil.copytree(acdc_root / "patient001", root / "patient001")
    frame = sorted((root / "patient001").glob("*_frame??.nii.gz"))[0]
    frame.write_bytes(b"not a nifti file at all")
    with pytest.raises(InvalidStudyError) as exc:  # the foundation's error, not swallowed
        build_slices(root, TINY, split="all")
    assert str(root / "patient001") in str(exc.value)


# ----------------------------------------------------------------------------- phantoms

@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "ph0"
    write_phantom(make_phantom(slices=6, phases=3, seed=0, matrix=(96, 96), lax_matrix=(32, 32)),
                  out, preview=False)
    return out


def test_phantom_slices_all_phases(phantom_dir):
    s = build_slices(phantom_dir, TINY, require_labels=True)
    _check_slices(s, TINY)
    assert len(s) == 3 * 6
    assert s.phase.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert s.slice_index.tolist() == list(range(6)) * 3
    assert s.patient == ["ph0"] * 18 and s.group == ["phantom"] * 18
    assert (s.labels > 0).flatten(1).any(1).float().mean() >= 0.7


def test_folder_of_phantoms(phantom_dir, tmp_path):
    root = tmp_path / "phantoms"
    for name in ("b", "a"):
        shutil.copytree(phantom_dir, root / name)
    (root / "notes").mkdir()  # not a phantom: ignored
    s = build_slices(root, TINY)
    assert s.patients == ["a", "b"] and len(s) == 36
    assert torch.equal(s.images[:18], s.images[18:])
    assert build_slices(root, TINY, max_patients=1).patients == ["a"]
    assert build_slices(root, TINY, patients=["b"]).patients == ["b"]
    with pytest.raises(UsageError, match="unknown patient"):
        build_slices(root, TINY, patients=["c"])
    with pytest.raises(UsageError, match="validation"):
        build_slices(root, TINY, split="val")


def test_phantom_without_labels(phantom_dir, tmp_path):
    folder = tmp_path / "unlabelled"
    shutil.copytree(phantom_dir, folder)
    (folder / "sax_gt.nii.gz").unlink()
    with pytest.raises(InvalidStudyError, match="unlabelled"):
        build_slices(folder, TINY, require_labels=True)
    s = build_slices(folder, TINY)
    assert s.labels is None
    # without labels the ROI is the disc of radius 0.3 R around the crop centre
    R = TINY.size
    u = torch.arange(R) - R // 2
    disc = ((u[:, None] ** 2 + u[None, :] ** 2) <= (0.3 * R) ** 2).float()
    assert torch.equal(s.roi[0, 0], disc)


# ----------------------------------------------------------------------------- cache

def test_cache_hit_skips_loading(phantom_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_slices(phantom_dir, TINY, cache_dir=cache)
    files = sorted(cache.glob("slices-*.safetensors"))
    assert len(files) == 1 and not list(cache.glob(".*tmp"))

    def no_loading(*args, **kwargs):
        raise AssertionError("load_study called although the slices are cached")

    with monkeypatch.context() as m:
        m.setattr(data_mod, "load_study", no_loading)
        second = build_slices(phantom_dir, TINY, cache_dir=cache)
    for name, t in first.tensors().items():
        assert torch.equal(t, second.tensors()[name]), name
    assert second.patient == first.patient and second.group == first.group
    assert second.fingerprint == first.fingerprint

    # a later stage's run reads the upstream run's cache and keeps a copy in its own
    own = tmp_path / "own_cache"
    with monkeypatch.context() as m:
        m.setattr(data_mod, "load_study", no_loading)
        third = build_slices(phantom_dir, TINY, cache_dir=own, read_caches=[cache])
    assert third.fingerprint == first.fingerprint
    assert [f.name for f in own.glob("slices-*.safetensors")] == [files[0].name]

    # another preprocessing, or a touched input file, is another key
    layout, refs = data_mod.find_studies(phantom_dir.resolve())
    sel = {"split": "train"}
    key = data_mod.cache_key(phantom_dir.resolve(), refs, TINY, sel)
    assert key == data_mod.cache_key(phantom_dir.resolve(), refs, TINY, sel)
    assert key != data_mod.cache_key(phantom_dir.resolve(), refs,
                                     dataclasses.replace(TINY, spacing_mm=5.0), sel)
    assert key != data_mod.cache_key(phantom_dir.resolve(), refs, TINY, {"split": "all"})
    build_slices(phantom_dir, dataclasses.replace(TINY, size=16), cache_dir=cache)
    assert len(list(cache.glob("slices-*.safetensors"))) == 2
    st = (phantom_dir / "sax.nii.gz").stat()
    try:
        os.utime(phantom_dir / "sax.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert key != data_mod.cache_key(phantom_dir.resolve(), refs, TINY, sel)
    finally:
        os.utime(phantom_dir / "sax.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns))


def test_corrupt_cache_is_rebuilt(phantom_dir, tmp_path):
    cache = tmp_path / "cache"
    first = build_slices(phantom_dir, TINY, cache_dir=cache)
    path = next(cache.glob("slices-*.safetensors"))
    path.write_bytes(b"garbage")
    again = build_slices(phantom_dir, TINY, cache_dir=cache)
    assert again.fingerprint == first.fingerprint
    assert SliceSet.load(path).fingerprint == first.fingerprint


# ----------------------------------------------------------------------------- SliceSet

def test_save_load_round_trip(phantom_dir, tmp_path):
    s = build_slices(phantom_dir, TINY)
    path = s.save(tmp_path / "slices.safetensors")
    back = SliceSet.load(path)
    assert set(back.tensors()) == {"images", "labels", "roi", "phase", "slice_index"}
    for name, t in s.tensors().items():
        u = back.tensors()[name]
        assert u.dtype == t.dtype and torch.equal(u, t), name
    assert (back.patient, back.group, back.source, back.preprocess) == \
        (s.patient, s.group, s.source, s.preprocess)
    assert back.fingerprint == s.fingerprint

    unlabelled = dataclasses.replace(s, labels=None)
    back = SliceSet.load(unlabelled.save(tmp_path / "u.safetensors"))
    assert back.labels is None and back.fingerprint == unlabelled.fingerprint != s.fingerprint

    with pytest.raises(NoInputError):
        SliceSet.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InvalidStudyError):
        SliceSet.load(tmp_path / "junk.safetensors")


def test_subset(phantom_dir):
    s = build_slices(phantom_dir, TINY)
    sub = s.subset([5, 0, 7])
    assert len(sub) == 3
    assert torch.equal(sub.images[0], s.images[5]) and torch.equal(sub.labels[1], s.labels[0])
    assert sub.phase.tolist() == [0, 0, 1] and sub.slice_index.tolist() == [5, 0, 1]
    mask = s.phase == 2
    assert len(s.subset(mask)) == 6 and set(s.subset(mask).phase.tolist()) == {2}
    assert sub.fingerprint != s.fingerprint


# ----------------------------------------------------------------------------- errors

def test_data_folder_errors(tmp_path):
    with pytest.raises(NoInputError):
        build_slices(tmp_path / "missing", TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidStudyError, match="no ACDC patient folders") as exc:
        build_slices(empty, TINY)
    assert "phantom" in str(exc.value)  # the hint says what was expected
    junk = tmp_path / "junk"
    (junk / "sub").mkdir(parents=True)
    for i in range(3):
        (junk / f"file{i}.bin").write_bytes(os.urandom(100))
    (junk / "sub" / "x.nii.gz").write_bytes(os.urandom(100))
    with pytest.raises(InvalidStudyError):
        build_slices(junk, TINY)
    with pytest.raises(UsageError):
        build_slices(empty, TINY, split="testing")
    with pytest.raises(UsageError):
        build_slices(empty, TINY, max_patients=0)


# ----------------------------------------------------------------------------- sampler

def _draw(sampler: BatchSampler, k: int) -> list[list[int]]:
    return [sampler.next_batch().tolist() for _ in range(k)]


def test_sampler_is_deterministic():
    a = BatchSampler(20, 4, seed=3)
    b = BatchSampler(20, 4, seed=3)
    batches = _draw(a, 12)
    assert batches == _draw(b, 12)
    assert batches != _draw(BatchSampler(20, 4, seed=4), 12)
    assert all(len(x) == 4 for x in batches)
    assert batches[:5] != batches[5:10], "each epoch is a new permutation"
    for e in range(2):  # drop_last with n = 20, batch 4: every index once per epoch
        assert sorted(sum(batches[5 * e:5 * e + 5], [])) == list(range(20))
    assert BatchSampler(20, 4, seed=3).next_batch().dtype == torch.int64


def test_sampler_ranks_disjoint_and_covering():
    n, b, w = 24, 4, 2
    ranks = [BatchSampler(n, b, seed=0, rank=r, world_size=w) for r in range(w)]
    assert ranks[0].batches_per_epoch == 3
    for _ in range(3):  # epochs
        per_rank = [sum(_draw(s, 3), []) for s in ranks]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(n))

    # n not a multiple of world * batch: drop_last cuts, drop_last=False wraps around
    cut = [BatchSampler(27, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    got = [sum(_draw(s, cut[0].batches_per_epoch), []) for s in cut]
    assert len(got[0]) == len(got[1]) == 12 and len(set(got[0] + got[1])) == 24
    full = [BatchSampler(27, 4, seed=0, rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert full[0].batches_per_epoch == 4
    got = [sum(_draw(s, 4), []) for s in full]
    assert set(got[0] + got[1]) == set(range(27))

    # tiny data: fewer samples than one step; wrap around within the epoch
    tiny = [BatchSampler(3, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    assert tiny[0].batches_per_epoch == 1
    got = [s.next_batch().tolist() for s in tiny]
    assert all(len(g) == 4 for g in got) and set(got[0] + got[1]) == {0, 1, 2}


@pytest.mark.parametrize("k", [1, 4, 5, 6, 11])
def test_sampler_resumes_exactly(k):
    ref = BatchSampler(22, 4, seed=7, rank=1, world_size=2)  # 2 batches per rank per epoch
    expected = _draw(ref, 14)
    first = BatchSampler(22, 4, seed=7, rank=1, world_size=2)
    assert _draw(first, k) == expected[:k]
    state = first.state_dict()
    assert set(state) == {"epoch", "position"}
    resumed = BatchSampler(22, 4, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(dict(state))
    assert _draw(resumed, 14 - k) == expected[k:]


def test_sampler_arguments():
    with pytest.raises(UsageError):
        BatchSampler(0, 4, seed=0)
    with pytest.raises(UsageError):
        BatchSampler(10, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(UsageError):
        BatchSampler(10, 4, seed=0).load_state_dict({"epoch": 0, "position": 9})


def test_study_errors_name_the_study(phantom_dir, monkeypatch):
    def failing_prepare(study, config):
        raise InvalidStudyError("slice matrix 4 x 4 is too small to preprocess")

    monkeypatch.setattr(data_mod, "prepare", failing_prepare)
    with pytest.raises(InvalidStudyError, match="too small") as exc:
        build_slices(phantom_dir, TINY)
    assert str(exc.value).startswith(str(phantom_dir.resolve()))
