"""The fused NCC + ROI-L2 loss on numpy arrays, without torch.

    from deeprecon.cpp_ext.numpy_ops import ncc_roi_loss_np
    loss, grad = ncc_roi_loss_np(x, y, roi, window=9)   # [B], [B, 1, H, W] = d loss_b / d y

The same raw-pointer C++ core as the torch op `deeprecon.cpp_ext.ncc_roi_loss` (same
formulas, same double accumulation, bitwise the same results), reached through the C ABI
of the library `deeprecon.cpp_ext._ncc_core` with ctypes. That library links neither
libtorch nor Python and is built by `pip install` whether torch is installed or not;
importing this module imports neither torch nor the library (it is loaded on first
use). The GIL is released while the kernel runs (ctypes), which is parallel over images
(or over rows, for few images) on OpenMP threads.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import threading
from pathlib import Path

import numpy as np

from .errors import KernelUnavailableError

MODES = ("box", "gaussian")  # the same as deeprecon.cpp_ext.reference.MODES
MODE_CODES = {"box": 0, "gaussian": 1}
DEFAULT_SIGMA = 1.5  # deeprecon.cpp_ext.reference.DEFAULT_SIGMA
ABI_VERSION = 1  # DEEPRECON_NCC_ABI_VERSION of cpp_ext/csrc/capi/ncc_core_capi.h
LIBRARY = "deeprecon.cpp_ext._ncc_core"
_REINSTALL = ("reinstall deeprecon-rt from its source folder with a C++ compiler present "
              "(`pip install --no-build-isolation -e .`); torch is not needed for it")
_ERR_LEN = 512

_lock = threading.Lock()
_lib: list = []  # [the loaded ctypes.CDLL], once loaded


def library_path() -> Path | None:
    """Where the compiled library `_ncc_core` is (next to this module, any of the
    interpreter's extension suffixes), or None when it was not built."""
    spec = importlib.util.find_spec(LIBRARY)
    if spec is not None and spec.origin and Path(spec.origin).is_file():
        return Path(spec.origin)
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"_ncc_core{suffix}").is_file():
            return here / f"_ncc_core{suffix}"
    return None


def load_library() -> ctypes.CDLL:
    """Load `_ncc_core` (once; thread-safe) and declare its C functions.

    Raises:
        KernelUnavailableError: the library was not built, does not load, or was built
            from other sources (another ABI version).
    """
    if _lib:
        return _lib[0]
    with _lock:
        if _lib:
            return _lib[0]
        path = library_path()
        if path is None:
            raise KernelUnavailableError(
                "the torch-free kernel library of deeprecon.cpp_ext (_ncc_core) was not "
                "built: no C++ compiler worked when the package was installed", hint=_REINSTALL)
        try:
            lib = ctypes.CDLL(str(path))
            version = lib.deeprecon_ncc_abi_version
        except (OSError, AttributeError) as e:
            raise KernelUnavailableError(
                f"the torch-free kernel library of deeprecon.cpp_ext does not load: {e}",
                hint=_REINSTALL) from e
        version.argtypes, version.restype = [], ctypes.c_int
        if version() != ABI_VERSION:
            raise KernelUnavailableError(
                f"the torch-free kernel library {path.name} has ABI version {version()}, "
                f"this package expects {ABI_VERSION}: it was built from other sources",
                hint=_REINSTALL)
        fp, i64, d = ctypes.POINTER(ctypes.c_float), ctypes.c_int64, ctypes.c_double
        fn = lib.deeprecon_ncc_roi_loss
        fn.argtypes = [fp, fp, fp, i64, i64, i64, i64, i64, i64, d, d, d, ctypes.c_int, fp, fp,
                       ctypes.c_char_p, i64]
        fn.restype = ctypes.c_int
        lib.deeprecon_ncc_has_openmp.argtypes, lib.deeprecon_ncc_has_openmp.restype = [], ctypes.c_int
        _lib.append(lib)
        return lib


def kernel_available() -> bool:
    """Whether the torch-free kernel library loads here. Never raises."""
    try:
        load_library()
    except KernelUnavailableError:
        return False
    return True


def _check_array(name: str, a, shape_what: str) -> None:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"ncc_roi_loss_np: {name} must be a numpy.ndarray, got "
                        f"{type(a).__name__}")
    if a.dtype != np.float32:  # also refuses non-native byte order
        raise ValueError(f"ncc_roi_loss_np: {name} must be float32, got {a.dtype.name}"
                         f"{'' if a.dtype.isnative else ' in non-native byte order'}")
    if a.ndim != 4 or a.shape[1] != 1:
        raise ValueError(f"ncc_roi_loss_np: {name} must have shape {shape_what}, got "
                         f"{list(a.shape)}")
    if not (a.flags.c_contiguous and a.flags.aligned):
        raise ValueError(f"ncc_roi_loss_np: {name} must be C-contiguous and aligned "
                         f"(np.ascontiguousarray({name}))")


