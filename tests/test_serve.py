"""Issue 15: `deeprecon-rt serve`, the DICOM node beside the scanner, against real peers on
127.0.0.1: dcmtk's storescu sends a cine series, the node reconstructs it and sends one
DICOM SEG per phase to a dcmtk storescp started here, and the SEG is checked against
the source images (and against `reconstruct`'s output of the same series). Refusals: an
unknown calling AE, an oversize PDU, an oversize object; a path-traversal UID is stored
under a hashed name; four concurrent senders all get their SEG; SIGTERM stops the node
cleanly and a restart redoes the abandoned study; mutual TLS both ways; an unreachable
destination keeps the study in failed/ while the node goes on (Python API).

Every peer and port is on 127.0.0.1, ports are picked free at run time, every
subprocess has a timeout."""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_series import write_dicom_series  # noqa: E402

from deeprecon.runtime.dicom_node import (MAX_CONTROL_PDU, Destination, PduGuard,  # noqa: E402
                                          check_ae_title, storage_key)
from deeprecon.runtime.errors import UsageError  # noqa: E402
from deeprecon.runtime.phantom import make_phantom  # noqa: E402

DCMTK = ("storescu", "storescp", "echoscu")
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in DCMTK),
                                reason="dcmtk (storescu, storescp, echoscu) is not installed; "
                                       ".ci/run installs it")
EXE = shutil.which("deeprecon-rt") or str(Path(sys.executable).parent / "deeprecon-rt")
HOST = "127.0.0.1"
NODE_AE = "NODE"
DEST_AE = "DEST"
SENDERS = ("SCANNER1", "SCANNER2", "SCANNER3", "SCANNER4")
MAX_PDU = 16384
MAX_OBJECT_MB = 2
TIMEOUT_S = 60
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DCMTK_TIMEOUTS = ["-to", "10", "-ta", "10", "-td", "30"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {HOST}:{port}")


def _phantom(seed: int, slices: int = 6):
    return make_phantom(slices=slices, phases=2, seed=seed, matrix=(64, 64), pixel_spacing_mm=3.0).study


# ----------------------------------------------------------------------------- peers
def _is_whole_seg(ds) -> bool:
    """A SEG that storescp has finished writing. storescp writes straight to the final
    name and pydicom reads a file cut between two elements without an error (CI once read
    one without its functional groups), so the pixel data, the last element, must be
    whole: one bit per pixel per frame, padded to an even length."""
    if ds.get("Modality") != "SEG" or "PixelData" not in ds:
        return False
    bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1))
    return len(ds.PixelData) >= (bits + 7) // 8


