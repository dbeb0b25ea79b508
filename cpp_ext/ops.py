"""The fused NCC + ROI-L2 loss op: typed Python wrapper, fake kernel and autograd.

The op `torch.ops.deeprecon.ncc_roi_loss` is defined (one schema) and implemented by
the compiled library `deeprecon.cpp_ext._C` (CPU kernel, and CUDA kernel where it was
built). That library is built by `pip install`, never at import, and loaded on first
use: importing this module neither compiles nor loads anything. A kernel that is not
built is a `KernelUnavailableError` (deeprecon.cpp_ext.errors; the runtime maps it to
exit 69) naming what is missing; there is no silent fallback to the reference
(impl="ref" is the explicit way to run it). The kernel itself is a raw-pointer C++ core
shared with the torch-free binding `deeprecon.cpp_ext.numpy_ops`.
"""
from __future__ import annotations

import importlib
import threading

import torch

from .errors import KernelUnavailableError
from .reference import DEFAULT_SIGMA, MODES, loss_and_grad, ncc_roi_loss_reference

OP_NAME = "deeprecon::ncc_roi_loss"
IMPLS = ("auto", "ref", "cpu", "cuda")
MODE_CODES = {"box": 0, "gaussian": 1}
CUDA_MAX_WINDOW = 25  # shared-memory tiles of the CUDA kernel hold a radius of at most 12
_REINSTALL = ("install torch first, then reinstall deeprecon-rt from its source folder with "
              "`pip install --no-build-isolation -e .`")

_lock = threading.Lock()
_state = {"loaded": False, "registered": False}


def _op_defined() -> bool:
    return hasattr(torch.ops.deeprecon, "ncc_roi_loss")


def load_library() -> None:
    """Load the compiled kernels (`deeprecon.cpp_ext._C`) and register the op's fake
    kernel and autograd formula. Idempotent and thread-safe.

    Raises:
        KernelUnavailableError: the library was not built (torch absent at install time) or
            does not load (e.g. built against another torch).
    """
    if _state["loaded"]:
        return
    with _lock:
        if _state["loaded"]:
            return
        try:
            importlib.import_module("deeprecon.cpp_ext._C")
        except ModuleNotFoundError as e:
            if e.name != "deeprecon.cpp_ext._C":
                raise
            raise KernelUnavailableError(
                "the compiled kernels of deeprecon.cpp_ext (module _C) were not built: torch "
                "was not importable when the package was installed", hint=_REINSTALL) from e
        except ImportError as e:
            raise KernelUnavailableError(
                f"the compiled kernels of deeprecon.cpp_ext (module _C) do not load: {e}",
                hint="they were probably built against another torch; " + _REINSTALL) from e
        _register_python_parts()
        _state["loaded"] = True


def kernels_available() -> dict[str, bool]:
    """Which compiled kernels can run here: {"cpu": bool, "cuda": bool}. "cuda" is True
    only if the CUDA kernel was built and torch sees a CUDA device. Never raises."""
    try:
        load_library()
    except KernelUnavailableError:
        return {"cpu": False, "cuda": False}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {"cpu": has(OP_NAME, "CPU"),
            "cuda": has(OP_NAME, "CUDA") and torch.cuda.is_available()}


def _fake(x, y, roi, window, mode, sigma, lambda_roi, lambda_ncc):
    torch._check(x.dim() == 4 and x.shape[1] == 1,
                 lambda: f"ncc_roi_loss: x must have shape [B, 1, H, W], got {list(x.shape)}")
    torch._check(y.shape == x.shape,
                 lambda: f"ncc_roi_loss: y must have the shape of x {list(x.shape)}, "
                         f"got {list(y.shape)}")
    return x.new_empty((x.shape[0],)), torch.empty_like(y)  # loss [B], grad [B, 1, H, W]


def _setup_context(ctx, inputs, output):
    _, grad_y = output
    ctx.save_for_backward(grad_y)
    ctx.mark_non_differentiable(grad_y)


def _backward(ctx, grad_loss, _grad_of_grad_y):
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
        raise RuntimeError(
            "ncc_roi_loss: the op differentiates with respect to y only; x (the target "
            "image) and roi (the weight map) must not require grad: detach them")
    (grad_y,) = ctx.saved_tensors                      # [B, 1, H, W]
    grad_y = grad_loss.reshape(-1, 1, 1, 1) * grad_y   # [B] -> [B, 1, 1, 1] * [B, 1, H, W]
    return None, grad_y, None, None, None, None, None, None


def _register_python_parts() -> None:
    if _state["registered"]:
        return
    torch.library.register_fake(OP_NAME)(_fake)
    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
    _state["registered"] = True


# The library may have been loaded before this module (e.g. by torch.ops.load_library,
# which then imports this module through the schema's set_python_module).
if _op_defined():
    _register_python_parts()