def _check_args(x, y, roi, window, mode, sigma, num_threads) -> None:
    _check_array("x", x, "[B, 1, H, W]")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"ncc_roi_loss_np: x must have H >= 1 and W >= 1, got {list(x.shape)}")
    _check_array("y", y, f"[B, 1, H, W] = {list(x.shape)} (the shape of x)")
    if y.shape != x.shape:
        raise ValueError(f"ncc_roi_loss_np: y must have the shape of x {list(x.shape)}, got "
                         f"{list(y.shape)}")
    what = f"[B, 1, H, W] or [1, 1, H, W] with B, H, W of x {list(x.shape)}"
    _check_array("roi", roi, what)
    if roi.shape[2:] != x.shape[2:] or roi.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"ncc_roi_loss_np: roi must have shape {what}, got {list(roi.shape)}")
    if (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1
            or window % 2 == 0):
        raise ValueError(f"ncc_roi_loss_np: window must be a positive odd integer, got {window!r}")
    if mode not in MODES:
        raise ValueError(f"ncc_roi_loss_np: mode must be one of {MODES}, got {mode!r}")
    if mode == "gaussian" and not (isinstance(sigma, (int, float, np.floating))
                                   and 0 < float(sigma) < float("inf")):
        raise ValueError(f"ncc_roi_loss_np: sigma must be finite and > 0 for the gaussian "
                         f"window, got {sigma!r}")
    if num_threads is not None and (isinstance(num_threads, bool)
                                    or not isinstance(num_threads, (int, np.integer))
                                    or num_threads < 1):
        raise ValueError(f"ncc_roi_loss_np: num_threads must be None or an integer >= 1, got "
                         f"{num_threads!r}")


def ncc_roi_loss_np(x: np.ndarray, y: np.ndarray, roi: np.ndarray, *, window: int = 9,
                    mode: str = "box", sigma: float = DEFAULT_SIGMA, lambda_roi: float = 1.0,
                    lambda_ncc: float = 1.0,
                    num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fused local-NCC + ROI-L2 loss and its gradient with respect to y, on numpy arrays.

    The loss of `deeprecon.cpp_ext.ncc_roi_loss` (see its docstring; the specification is
    `deeprecon.cpp_ext.reference.ncc_roi_loss_reference`), per image b::

        loss_b = lambda_roi * sum(roi (x - y)^2) / (sum(roi) + 1e-5)
                 - lambda_ncc * mean over pixels of cross^2 / (varx vary + 1e-5)

    Args:
        x: target images, float32 [B, 1, H, W], C-contiguous.
        y: generated images, float32 [B, 1, H, W], C-contiguous.
        roi: weights in [0, 1], float32 [B, 1, H, W] or [1, 1, H, W] (shared by all
            images), C-contiguous.
        window: odd window size k (default 9).
        mode: "box" or "gaussian".
        sigma: the Gaussian's standard deviation in pixels (default 1.5; ignored for box).
        lambda_roi, lambda_ncc: weights of the two terms.
        num_threads: OpenMP threads (default: OpenMP's, i.e. OMP_NUM_THREADS or the number
            of cores). The results are bitwise the same for any number.

    Returns:
        (loss float32 [B], grad float32 [B, 1, H, W]) with grad[b] = d loss_b / d y[b]:
        new arrays.

    Raises:
        TypeError: x, y or roi is not a numpy array.
        ValueError: a bad dtype, shape, layout or argument (named in the message); no
            array is converted or copied silently.
        KernelUnavailableError: the library `_ncc_core` was not built or does not load.
    """
    _check_args(x, y, roi, window, mode, sigma, num_threads)
    lib = load_library()
    B, _, H, W = x.shape
    loss = np.empty((B,), dtype=np.float32)          # [B]
    grad = np.empty((B, 1, H, W), dtype=np.float32)  # [B, 1, H, W]
    if B == 0:
        return loss, grad
    fp = ctypes.POINTER(ctypes.c_float)
    ptr = lambda a: a.ctypes.data_as(fp)  # noqa: E731
    err = ctypes.create_string_buffer(_ERR_LEN)
    rc = lib.deeprecon_ncc_roi_loss(
        ptr(x), ptr(y), ptr(roi), B, roi.shape[0], H, W, int(window), MODE_CODES[mode],
        float(sigma), float(lambda_roi), float(lambda_ncc), int(num_threads or 0), ptr(loss),
        ptr(grad), err, _ERR_LEN)
    if rc == 1:  # DEEPRECON_NCC_EINVAL: the Python checks above should have caught it
        raise ValueError(err.value.decode(errors="replace"))
    if rc != 0:
        message = err.value.decode(errors="replace")
        if "out of memory" in message:
            raise MemoryError(message)
        raise RuntimeError(message)
    return loss, grad


__all__ = ["ncc_roi_loss_np", "load_library", "kernel_available", "library_path", "MODES",
           "MODE_CODES", "DEFAULT_SIGMA"]