class Receiver:
    """dcmtk's storescp: where the node sends its SEG."""

    def __init__(self, folder: Path, tls: dict | None = None):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        tls_args = [] if tls is None else ["+tls", str(tls["key"]), str(tls["cert"]),
                                           "+cf", str(tls["ca"])]
        self.log = open(folder.parent / f"storescp-{self.port}.log", "w")
        self.proc = subprocess.Popen(["storescp", "-aet", DEST_AE, "-od", str(folder), *tls_args,
                                      str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        if tls is None:
            _wait_port(self.port)
        else:
            time.sleep(0.5)   # a bare connect would be a failed TLS handshake

    @property
    def dest(self) -> str:
        return f"{DEST_AE}@{HOST}:{self.port}"

    def segs(self, study_uid: str, n: int, timeout: float = TIMEOUT_S) -> list:
        """The ``n`` SEG objects of ``study_uid`` received (waits up to ``timeout``)."""
        end = time.monotonic() + timeout
        while True:
            found = []
            for f in sorted(self.folder.iterdir()):
                try:
                    ds = pydicom.dcmread(f)
                except Exception:  # noqa: BLE001 - storescp may still be writing it
                    continue
                if _is_whole_seg(ds) and ds.StudyInstanceUID == study_uid:
                    found.append(ds)
            if len(found) >= n or time.monotonic() > end:
                assert len(found) == n, f"{len(found)} of {n} SEG of {study_uid} arrived"
                return found
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


class Node:
    """`deeprecon-rt serve` in a subprocess, listening on a free port it reports."""

    def __init__(self, storage: Path, bundle: Path, dest: str, *extra: str):
        self.storage = storage
        self.log_path = storage.parent / f"node-{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "w")
        args = [EXE, "serve", "--ae-title", NODE_AE, "--port", "0", "--host", HOST,
                "--storage", str(storage), "--allow", ",".join(SENDERS), "--send-to", dest,
                "--quiet-period", "1", "--max-pdu", str(MAX_PDU),
                "--max-object-mb", str(MAX_OBJECT_MB), "--bundle", str(bundle),
                "--backend", "torch", "--device", "cpu", *extra]
        if "--steps" not in extra:
            args.append("--fast")
        self.proc = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT, env=ENV)
        end = time.monotonic() + 120
        while True:
            m = re.search(rf"listening on {re.escape(HOST)}:(\d+)", self.text())
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None or time.monotonic() > end:
                self.kill()
                raise AssertionError(f"the node did not start:\n{self.text()}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str, timeout: float = TIMEOUT_S) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.text())
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in the node's log:\n{self.text()[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log_file.close()


def storescu(folder: Path, port: int, ae: str = SENDERS[0], *extra: str,
             called: str = NODE_AE) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", ae, "-aec", called, *DCMTK_TIMEOUTS, *extra,
                           "+sd", "+r", HOST, str(port), str(folder)],
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def echoscu(port: int, ae: str = SENDERS[0], *extra: str, called: str = NODE_AE) -> int:
    return subprocess.run(["echoscu", "-aet", ae, "-aec", called, *DCMTK_TIMEOUTS, *extra,
                           HOST, str(port)], capture_output=True, timeout=TIMEOUT_S).returncode


@pytest.fixture(scope="module")
def peers(tiny_bundle, tmp_path_factory):
    """One storescp and one node for the tests of this module that share them."""
    root = tmp_path_factory.mktemp("serve")
    receiver = Receiver(root / "received")
    node = Node(root / "storage", tiny_bundle, receiver.dest)
    try:
        yield node, receiver
    finally:
        rc = node.stop()
        receiver.close()
    assert rc == 0, node.text()[-3000:]
    assert "stopped (SIGTERM)" in node.text()
    _assert_no_partial_files(node.storage)


def _assert_no_partial_files(storage: Path) -> None:
    leftovers = [p for p in storage.rglob("*")
                 if p.name.endswith(".tmp") or ".partial-" in p.name or p.name.startswith(".done-")]
    assert not leftovers, leftovers


# ----------------------------------------------------------------------------- checks
def _refs(seg) -> list[str]:
    return [r.ReferencedSOPInstanceUID
            for item in seg.ReferencedSeriesSequence for r in item.ReferencedInstanceSequence]


def _check_segs_against_source(segs, src: Path, origins: np.ndarray) -> dict[str, np.ndarray]:
    """Every SEG against the source files: its references are the images of one phase,
    together the SEGs reference every source image once, each frame lies at its source
    image's position and orientation, labels are 0..3. Returns {sorted refs key: labels
    [n, H, W] in slice order} for comparisons."""
    import highdicom as hd

    by_uid = {}
    for f in src.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_uid[ds.SOPInstanceUID] = ds
    referenced, out = [], {}
    for ds in segs:
        seg = hd.seg.Segmentation.from_dataset(ds)
        assert [d.SegmentLabel for d in seg.SegmentSequence] == ["LV cavity", "LV myocardium", "RV cavity"]
        refs = _refs(seg)
        assert all(u in by_uid for u in refs)
        assert len({float(by_uid[u].TriggerTime) for u in refs}) == 1     # one phase per SEG
        referenced += refs
        iop = [float(v) for v in seg.SharedFunctionalGroupsSequence[0]
               .PlaneOrientationSequence[0].ImageOrientationPatient]
        frames = list(seg.PerFrameFunctionalGroupsSequence)
        assert len(frames) == 3 * len(refs)
        for frame in frames:
            uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            np.testing.assert_allclose(ipp, [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-3)
            np.testing.assert_allclose(iop, [float(v) for v in by_uid[uid].ImageOrientationPatient], atol=1e-6)
        labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=refs, combine_segments=True)
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
        order = [int(np.argmin(np.linalg.norm(origins - np.array(
            [float(v) for v in by_uid[u].ImagePositionPatient]), axis=1))) for u in refs]
        stack = np.zeros((len(origins),) + labels.shape[1:], labels.dtype)
        stack[order] = labels
        out[" ".join(sorted(refs))] = stack
    assert sorted(referenced) == sorted(by_uid), "the SEGs do not reference every source image once"
    return out


# ----------------------------------------------------------------------------- units
def test_pdu_guard_limits_whatever_the_chunking():
    """The guard refuses a PDU or an object over its limit when the length is read, and
    counts a data set across PDUs and chunk boundaries."""
    def pdata(*pdvs):  # pdvs: (control header, fragment length)
        body = b"".join(struct.pack(">LBB", n + 2, 1, mch) + b"\0" * n for mch, n in pdvs)
        return struct.pack(">BBL", 4, 0, len(body)) + body

    guard = PduGuard(max_pdata=1000, max_control=100, max_object=1500)
    stream = pdata((0x03, 50)) + pdata((0x00, 900)) + pdata((0x02, 500))   # 1400 bytes: fine
    for k in range(0, len(stream), 7):          # 7-byte chunks split every header
        assert guard.feed(stream[k:k + 7]) is None
    assert guard.object_bytes == 0              # the last fragment closed the object
    assert "an object of more than 1500" in guard.feed(pdata((0x00, 900)) + pdata((0x00, 700))[:12])
    g = PduGuard(max_pdata=1000, max_control=100, max_object=10**6)
    assert "P-DATA-TF PDU of 1001 bytes" in g.feed(struct.pack(">BBL", 4, 0, 1001))
    g = PduGuard(max_pdata=1000, max_control=100, max_object=10**6)
    assert "type 0x01 PDU of 101 bytes" in g.feed(struct.pack(">BBL", 1, 0, 101)[:4] + b"\0\x65")


def test_destination_and_ae_titles():
    assert Destination.parse("PACS@10.0.0.2:104") == Destination("PACS", "10.0.0.2", 104)
    assert Destination.parse("PACS@[::1]:11112").host == "::1"
    for bad in ("PACS", "PACS@host", "@h:1", "PACS@h:0", "PACS@h:x", "A\\B@h:1"):
        with pytest.raises(UsageError):
            Destination.parse(bad)
    with pytest.raises(UsageError):
        check_ae_title("X" * 17, "--allow")
    assert storage_key("../../etc/passwd") == storage_key("../../etc/passwd")
    assert re.fullmatch(r"[0-9a-f]{32}", storage_key("../../etc/passwd"))


# ----------------------------------------------------------------------------- the node
def test_echo_and_unknown_calling_ae_rejected(peers, tmp_path):
    node, receiver = peers
    assert echoscu(node.port) == 0
    assert echoscu(node.port, "INTRUDER") != 0
    assert echoscu(node.port, called="OTHERNODE") != 0
    src = tmp_path / "dicom"
    uid = generate_uid()
    write_dicom_series(_phantom(20), src, study_uid=uid)
    p = storescu(src, node.port, "INTRUDER")
    assert p.returncode != 0
    text = node.wait_log(r"refused association from AE 'INTRUDER' at 127\.0\.0\.1:\d+: its "
                         r"calling AE title is not allowed").string
    assert re.search(r"refused association from AE 'SCANNER1' .*: it called another AE title", text)
    assert not (node.storage / "incoming" / storage_key(uid)).exists()
    assert not list(node.storage.glob(f"*/*{storage_key(uid)}"))


def test_phantom_series_round_trip_matches_reconstruct(peers, tiny_bundle, tmp_path):
    """storescu -> node -> storescp: one SEG per phase, referencing the images sent, at
    their positions, with the labels `reconstruct` writes for the same series."""
    from deeprecon.runtime.cli import run

    node, receiver = peers
    st = _phantom(3)
    src = tmp_path / "dicom"
    uid = generate_uid()
    write_dicom_series(st, src, study_uid=uid, description="cine_sax", series_number=7)
    p = storescu(src, node.port)
    assert p.returncode == 0, p.stderr
    segs = receiver.segs(uid, 2)
    got = _check_segs_against_source(segs, src, st.geometry.origins)

    out = tmp_path / "out"
    assert run(["reconstruct", str(src), "-o", str(out), "--bundle", str(tiny_bundle), "--fast",
                "--backend", "torch", "--device", "cpu", "--interp", "1", "--phases", "all"]) == 0
    for f in sorted((out / "segmentation").glob("seg_frame*.dcm")):
        key = " ".join(sorted(_refs(pydicom.dcmread(f))))
        nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(f).replace(".dcm", ".nii.gz")))
        assert np.array_equal(got.pop(key), nifti), f.name
    assert not got
    assert re.search(r"study [0-9.]+ \(patient TEST001, from SCANNER1, 12 objects, .*\): 2 SEG sent "
                     rf"to {DEST_AE}@", node.text())


