"""A scanner-side DICOM node: cine studies in over C-STORE, DICOM SEG back over C-STORE.

``deeprecon-rt serve`` (and :class:`DicomNode` for embedders) runs a pynetdicom Storage
SCP next to the scanner. The model is opened once, by the caller, for the server's life.

Who may send what:

- Associations are accepted only from the calling AE titles of ``allowed`` and only
  when they call this node's AE title; MR Image Storage (single-frame, the images a DICOM
  SEG can reference) in the uncompressed transfer syntaxes, and Verification (C-ECHO).
  Every other presentation context is refused at negotiation.
- At most ``max_associations`` at a time (A-ASSOCIATE-RJ "local limit exceeded" beyond).
- The node advertises ``max_pdu`` as its maximum PDU length and enforces it: a P-DATA-TF
  PDU longer than that, any other PDU longer than :data:`MAX_CONTROL_PDU`, or an object
  (one C-STORE's data set) longer than ``max_object_bytes`` is refused as soon as its
  length is read, before its bytes are, with an A-ABORT. A peer that stops sending in
  the middle of a PDU (or of a TLS handshake) is dropped after ``network_timeout_s``.
- A C-STORE whose data set does not decode, whose SOP class or instance UID differs from
  its request, that is not an MR object or has no StudyInstanceUID is answered with an
  error status and not stored.
- Optional mutual TLS: the node presents its certificate and requires a client
  certificate signed by the given CA (TLS 1.2 or later); with ``send_tls`` the SEG goes
  out over TLS too, the destination's certificate checked against the same CA and its
  host name.

Every refusal is one log line (WARNING) naming the peer and the reason; bad input never
stops the node.

Storage (``storage``; names come from SHA-256 hashes, never from DICOM attributes: a
SOPInstanceUID such as ``../../x`` cannot choose a path)::

    incoming/KEY/SOP.dcm     objects as they arrive; KEY = sha256(StudyInstanceUID)[:32],
                             SOP = sha256(SOPInstanceUID)[:32]. Each object is written to
                             a temporary file and renamed into place
                             (:func:`~deeprecon.runtime.publish.write_file_atomic`).
    work/NAME/images/        a complete study (NAME = UTC time + KEY), queued or being
                             reconstructed; study.json its identity; seg/ its SEGs.
    failed/NAME/             a study whose reconstruction or sending failed, kept for
                             inspection: images/, study.json, failure.json (exit code,
                             message, stage).

A study is complete when no object of it has arrived for ``quiet_period_s``: its folder
is then moved from incoming/ to work/ (objects of the same study arriving later start a
new one). Complete studies are reconstructed one at a time in the thread that runs
:meth:`DicomNode.serve_forever` (the DICOM associations are served by pynetdicom's
threads meanwhile), their segmentations written as DICOM SEG (one per phase,
:mod:`~deeprecon.runtime.outputs.dicom_seg`) and sent to ``destination``; then the work
folder is removed. Failures are logged with the study's identity and the study moved to
failed/; the node goes on.

Stopping: SIGTERM or SIGHUP (the one policy of :mod:`deeprecon.runtime.signals`), Ctrl-C,
or :meth:`DicomNode.stop`. The node stops accepting, aborts the associations in progress
(an object not fully received is not stored; one being written is finished first) and
abandons a reconstruction in progress: its SEG staging folder is removed and the study
stays in work/, to be redone at the next start. Objects of incomplete studies stay in
incoming/ and are sealed after the quiet period at the next start. One node at a time
uses a storage folder (a lock file says so).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import socket
import ssl
import struct
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import DeepreconError, ExitCode, UnavailableError, UsageError
from .publish import staged_folder, write_file_atomic, write_json_atomic
from .signals import Terminated, signals_deferred, terminating_signals_raise

try:
    from pynetdicom import AE, evt
    from pynetdicom.transport import (AssociationSocket, RequestHandler,
                                      ThreadedAssociationServer)
except ImportError:  # pragma: no cover - the node extra is missing
    raise UnavailableError("the DICOM node needs pynetdicom, which is not installed",
                           hint="pip install 'deeprecon-rt[node]'") from None

log = logging.getLogger(__name__)

NODE_EXTRA_HINT = "pip install 'deeprecon-rt[node]'"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
#: the transfer syntaxes accepted for MR images (what the DICOM loader decodes)
ACCEPTED_TRANSFER_SYNTAXES = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
#: the largest PDU other than P-DATA-TF accepted (an A-ASSOCIATE-RQ with 128
#: presentation contexts of several transfer syntaxes each is about 20 kB)
MAX_CONTROL_PDU = 1 << 16
#: how long a stopping node waits for each association thread
_JOIN_S = 5.0
_HASH_CHARS = 32

# C-STORE statuses (PS3.4 B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_NOT_MATCHING_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
# A-ABORT PDU: service-provider source (2), reason "invalid PDU parameter value" (6)
_ABORT_INVALID_PARAMETER = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6))
_REJECT_REASONS = {(1, 3): "its calling AE title is not allowed",
                   (1, 7): "it called another AE title than this node's",
                   (3, 2): "the limit of concurrent associations is reached"}


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Destination:
    """Where the SEG objects go: an AE title at a host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AE@HOST:PORT`` (an IPv6 host in brackets: ``AE@[::1]:104``)."""
        ae, at, rest = str(text).partition("@")
        host, colon, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not (at and colon and ae and host and port.isdigit() and 0 < int(port) < 65536):
            raise UsageError(f"--send-to must be AE@HOST:PORT, got {text!r}")
        return cls(check_ae_title(ae, "--send-to"), host, int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of mutual TLS: this node's certificate and key, and the CA that signs
    the peers' certificates."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class NodeConfig:
    """What a :class:`DicomNode` listens on, accepts, and does with a complete study.

    ae_title, host, port: this node (port 0: any free port, logged once bound);
    storage:    the folder of the received studies (see the module docstring);
    allowed:    calling AE titles accepted;
    destination: where the SEG objects are sent;
    quiet_period_s: a study is complete after this long without a new object of it;
    max_pdu:    the maximum PDU length advertised and enforced (bytes of a P-DATA-TF);
    max_object_bytes: the largest data set of one C-STORE accepted;
    max_associations: concurrent associations accepted;
    network_timeout_s: a silent peer (or one stalled inside a PDU) is dropped after this;
    tls, send_tls: mutual TLS on the listening port, and on the connection to the
                destination too when ``send_tls``;
    send_attempts, retry_wait_s: associations tried to send a study's SEG, and the wait
                between two;
    steps, phases, batch, patience: ``Reconstructor.reconstruct`` options (None: the
                bundle's default; phases: ED and ES when known, else all; patience: the
                inversion's early stop, 0 never).
    """

    ae_title: str
    storage: Path
    allowed: tuple[str, ...]
    destination: Destination
    host: str = "0.0.0.0"
    port: int = 11112
    quiet_period_s: float = 10.0
    max_pdu: int = 65536
    max_object_bytes: int = 64 << 20
    max_associations: int = 8
    network_timeout_s: float = 30.0
    tls: TLSFiles | None = None
    send_tls: bool = False
    send_attempts: int = 3
    retry_wait_s: float = 5.0
    steps: int | None = None
    phases: str | None = None
    batch: int | None = None
    patience: int | None = None

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title, "--ae-title")
        if not self.allowed:
            raise UsageError("no calling AE title is allowed", hint="give --allow AE[,AE...]")
        for ae in self.allowed:
            check_ae_title(ae, "--allow")
        if not 0 <= int(self.port) < 65536:
            raise UsageError(f"--port must be 0..65535, got {self.port}")
        checks = [("quiet period", self.quiet_period_s, 0.0), ("--max-pdu", self.max_pdu, 4096),
                  ("--max-object-mb", self.max_object_bytes, 1),
                  ("--max-associations", self.max_associations, 1),
                  ("network timeout", self.network_timeout_s, 0.001),
                  ("send attempts", self.send_attempts, 1), ("retry wait", self.retry_wait_s, 0.0)]
        for what, value, low in checks:
            if not value >= low:
                raise UsageError(f"{what} must be at least {low}, got {value}")
        if self.send_tls and self.tls is None:
            raise UsageError("--send-tls needs --tls-cert, --tls-key and --tls-ca")

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["storage"], d["destination"] = str(self.storage), str(self.destination)
        d["tls"] = None if self.tls is None else {k: str(v) for k, v in asdict(self.tls).items()}
        return d


def check_ae_title(value: str, option: str) -> str:
    """An AE title: 1 to 16 printable ASCII characters, no backslash, not only spaces."""
    v = str(value).strip()
    if not v or len(v) > 16 or any(not 32 <= ord(c) < 127 or c == "\\" for c in v):
        raise UsageError(f"{option}: {value!r} is not an AE title (1 to 16 printable ASCII "
                         "characters, no backslash)")
    return v


def server_ssl_context(tls: TLSFiles) -> ssl.SSLContext:
    """The listening side of mutual TLS: this node's certificate, a client certificate
    signed by ``tls.ca`` required (that CA only: not the system's), TLS 1.2 or later."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_tls(ctx, tls)
    return ctx


def client_ssl_context(tls: TLSFiles) -> ssl.SSLContext:
    """The sending side: this node's certificate as the client's, the destination's
    certificate checked against ``tls.ca`` (only) and its host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED, check_hostname
    _load_tls(ctx, tls)
    return ctx


def _load_tls(ctx: ssl.SSLContext, tls: TLSFiles) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"--tls-cert {tls.cert} / --tls-key {tls.key}: cannot be loaded ({e})",
                         hint="give PEM files of a certificate and its private key") from None
    try:
        ctx.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"--tls-ca {tls.ca}: cannot be loaded ({e})",
                         hint="give the PEM file of the CA that signs the peers' certificates") from None


# ----------------------------------------------------------------------------- helpers
def storage_key(uid: str) -> str:
    """The file or folder name of a UID: its SHA-256, 32 hex digits."""
    return hashlib.sha256(str(uid).encode("utf-8", "replace")).hexdigest()[:_HASH_CHARS]


def printable(value: Any, limit: int = 64) -> str:
    """``value`` for a log line: printable ASCII only (others as ?), at most ``limit``
    characters, so that a DICOM attribute cannot forge or break log lines."""
    s = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(value))
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _one_line(text: str, limit: int = 500) -> str:
    return printable(" ".join(str(text).split()), limit)


def _peer(assoc: Any) -> str:
    """'AE X at HOST:PORT' (just HOST:PORT before the A-ASSOCIATE-RQ is read)."""
    try:
        info = assoc.requestor.address_info
        where = f"{printable(info.address)}:{info.port}"
    except AttributeError:
        where = "?"
    ae = getattr(assoc.requestor, "ae_title", "") or ""
    return f"AE '{printable(ae, 16)}' at {where}" if ae.strip() else where


# ----------------------------------------------------------------------------- the PDU guard
class PduGuard:
    """Follows the byte stream a peer sends, PDU by PDU and, inside P-DATA-TF PDUs,
    presentation data value by value, and says when it breaks a limit: a PDU longer than
    allowed, or a data set (the fragments of one message) longer than ``max_object``.
    Each limit is checked when the length that breaks it is read, before the bytes it
    announces. Feed it every received chunk in order; chunks need not align with PDUs."""

    def __init__(self, *, max_pdata: int, max_control: int, max_object: int):
        self.max_pdata, self.max_control, self.max_object = max_pdata, max_control, max_object
        self._head = bytearray()   # the PDU header (6 bytes) being read
        self._left = 0             # body bytes left in the current PDU
        self._pdata = False        # the current PDU is a P-DATA-TF
        self._item = bytearray()   # the PDV item header (length, context, control) being read
        self._item_left = 0        # fragment bytes left in the current PDV
        self.object_bytes = 0      # data set bytes of the message being received

    def feed(self, data: bytes) -> str | None:
        """Account for ``data``; the reason for refusing the stream, or None."""
        i, n = 0, len(data)
        while i < n:
            if self._left == 0:
                take = min(6 - len(self._head), n - i)
                self._head += data[i:i + take]
                i += take
                if len(self._head) < 6:
                    break
                pdu_type, _, length = struct.unpack(">BBL", self._head)
                self._head.clear()
                self._pdata = pdu_type == 0x04
                limit = self.max_pdata if self._pdata else self.max_control
                if length > limit:
                    kind = "P-DATA-TF" if self._pdata else f"type 0x{pdu_type:02X}"
                    return f"a {kind} PDU of {length} bytes (the limit is {limit})"
                self._left = length
                self._item.clear()
                self._item_left = 0
                continue
            take = min(self._left, n - i)
            if self._pdata:
                why = self._feed_items(data, i, i + take)
                if why is not None:
                    return why
            self._left -= take
            i += take
        return None

    def _feed_items(self, data: bytes, i: int, end: int) -> str | None:
        while i < end:
            if self._item_left == 0:
                take = min(6 - len(self._item), end - i)
                self._item += data[i:i + take]
                i += take
                if len(self._item) < 6:
                    break
                length, _context, control = struct.unpack(">LBB", self._item)
                self._item.clear()
                fragment = max(length - 2, 0)
                if not control & 0x01:          # a data set fragment (0x01: command)
                    self.object_bytes += fragment
                    if self.object_bytes > self.max_object:
                        return (f"an object of more than {self.max_object} bytes "
                                f"(the limit; {self.object_bytes} announced so far)")
                    if control & 0x02:          # its last fragment
                        self.object_bytes = 0
                self._item_left = fragment
                continue
            take = min(self._item_left, end - i)
            self._item_left -= take
            i += take
        return None


class _GuardedSocket(AssociationSocket):
    """pynetdicom's acceptor socket, with every received chunk checked by a
    :class:`PduGuard`. On a refusal it sends an A-ABORT, logs one line, and reads as a
    closed connection from then on (pynetdicom then ends the association)."""

    _guard: PduGuard
    _node: "DicomNode"
    _refused: bool

    @classmethod
    def adopt(cls, sock: AssociationSocket, node: "DicomNode") -> None:
        """Make pynetdicom's socket a guarded one, in place: the request handler builds
        its socket inline, and a second socket object would queue a second
        transport-connection event into the association's state machine."""
        sock.__class__ = cls
        sock._guard = PduGuard(max_pdata=node.config.max_pdu, max_control=MAX_CONTROL_PDU,
                               max_object=node.config.max_object_bytes)
        sock._node = node
        sock._refused = False

    def recv(self, nr_bytes: int) -> bytearray:
        if self._refused:
            return bytearray()
        data = super().recv(nr_bytes)
        why = self._guard.feed(data)
        if why is None:
            return data
        self._refused = True
        self._node._refusal(f"refused {_peer(self.assoc)}: {why}; association aborted")
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.sendall(_ABORT_INVALID_PARAMETER)
        return bytearray()


class _NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, but the TLS handshake and a timeout on each accepted
    socket happen in the connection's own thread: the stock server shakes hands in its
    accept loop, where one silent client would stall every other."""

    node: "DicomNode"

    def get_request(self):
        client, address = self.socket.accept()
        client.settimeout(self.node.config.network_timeout_s)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address


class _NodeRequestHandler(RequestHandler):
    server: _NodeServer

    def handle(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            where = f"{printable(self.client_address[0])}:{self.client_address[1]}"
            try:
                self.request.do_handshake()
            except (OSError, ValueError) as e:   # ssl.SSLError is an OSError
                self.server.node._refusal(f"refused {where}: TLS handshake failed "
                                          f"({_one_line(e, 200)})")
                with contextlib.suppress(OSError):
                    self.request.close()
                return
        super().handle()

    def _create_association(self):
        assoc = super()._create_association()
        _GuardedSocket.adopt(assoc.dul.socket, self.server.node)
        return assoc


# ----------------------------------------------------------------------------- the node
@dataclass
class _Arrivals:
    """What has arrived of one study that is not complete yet."""

    key: str
    study_uid: str
    patient_id: str
    first_utc: str
    calling: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    last_utc: str = ""
    last: float = 0.0        # time.monotonic() of the last object

    def identity(self) -> dict[str, Any]:
        return {"study_instance_uid": self.study_uid, "patient_id": self.patient_id,
                "calling_ae_titles": sorted(self.calling), "objects": len(self.names),
                "first_received_utc": self.first_utc, "last_received_utc": self.last_utc,
                "storage_key": self.key}


@dataclass
class _Work:
    """A complete study in work/."""

    path: Path
    identity: dict[str, Any]
    last_arrival: float | None = None   # time.monotonic() of its last object (this run)

    @property
    def images(self) -> Path:
        return self.path / "images"

    def describe(self) -> str:
        i = self.identity
        aes = ",".join(i.get("calling_ae_titles") or []) or "?"
        return (f"study {printable(i.get('study_instance_uid'))} (patient "
                f"{printable(i.get('patient_id'), 32)}, from {printable(aes, 80)}, "
                f"{i.get('objects', '?')} objects, {self.path.name})")


class _StudyFailed(Exception):
    def __init__(self, stage: str, code: int, message: str):
        super().__init__(message)
        self.stage, self.code, self.message = stage, int(code), message


class DicomNode:
    """The DICOM node of the module docstring, on an opened
    :class:`~deeprecon.runtime.pipeline.Reconstructor` (which the caller closes)::

        with Reconstructor(bundle) as rec:
            DicomNode(config, rec).serve_forever()     # until SIGTERM or stop()
    """

    def __init__(self, config: NodeConfig, reconstructor: Any):
        try:
            import highdicom  # noqa: F401
        except ImportError:
            raise UnavailableError("the DICOM node writes DICOM SEG with highdicom, which is "
                                   "not installed", hint=NODE_EXTRA_HINT) from None
        self.config = config
        self.rec = reconstructor
        self.storage = Path(config.storage)
        self.incoming = self.storage / "incoming"
        self.work = self.storage / "work"
        self.failed = self.storage / "failed"
        self._server_ctx = None if config.tls is None else server_ssl_context(config.tls)
        self._client_ctx = (client_ssl_context(config.tls) if config.send_tls and config.tls
                            else None)
        self._lock = threading.Lock()            # the dicts below
        self._study_locks: dict[str, threading.Lock] = {}
        self._arrivals: dict[str, _Arrivals] = {}
        self._assoc_counts: dict[int, list[int]] = {}
        self._queue: deque[_Work] = deque()
        self._stop = threading.Event()
        self._lock_file = None
        self._ae = None
        self._server: _NodeServer | None = None
        self.address: tuple[str, int] | None = None
        self.stats = {"stored": 0, "refused": 0, "studies_done": 0, "studies_failed": 0}

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Lock the storage folder, take up what a previous run left, and start
        listening. Returns the (host, port) bound."""
        try:
            # patient data: a storage folder made here is open to this user only
            self.storage.mkdir(mode=0o700, parents=True, exist_ok=True)
            for d in (self.incoming, self.work, self.failed):
                d.mkdir(exist_ok=True)
        except OSError as e:
            raise UsageError(f"--storage {self.storage}: {e.strerror or e}",
                             hint="give a folder this user can write") from None
        self._lock_storage()
        try:
            self._recover()
            self._start_server()
        except BaseException:
            self._unlock_storage()
            raise
        return self.address

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`, SIGTERM/SIGHUP (a clean stop: returns) or Ctrl-C
        (stops cleanly, then KeyboardInterrupt goes on)."""
        if self._server is None:
            self.start()
        why = "stop() called"
        try:
            with terminating_signals_raise():
                while not self._stop.is_set():
                    self._seal_quiet_studies()
                    if self._queue:
                        self._process(self._queue.popleft())
                    else:
                        self._stop.wait(min(0.2, max(self.config.quiet_period_s / 4, 0.02)))
        except Terminated as e:
            why = e.signal_name
        except KeyboardInterrupt:
            why = "interrupted"
            raise
        finally:
            with signals_deferred():
                self.close(why)

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (from another thread)."""
        self._stop.set()

    def close(self, why: str = "closed") -> None:
        """Stop listening, abort the associations in progress (waiting for their threads)
        and release the storage folder."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            assocs = list(server.active_associations)
            for assoc in assocs:
                with contextlib.suppress(Exception):
                    assoc.abort()
            for assoc in assocs:
                assoc.join(_JOIN_S)
            with self._lock:
                waiting = len(self._arrivals)
            log.info("stopped (%s): %d association(s) aborted, %d incomplete stud%s left in "
                     "incoming/, %d complete one(s) in work/ for the next start", why,
                     len(assocs), waiting, "y" if waiting == 1 else "ies",
                     sum(1 for p in self.work.iterdir() if p.is_dir() and not p.name.startswith(".")))
        self._unlock_storage()

    def _lock_storage(self) -> None:
        import fcntl

        f = open(self.storage / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise UsageError(f"{self.storage} is used by another running node",
                             hint="give each node its own --storage folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def _unlock_storage(self) -> None:
        f, self._lock_file = self._lock_file, None
        if f is not None:
            f.close()   # closing releases the flock

    def _start_server(self) -> None:
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_pdu_size = cfg.max_pdu
        ae.maximum_associations = cfg.max_associations
        ae.require_calling_aet = list(cfg.allowed)
        ae.require_called_aet = True
        ae.network_timeout = cfg.network_timeout_s
        ae.acse_timeout = cfg.network_timeout_s
        ae.dimse_timeout = cfg.network_timeout_s
        ae.add_supported_context(MR_IMAGE_STORAGE, list(ACCEPTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION, list(ACCEPTED_TRANSFER_SYNTAXES))
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_RELEASED, self._on_ended),
                    (evt.EVT_ABORTED, self._on_ended)]
        try:
            server = ae.make_server((cfg.host, int(cfg.port)), ssl_context=self._server_ctx,
                                    evt_handlers=handlers, server_class=_NodeServer,
                                    request_handler=_NodeRequestHandler)
        except OSError as e:
            raise UnavailableError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}",
                                   hint="choose another --port or --host") from None
        server.node = self
        # as AE.start_server(block=False) does, so that AE.shutdown() knows the server
        ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name=f"DicomNode@{cfg.port}",
                         daemon=True).start()
        self._ae, self._server = ae, server
        host, port = server.server_address[:2]
        self.address = (host, port)
        log.info("DICOM node %s listening on %s:%d%s; accepting MR images from %s; a study is "
                 "complete after %g s without new objects; SEG to %s%s", cfg.ae_title, host, port,
                 " (mutual TLS)" if self._server_ctx else "", ",".join(cfg.allowed),
                 cfg.quiet_period_s, cfg.destination, " over TLS" if self._client_ctx else "")

    # -- receiving (pynetdicom's threads) ---------------------------------------------
    def _refusal(self, message: str) -> None:
        with self._lock:
            self.stats["refused"] += 1
        log.warning("%s", message)

    def _on_rejected(self, event) -> None:
        rj = getattr(event.assoc.acceptor, "primitive", None)
        key = (getattr(rj, "result_source", None), getattr(rj, "diagnostic", None))
        why = _REJECT_REASONS.get(key, f"rejected (source {key[0]}, reason {key[1]})")
        if key == (1, 3):
            why += f" (allowed: {','.join(self.config.allowed)})"
        elif key == (3, 2):
            why += f" ({self.config.max_associations})"
        self._refusal(f"refused association from {_peer(event.assoc)}: {why}")

    def _on_accepted(self, event) -> None:
        assoc = event.assoc
        with self._lock:
            self._assoc_counts[id(assoc)] = [0, 0]
        refused = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        if refused:
            names = sorted(printable(_sop_name(u)) for u in refused)
            line = (f"refused {len(refused)} presentation context(s) of {_peer(assoc)}: "
                    f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''} (this node "
                    "accepts MR Image Storage, uncompressed, and Verification)")
            if assoc.accepted_contexts:
                # routine: storescu and PACS propose every storage class they know
                log.info("%s", line)
            else:
                self._refusal(line + "; nothing can be sent on this association")
        log.debug("association from %s accepted", _peer(assoc))

    def _on_ended(self, event) -> None:
        with self._lock:
            stored, refused = self._assoc_counts.pop(id(event.assoc), [0, 0])
        if stored or refused:
            log.info("association from %s %s: %d object(s) stored, %d refused", _peer(event.assoc),
                     "aborted" if event.event is evt.EVT_ABORTED else "released", stored, refused)

    def _count(self, assoc, stored: bool) -> None:
        with self._lock:
            counts = self._assoc_counts.get(id(assoc))
            if counts is not None:
                counts[0 if stored else 1] += 1
            if stored:
                self.stats["stored"] += 1

    def _on_store(self, event) -> int:
        """One C-STORE: checked, written to a temporary file, renamed into its study's
        folder. Never raises (an error is a status and a log line)."""
        peer = _peer(event.assoc)
        try:
            status, why = self._store(event)
        except Exception as e:  # noqa: BLE001 - bad input must never stop the node
            log.debug("C-STORE from %s", peer, exc_info=True)
            status, why = STATUS_CANNOT_UNDERSTAND, f"{type(e).__name__}: {_one_line(e, 200)}"
        self._count(event.assoc, status == STATUS_SUCCESS)
        if status != STATUS_SUCCESS:
            self._refusal(f"refused an object from {peer}: {why}; C-STORE status 0x{status:04X}")
        return status

    def _store(self, event) -> tuple[int, str]:
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        if str(event.context.abstract_syntax) != MR_IMAGE_STORAGE:
            return STATUS_NOT_MATCHING_SOP_CLASS, "not MR Image Storage"
        size = len(req.DataSet.getvalue())
        if size > self.config.max_object_bytes:
            return (STATUS_OUT_OF_RESOURCES,
                    f"an object of {size} bytes (the limit is {self.config.max_object_bytes})")
        try:
            ds = event.dataset
            sop_class = str(ds.get("SOPClassUID", ""))
            ds_sop = str(ds.get("SOPInstanceUID", ""))
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            modality = str(ds.get("Modality", "") or "")
            patient_id = str(ds.get("PatientID", "") or "")
        except Exception as e:  # noqa: BLE001 - pydicom decodes lazily, anything can fail
            return STATUS_CANNOT_UNDERSTAND, f"its data set does not decode ({type(e).__name__}: {_one_line(e, 200)})"
        if sop_class != MR_IMAGE_STORAGE:
            return STATUS_NOT_MATCHING_SOP_CLASS, f"its SOPClassUID {printable(sop_class)!r} is not MR Image Storage"
        if not sop_uid or ds_sop != sop_uid:
            return STATUS_NOT_MATCHING_SOP_CLASS, "its SOPInstanceUID differs from the request's"
        if modality and modality != "MR":
            return STATUS_NOT_MATCHING_SOP_CLASS, f"its Modality is {printable(modality, 16)!r}, not MR"
        if not study_uid.strip():
            return STATUS_NOT_MATCHING_SOP_CLASS, "it has no StudyInstanceUID"
        key = storage_key(study_uid)
        name = storage_key(sop_uid) + ".dcm"
        data = event.encoded_dataset(include_meta=True)
        with self._lock:
            study_lock = self._study_locks.setdefault(key, threading.Lock())
        try:
            with study_lock:   # sealing takes it too: no half-written object is ever moved
                write_file_atomic(self.incoming / key / name, lambda tmp: tmp.write_bytes(data))
                with self._lock:
                    a = self._arrivals.get(key)
                    if a is None:
                        a = self._arrivals[key] = _Arrivals(key, study_uid, patient_id, _utc_now())
                    a.calling.add(str(event.assoc.requestor.ae_title).strip())
                    a.names.add(name)
                    a.last, a.last_utc = time.monotonic(), _utc_now()
        except OSError as e:
            return STATUS_OUT_OF_RESOURCES, f"it could not be stored ({_one_line(e, 200)})"
        log.debug("stored %s/%s from %s", key, name, _peer(event.assoc))
        return STATUS_SUCCESS, ""

    # -- complete studies (the serving thread) ----------------------------------------
    def _seal_quiet_studies(self) -> None:
        now = time.monotonic()
        with self._lock:
            quiet = [k for k, a in self._arrivals.items()
                     if now - a.last >= self.config.quiet_period_s]
        for key in quiet:
            with self._lock:
                study_lock = self._study_locks.setdefault(key, threading.Lock())
            with study_lock, signals_deferred():
                with self._lock:
                    a = self._arrivals.get(key)
                    if a is None or time.monotonic() - a.last < self.config.quiet_period_s:
                        continue
                    # the study's lock stays: a writer may be waiting on it already
                    del self._arrivals[key]
                work = self._seal(key, a.identity())
            if work is not None:
                work.last_arrival = a.last
                log.info("%s complete (no new object for %g s): queued", work.describe(),
                         self.config.quiet_period_s)
                self._queue.append(work)

    def _seal(self, key: str, identity: dict[str, Any]) -> _Work | None:
        """Move incoming/KEY to work/NAME/images with its study.json (signals deferred by
        the caller)."""
        src = self.incoming / key
        if not src.is_dir():
            return None
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        dst = self.work / f"{stamp}-{key}"
        dst.mkdir()
        identity = {**identity, "sealed_utc": _utc_now()}
        write_json_atomic(dst / "study.json", identity)
        os.replace(src, dst / "images")
        return _Work(dst, identity)

    def _process(self, work: _Work) -> None:
        """Reconstruct one complete study and send its SEG; a failure moves it to failed/."""
        cfg = self.config
        t0 = time.monotonic()
        log.info("%s: reconstructing", work.describe())
        try:
            times = self._reconstruct_and_send(work)
        except _StudyFailed as e:
            self._fail(work, e.stage, e.code, e.message)
            return
        except Terminated:
            log.warning("%s: reconstruction abandoned (stopping); it is redone at the next start",
                        work.describe())
            raise
        except KeyboardInterrupt:
            log.warning("%s: reconstruction abandoned (interrupted); it is redone at the next "
                        "start", work.describe())
            raise
        with signals_deferred():
            trash = work.path.with_name(f".done-{work.path.name}")
            os.replace(work.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self.stats["studies_done"] += 1
        since = ("" if work.last_arrival is None else
                 f"; {time.monotonic() - work.last_arrival:.1f} s after its last object "
                 f"(quiet period {cfg.quiet_period_s:g} s)")
        log.info("%s: %d SEG sent to %s in %.1f s (reconstruction %.1f s, SEG %.1f s, send "
                 "%.1f s)%s", work.describe(), times["segs"], cfg.destination,
                 time.monotonic() - t0, times["reconstruct"], times["seg"], times["send"], since)

    def _reconstruct_and_send(self, work: _Work) -> dict[str, float]:
        from .io import check_acquisition
        from .io.dicom import load_dicom
        from .outputs.dicom_seg import dicom_seg_unavailable, write_dicom_seg

        cfg = self.config
        t0 = time.monotonic()
        with _stage("load"):
            study = check_acquisition(load_dicom(work.images))
        with _stage("reconstruct"):
            # interp 1: the node sends the native-grid segmentation only, so no
            # high-resolution slices are rendered between the native ones
            result = self.rec.reconstruct(study, steps=cfg.steps, interp=1, phases=cfg.phases,
                                          batch=cfg.batch, early_stop_patience=cfg.patience)
        t1 = time.monotonic()
        why = dicom_seg_unavailable(result)
        if why is not None:
            raise _StudyFailed("seg", ExitCode.DATA, why)
        with _stage("seg"):
            with staged_folder(work.path / "seg") as stage:
                warnings = write_dicom_seg(result, stage)
                if warnings:
                    raise _StudyFailed("seg", ExitCode.DATA, warnings[0])
        segs = sorted((work.path / "seg" / "segmentation").glob("seg_*.dcm"))
        if not segs:
            raise _StudyFailed("seg", ExitCode.INTERNAL, "no DICOM SEG was written")
        t2 = time.monotonic()
        self._send(segs, work)
        return {"reconstruct": t1 - t0, "seg": t2 - t1, "send": time.monotonic() - t2,
                "segs": len(segs)}

    def _send(self, paths: Sequence[Path], work: _Work) -> None:
        """C-STORE every file of ``paths`` to the destination in one association, up to
        ``send_attempts`` associations; _StudyFailed when none got them all stored."""
        cfg = self.config
        dest = cfg.destination
        ae = AE(ae_title=cfg.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = cfg.network_timeout_s
        ae.connection_timeout = cfg.network_timeout_s
        ae.add_requested_context(SEGMENTATION_STORAGE, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])
        tls_args = None if self._client_ctx is None else (self._client_ctx, dest.host)
        last = ""
        for attempt in range(1, cfg.send_attempts + 1):
            if attempt > 1:
                log.warning("%s: sending to %s failed (%s); attempt %d of %d in %g s",
                            work.describe(), dest, last, attempt, cfg.send_attempts, cfg.retry_wait_s)
                self._stop.wait(cfg.retry_wait_s)
                if self._stop.is_set():
                    break
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                                 max_pdu=cfg.max_pdu, tls_args=tls_args)
            if not assoc.is_established:
                last = ("the association was rejected" if assoc.is_rejected else
                        "the association was aborted" if assoc.is_aborted else
                        "no connection")
                continue
            try:
                for path in paths:
                    status = assoc.send_c_store(path)
                    code = getattr(status, "Status", None)
                    if code is None:
                        raise _SendError("no C-STORE response")
                    if code != STATUS_SUCCESS and not 0xB000 <= code <= 0xBFFF:
                        raise _SendError(f"C-STORE status 0x{code:04X} for {path.name}")
                    if code != STATUS_SUCCESS:
                        log.warning("%s: %s stored with warning status 0x%04X", work.describe(),
                                    path.name, code)
                assoc.release()
                return
            except (_SendError, OSError, ValueError, RuntimeError) as e:
                last = _one_line(e, 200)
                assoc.abort()
            except BaseException:
                assoc.abort()
                raise
        raise _StudyFailed("send", ExitCode.UNAVAILABLE,
                           f"the SEG could not be sent to {dest}: {last}")

    def _fail(self, work: _Work, stage: str, code: int, message: str) -> None:
        failure = {"stage": stage, "exit_code": int(code), "message": message,
                   "failed_utc": _utc_now()}
        dst = self.failed / work.path.name
        try:
            with signals_deferred():
                write_json_atomic(work.path / "failure.json", failure)
                os.replace(work.path, dst)
        except OSError as e:
            log.error("%s: could not be moved to failed/ (%s); it stays in work/", work.describe(), e)
            dst = work.path
        with self._lock:
            self.stats["studies_failed"] += 1
        log.error("%s failed at %s (exit %d): %s; kept in %s", work.describe(), stage, code,
                  _one_line(message), dst)

    # -- a previous run's leftovers ----------------------------------------------------
    def _recover(self) -> None:
        """Temporary files of interrupted writes are removed; incomplete studies in
        incoming/ wait a quiet period again; complete ones in work/ are queued (the
        storage lock says no other node writes here)."""
        now = time.monotonic()
        for folder in sorted(p for p in self.incoming.iterdir() if p.is_dir()):
            for tmp in folder.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
            names = {p.name for p in folder.glob("*.dcm")}
            if not names:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            uid, pid = _read_identity(folder / sorted(names)[0])
            a = _Arrivals(folder.name, uid, pid, _utc_now(), calling={"?"}, names=names,
                          last_utc=_utc_now(), last=now)
            self._arrivals[folder.name] = a
            log.info("incoming study %s (%d objects) left by a previous run: complete after the "
                     "quiet period", printable(uid), len(names))
        for path in sorted(self.work.iterdir()):
            if not path.is_dir():
                continue
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)   # a finished study being removed
                continue
            if not (path / "images").is_dir():
                shutil.rmtree(path, ignore_errors=True)   # sealing was cut short before the move
                continue
            try:
                identity = json.loads((path / "study.json").read_text())
            except (OSError, ValueError):
                identity = {"storage_key": path.name}
            work = _Work(path, identity)
            log.info("%s left by a previous run: queued", work.describe())
            self._queue.append(work)


class _SendError(Exception):
    pass


@contextlib.contextmanager
def _stage(stage: str):
    """Turns an error of one study's stage into _StudyFailed (exit code and one line)."""
    try:
        yield
    except _StudyFailed:
        raise
    except DeepreconError as e:
        raise _StudyFailed(stage, e.exit_code, " ".join(e.message.split())) from None
    except MemoryError:
        raise _StudyFailed(stage, ExitCode.OUT_OF_MEMORY,
                           "out of memory: the study is too large for this machine's memory") from None
    except Exception as e:  # noqa: BLE001 - one broken study must not stop the node
        log.debug("internal error at %s:\n%s", stage, traceback.format_exc())
        raise _StudyFailed(stage, ExitCode.INTERNAL,
                           f"internal error: {type(e).__name__}: {' '.join(str(e).split())}") from None


def _read_identity(path: Path) -> tuple[str, str]:
    """(StudyInstanceUID, PatientID) of a stored object, '?' where unreadable."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "PatientID"])
        return str(ds.get("StudyInstanceUID", "?")), str(ds.get("PatientID", "?"))
    except Exception:  # noqa: BLE001 - only for the log
        return "?", "?"


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(str(uid)).name
    return name if name and name != str(uid) else str(uid)


__all__ = ["DicomNode", "NodeConfig", "Destination", "TLSFiles", "PduGuard", "storage_key",
           "printable", "check_ae_title", "server_ssl_context", "client_ssl_context",
           "MR_IMAGE_STORAGE", "SEGMENTATION_STORAGE", "MAX_CONTROL_PDU"]
