"""deeprecon.cpp_ext: the fused NCC + ROI-L2 loss op.

    from deeprecon.cpp_ext import ncc_roi_loss
    loss, grad = ncc_roi_loss(x, y, roi, window=9)   # [B], [B, 1, H, W] = d loss_b / d y

- `ncc_roi_loss`: the op (compiled CPU / CUDA kernels, or impl="ref"); see its docstring.
- `ncc_roi_loss_np`: the same kernel on numpy arrays, without torch (`numpy_ops`).
- `ncc_roi_loss_reference`: the pure-PyTorch specification (loss [B], by autograd).
- `ncc_roi_loss_grouped_conv`: the same loss with one grouped convolution.
- `load_library`, `kernels_available`: load / query the compiled kernels of the op.
- `KernelUnavailableError`: a compiled kernel is not built or does not load (the
  runtime maps it to exit 69; cpp_ext imports nothing from deeprecon.runtime).

Importing this package imports neither torch nor the compiled libraries: the names
above are resolved on first access, and the libraries (`_C`, the torch op; `_ncc_core`,
the torch-free one; built by `pip install`, never at import) are loaded on the first
call that needs them.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ncc_roi_loss": "ops",
    "load_library": "ops",
    "kernels_available": "ops",
    "ncc_roi_loss_np": "numpy_ops",
    "KernelUnavailableError": "errors",
    "ncc_roi_loss_reference": "reference",
    "ncc_roi_loss_grouped_conv": "reference",
    "window_taps": "reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