def test_acdc_patient_round_trip(peers, acdc_patient001, tmp_path):
    """The must-show case: ACDC patient001 (10 slices, ED and ES) as a DICOM series,
    sent with storescu; its two SEG objects match the source images."""
    from deeprecon.runtime.io import load_acdc

    node, receiver = peers
    st = load_acdc(acdc_patient001)
    src = tmp_path / "dicom"
    uid = generate_uid()
    write_dicom_series(st, src, study_uid=uid, description="cine_sax ACDC patient001", series_number=3)
    p = storescu(src, node.port, SENDERS[1])
    assert p.returncode == 0, p.stderr
    segs = receiver.segs(uid, st.n_phases)
    labels = _check_segs_against_source(segs, src, st.geometry.origins)
    assert all(v.shape == st.images.shape[1:] for v in labels.values())


def test_path_traversal_uids_are_stored_under_hashes(peers, tmp_path):
    """UIDs such as ../../x choose no path: a series whose StudyInstanceUID and one
    SOPInstanceUID climb out of the storage folder comes back as SEG, nothing is written
    outside the storage folder, and a single such image (a study that cannot be
    reconstructed) is kept in failed/ under its hashed names, with its failure."""
    node, receiver = peers
    # at most 64 characters, or dcmtk will not send it; from incoming/KEY/ these climb
    # 6 levels, well out of the storage folder
    escape = "../" * 6 + f"escaped-{os.getpid()}"
    study_uid = escape + "-study"
    sop_uid = escape + "-image"

    def edit(ds, p, s):
        if (p, s) == (0, 0):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        return ds

    st = _phantom(5)
    src = tmp_path / "series"
    write_dicom_series(st, src, study_uid=study_uid, edit=edit)
    assert storescu(src, node.port).returncode == 0
    _check_segs_against_source(receiver.segs(study_uid, 2), src, st.geometry.origins)

    single = tmp_path / "single"
    lone_study = escape + "-lone"
    write_dicom_series(st, single, study_uid=lone_study,
                       edit=lambda ds, p, s: edit(ds, p, s) if (p, s) == (0, 0) else None)
    assert storescu(single, node.port).returncode == 0
    # the UID is cut to 64 characters in the log line (no valid UID is longer)
    m = node.wait_log(r"study \.\./\.\./[^(\n]*\(patient TEST001, from SCANNER1, 1 objects, "
                      r"(\S+)\) failed at load \(exit 65\)[^\n]*kept in (\S+)")
    kept = Path(m.group(2))
    assert kept.parent == node.storage / "failed" and kept.name.endswith(storage_key(lone_study))
    files = list((kept / "images").iterdir())
    assert [f.name for f in files] == [storage_key(sop_uid) + ".dcm"]
    assert pydicom.dcmread(files[0]).SOPInstanceUID == sop_uid
    failure = __import__("json").loads((kept / "failure.json").read_text())
    assert failure["stage"] == "load" and failure["exit_code"] == 65
    climbed = [node.storage / "incoming" / "x", *(node.storage / "incoming" / "x").parents][:9]
    assert not [p for d in climbed if d.is_dir() for p in d.glob("escaped*")]
    assert all(re.fullmatch(r"[0-9a-f]{32}\.dcm", f.name)
               for f in node.storage.rglob("*.dcm"))
    assert echoscu(node.port) == 0