def _check_args(x, y, roi, window, mode, sigma, impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"ncc_roi_loss: impl must be one of {IMPLS}, got {impl!r}")
    for name, t in (("x", x), ("y", y), ("roi", roi)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ncc_roi_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"ncc_roi_loss: x must have shape [B, 1, H, W], got {list(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"ncc_roi_loss: x must have H >= 1 and W >= 1, got {list(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"ncc_roi_loss: y must have the shape of x {list(x.shape)}, "
                         f"got {list(y.shape)}")
    if (roi.dim() != 4 or roi.shape[1] != 1 or roi.shape[2:] != x.shape[2:]
            or roi.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"ncc_roi_loss: roi must have shape [B, 1, H, W] or [1, 1, H, W] with "
                         f"B, H, W of x {list(x.shape)}, got {list(roi.shape)}")
    dtypes = (torch.float32, torch.float64) if impl == "ref" else (torch.float32,)
    for name, t in (("x", x), ("y", y), ("roi", roi)):
        if t.dtype not in dtypes:
            raise TypeError(f"ncc_roi_loss: {name} must be "
                            f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)}"
                            f"{' (float64 only with impl=ref)' if impl != 'ref' else ''}, "
                            f"got {str(t.dtype).removeprefix('torch.')}")
        if t.dtype != x.dtype:
            raise TypeError(f"ncc_roi_loss: {name} must have the dtype of x ({x.dtype}), "
                            f"got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"ncc_roi_loss: {name} must be on the device of x ({x.device}), "
                             f"got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"ncc_roi_loss: {name} must be contiguous (call .contiguous() on it)")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"ncc_roi_loss: window must be a positive odd integer, got {window!r}")
    if mode not in MODES:
        raise ValueError(f"ncc_roi_loss: mode must be one of {MODES}, got {mode!r}")
    if mode == "gaussian" and not (isinstance(sigma, (int, float)) and 0 < sigma < float("inf")):
        raise ValueError(f"ncc_roi_loss: sigma must be finite and > 0 for the gaussian window, "
                         f"got {sigma!r}")
    if torch.is_grad_enabled():
        for name, t in (("x", x), ("roi", roi)):
            if t.requires_grad:
                raise ValueError(
                    f"ncc_roi_loss: {name} requires grad, but the op differentiates with "
                    f"respect to y only (x is the target image, roi a weight map): pass "
                    f"{name}.detach()")


def ncc_roi_loss(x: torch.Tensor, y: torch.Tensor, roi: torch.Tensor, *, window: int = 9,
                 mode: str = "box", sigma: float = DEFAULT_SIGMA, lambda_roi: float = 1.0,
                 lambda_ncc: float = 1.0, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused local-NCC + ROI-L2 loss and its gradient with respect to y.

    Per image b, with local sums S over the k x k window centred at each pixel (zero
    padding; box weights 1 with n = k*k, or Gaussian weights exp(-d^2 / (2 sigma^2)),
    separable, radius k // 2, not normalised, n = sum of the 2D weights)::

        cross  = Sxy - Sx Sy / n,  varx = Sxx - Sx^2 / n,  vary = Syy - Sy^2 / n
        ncc_b  = mean over the H*W pixels of cross^2 / (varx vary + 1e-5)
        roi_b  = sum(roi (x - y)^2) / (sum(roi) + 1e-5)
        loss_b = lambda_roi * roi_b - lambda_ncc * ncc_b

    The specification is `deeprecon.cpp_ext.reference.ncc_roi_loss_reference`.

    Args:
        x: target images, float32 [B, 1, H, W], contiguous (never differentiated).
        y: generated images, float32 [B, 1, H, W], contiguous, on the device of x.
        roi: weights in [0, 1], float32 [B, 1, H, W] or [1, 1, H, W] (shared by all
            images), contiguous (never differentiated).
        window: odd window size k (default 9). The CUDA kernel takes k <= 25.
        mode: "box" or "gaussian".
        sigma: the Gaussian's standard deviation in pixels (default 1.5; ignored for box).
        lambda_roi, lambda_ncc: weights of the two terms.
        impl: "auto" (the compiled kernel for the tensors' device), "cpu", "cuda", or
            "ref" (the pure-PyTorch reference by autograd; also takes float64).

    Returns:
        (loss [B], grad [B, 1, H, W]) with grad[b] = d loss_b / d y[b]. loss is
        differentiable with respect to y through autograd (backward uses grad; there is
        no double backward). grad is not differentiable.

    Raises:
        ValueError / TypeError: a bad argument (named in the message), or x / roi
            requiring grad (the op gives the gradient with respect to y only).
        KernelUnavailableError: the compiled kernel for the device is not built (the
            runtime's exit 69); nothing falls back to the reference.
    """
    _check_args(x, y, roi, window, mode, sigma, impl)
    if impl == "ref":
        return loss_and_grad(ncc_roi_loss_reference, x, y, roi, window=window, mode=mode,
                             sigma=sigma, lambda_roi=lambda_roi, lambda_ncc=lambda_ncc)
    kernel = x.device.type if impl == "auto" else impl
    if kernel != x.device.type:
        raise ValueError(f"ncc_roi_loss: impl={impl!r} needs x, y and roi on a {kernel} "
                         f"device, got {x.device}")
    if kernel not in ("cpu", "cuda"):
        raise KernelUnavailableError(
            f"ncc_roi_loss has no compiled kernel for device type {kernel!r} (only cpu and "
            f"cuda)", hint="impl='ref' runs the pure-PyTorch reference on any device")
    load_library()
    if kernel == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA"):
            raise KernelUnavailableError(
                "the CUDA kernel of deeprecon.cpp_ext was not built: torch had no CUDA or "
                "nvcc was missing at install time (or DEEPRECON_NO_CUDA=1 was set)",
                hint="on a machine with a CUDA build of torch and the CUDA toolkit (nvcc, "
                     "CUDA_HOME), reinstall with `pip install --no-build-isolation -e .`")
        if window > CUDA_MAX_WINDOW:
            raise ValueError(f"ncc_roi_loss: window must be <= {CUDA_MAX_WINDOW} for the CUDA "
                             f"kernel, got {window}")
    return torch.ops.deeprecon.ncc_roi_loss(x, y, roi, window, MODE_CODES[mode], float(sigma),
                                            float(lambda_roi), float(lambda_ncc))


__all__ = ["ncc_roi_loss", "load_library", "kernels_available", "KernelUnavailableError",
           "OP_NAME", "IMPLS", "CUDA_MAX_WINDOW"]