def test_oversize_pdu_and_object_are_refused(peers):
    """A PDU longer than the limit is answered with an A-ABORT before its bytes are
    read, whether it opens the connection or comes inside an association; an object over
    --max-object-mb aborts its association; the node answers C-ECHO afterwards."""
    from pynetdicom import AE
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    node, _ = peers
    with socket.create_connection((HOST, node.port), timeout=10) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0, 1 << 30))   # an A-ASSOCIATE-RQ of 1 GiB
        assert s.recv(64) == bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6))   # A-ABORT, provider
        assert s.recv(64) == b""
    node.wait_log(rf"refused 127\.0\.0\.1:\d+: a type 0x01 PDU of {1 << 30} bytes \(the limit is "
                  rf"{MAX_CONTROL_PDU}\); association aborted")

    ae = AE(ae_title=SENDERS[2])
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, node.port, ae_title=NODE_AE)
    assert assoc.is_established and assoc.acceptor.maximum_length == MAX_PDU
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, MAX_PDU + 1) + b"\0" * 64)
    assoc.join(10)
    assert assoc.is_aborted
    node.wait_log(rf"refused AE 'SCANNER3' at 127\.0\.0\.1:\d+: a P-DATA-TF PDU of {MAX_PDU + 1} "
                  rf"bytes \(the limit is {MAX_PDU}\); association aborted")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.Modality, ds.BitsAllocated = generate_uid(), "MR", 16
    ds.PixelData = b"\0" * ((MAX_OBJECT_MB << 20) + 4096)
    assoc = ae.associate(HOST, node.port, ae_title=NODE_AE)
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.join(10)
    assert assoc.is_aborted and "Status" not in status
    node.wait_log(rf"refused AE 'SCANNER3' at 127\.0\.0\.1:\d+: an object of more than "
                  rf"{MAX_OBJECT_MB << 20} bytes")
    assert not (node.storage / "incoming" / storage_key(ds.StudyInstanceUID)).exists()
    assert echoscu(node.port) == 0


def test_four_concurrent_senders_all_get_their_seg(peers, tmp_path):
    node, receiver = peers
    studies = []
    for k, ae in enumerate(SENDERS):
        st = _phantom(10 + k)
        src = tmp_path / ae
        uid = generate_uid()
        write_dicom_series(st, src, study_uid=uid, patient_id=f"P{k}")
        studies.append((st, src, uid))
    procs = [subprocess.Popen(["storescu", "-aet", ae, "-aec", NODE_AE, *DCMTK_TIMEOUTS, "+sd", "+r",
                               HOST, str(node.port), str(src)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for ae, (_, src, _) in zip(SENDERS, studies)]
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0, err
    for st, src, uid in studies:
        _check_segs_against_source(receiver.segs(uid, 2), src, st.geometry.origins)
    for k, ae in enumerate(SENDERS):
        assert re.search(rf"\(patient P{k}, from {ae}, 12 objects, [^)]*\): 2 SEG sent", node.text())


def test_sigterm_abandons_cleanly_and_a_restart_redoes_the_study(tiny_bundle, tmp_path):
    """SIGTERM during a reconstruction: exit 0, the study's images intact in work/, no
    staging or temporary file anywhere; the next start redoes it and sends its SEG."""
    receiver = Receiver(tmp_path / "received")
    storage = tmp_path / "storage"
    try:
        node = Node(storage, tiny_bundle, receiver.dest, "--steps", "100000", "--patience", "0")
        try:
            st = _phantom(7)
            src = tmp_path / "dicom"
            uid = generate_uid()
            write_dicom_series(st, src, study_uid=uid)
            assert storescu(src, node.port).returncode == 0
            node.wait_log(r"12 objects, \S+\): reconstructing")
            time.sleep(1.0)
            rc = node.stop()
        finally:
            node.kill()
        assert rc == 0, node.text()[-3000:]
        text = node.text()
        assert "reconstruction abandoned (stopping); it is redone at the next start" in text
        assert "stopped (SIGTERM)" in text
        _assert_no_partial_files(storage)
        (work,) = (storage / "work").iterdir()
        images = sorted((work / "images").iterdir())
        assert len(images) == 12 and not (work / "seg").exists()
        assert {pydicom.dcmread(f).SOPInstanceUID for f in images} == {
            pydicom.dcmread(f).SOPInstanceUID for f in src.iterdir()}

        node = Node(storage, tiny_bundle, receiver.dest)
        try:
            node.wait_log(r"left by a previous run: queued")
            _check_segs_against_source(receiver.segs(uid, 2), src, st.geometry.origins)
            assert node.stop() == 0
        finally:
            node.kill()
        assert not list((storage / "work").iterdir())
    finally:
        receiver.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_pki(folder: Path, name: str) -> dict:
    """A CA and two certificates it signs (node, peer) for 127.0.0.1, as PEM files."""
    folder.mkdir(parents=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", f"/CN={name} test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    (folder / "leaf.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    out = {"ca": folder / "ca.pem"}
    for leaf in ("node", "peer"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{leaf}.key", "-out",
                 f"{leaf}.csr", "-subj", f"/CN={name} {leaf}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{leaf}.pem", "-days", "2", "-extfile", "leaf.ext",
                 cwd=folder)
        out[leaf] = {"cert": folder / f"{leaf}.pem", "key": folder / f"{leaf}.key",
                     "ca": folder / "ca.pem"}
    return out


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is needed to make test certificates")
def test_mutual_tls_both_ways(tiny_bundle, tmp_path):
    """--tls-*: storescu with a certificate of the CA gets its SEG, sent to a storescp
    that requires TLS (--send-tls); a plain connection and a certificate of another CA
    are refused at the handshake, one log line each."""
    pki = _make_pki(tmp_path / "pki", "site")
    rogue = _make_pki(tmp_path / "rogue", "rogue")
    receiver = Receiver(tmp_path / "received", tls=pki["peer"])
    node_tls = pki["node"]
    try:
        node = Node(tmp_path / "storage", tiny_bundle, receiver.dest, "--tls-cert",
                    str(node_tls["cert"]), "--tls-key", str(node_tls["key"]), "--tls-ca",
                    str(node_tls["ca"]), "--send-tls")
        try:
            assert "(mutual TLS)" in node.text() and "over TLS" in node.text()
            peer = pki["peer"]
            tls = ["+tls", str(peer["key"]), str(peer["cert"]), "+cf", str(peer["ca"])]
            assert echoscu(node.port, SENDERS[0], *tls) == 0
            st = _phantom(8)
            src = tmp_path / "dicom"
            uid = generate_uid()
            write_dicom_series(st, src, study_uid=uid)
            p = storescu(src, node.port, SENDERS[0], *tls)
            assert p.returncode == 0, p.stderr
            _check_segs_against_source(receiver.segs(uid, 2), src, st.geometry.origins)

            assert echoscu(node.port) != 0                       # no TLS
            bad = rogue["peer"]
            assert echoscu(node.port, SENDERS[0], "+tls", str(bad["key"]), str(bad["cert"]),
                           "+cf", str(pki["ca"])) != 0            # a certificate of another CA
            text = node.wait_log(r"(?s)(refused 127\.0\.0\.1:\d+: TLS handshake failed.*){2}").string
            assert re.search(r"TLS handshake failed \([^)]*certificate", text)
            assert node.stop() == 0
        finally:
            node.kill()
    finally:
        receiver.close()


def test_api_unreachable_destination_association_cap_silent_peer(tiny_bundle, tmp_path):
    """DicomNode on the Python API (in a thread, stopped by stop()): when the destination
    does not answer, the study goes to failed/ with the reason, logged with its
    identity, and the node goes on answering; with --max-associations 1 a second
    association is rejected while one is open; a peer that stops inside a PDU is
    dropped after the network timeout."""
    from pynetdicom import AE
    from deeprecon.runtime.dicom_node import DicomNode, NodeConfig
    from deeprecon.runtime.pipeline import Reconstructor

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("deeprecon.runtime.dicom_node")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    config = NodeConfig(ae_title=NODE_AE, storage=tmp_path / "storage", allowed=(SENDERS[0],),
                        destination=Destination(DEST_AE, HOST, _free_port()), host=HOST, port=0,
                        quiet_period_s=0.5, send_attempts=2, retry_wait_s=0.1, steps=0,
                        max_associations=1, network_timeout_s=2.0)
    try:
        with Reconstructor(tiny_bundle, backend="torch", device="cpu") as rec:
            node = DicomNode(config, rec)
            _, port = node.start()
            thread = threading.Thread(target=node.serve_forever)
            thread.start()
            try:
                src = tmp_path / "dicom"
                uid = generate_uid()
                write_dicom_series(_phantom(9), src, study_uid=uid, patient_id="P-API")
                assert storescu(src, port).returncode == 0
                end = time.monotonic() + TIMEOUT_S
                while not list((tmp_path / "storage" / "failed").glob("*/failure.json")):
                    assert time.monotonic() < end, [r.getMessage() for r in records]
                    time.sleep(0.1)
                assert echoscu(port) == 0

                ae = AE(ae_title=SENDERS[0])
                ae.add_requested_context("1.2.840.10008.1.1")
                # the node may still be closing echoscu's association (its thread ends
                # a moment after echoscu returns): try again until that one is gone
                end = time.monotonic() + 10
                held = ae.associate(HOST, port, ae_title=NODE_AE)
                while not held.is_established and time.monotonic() < end:
                    time.sleep(0.2)
                    held = ae.associate(HOST, port, ae_title=NODE_AE)
                assert held.is_established
                assert echoscu(port) != 0                 # the second one: over the cap
                held.release()
                assert any("the limit of concurrent associations is reached (1)" in r.getMessage()
                           for r in records)

                with socket.create_connection((HOST, port), timeout=10) as s:
                    s.sendall(struct.pack(">BBL", 0x01, 0, 200) + b"\0" * 10)  # then silence
                    t0 = time.monotonic()
                    assert s.recv(64) == b""              # dropped by the node
                    assert 1.5 < time.monotonic() - t0 < 8
                assert echoscu(port) == 0
            finally:
                node.stop()
                thread.join(30)
        assert not thread.is_alive()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    (failure,) = (tmp_path / "storage" / "failed").glob("*/failure.json")
    data = __import__("json").loads(failure.read_text())
    assert data["stage"] == "send" and data["exit_code"] == 69
    assert f"{DEST_AE}@{HOST}:{config.destination.port}" in data["message"]
    assert len(list((failure.parent / "images").iterdir())) == 12
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"study {uid} (patient P-API, from SCANNER1, 12 objects" in errors[0]
    assert "failed at send (exit 69)" in errors[0]
    assert node.stats["studies_failed"] == 1 and node.stats["stored"] == 12


def test_serve_without_the_node_extra_says_so(tmp_path):
    """Without pynetdicom, `serve` is one error line naming the extra, exit 69."""
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.partition('.')[0] == 'pynetdicom':\n"
            "            raise ModuleNotFoundError(name, name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from deeprecon.runtime.cli import run\n"
            f"sys.exit(run(['serve', '--ae-title', 'N', '--port', '0', '--storage', {str(tmp_path)!r}, "
            "'--allow', 'A', '--send-to', 'D@127.0.0.1:1']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=ENV)
    assert p.returncode == 69, p.stderr[-2000:]
    assert "the DICOM node needs pynetdicom, which is not installed" in p.stderr
    assert "pip install 'deeprecon-rt[node]'" in p.stderr and "Traceback" not in p.stderr
