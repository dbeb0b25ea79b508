"""deeprecon.cpp_ext: the fused NCC + ROI-L2 loss op.

    from deeprecon.cpp_ext import ncc_roi_loss
    loss, grad = ncc_roi_loss(x, y, roi, window=9)   # [B], [B, 1, H, W] = d loss_b / d y

- `ncc_roi_loss`: the op (compiled CPU / CUDA kernels, or impl="ref"); see its docstring.
- `ncc_roi_loss_reference`: the pure-PyTorch specification (loss [B], by autograd).
- `ncc_roi_loss_grouped_conv`: the same loss with one grouped convolution.
- `load_library`, `kernels_available`: load / query the compiled kernels.

Importing this package imports neither torch nor the compiled library: the names
above are resolved on first access, and the library `_C` (built by `pip install`,
never at import) is loaded on the first call that needs it.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ncc_roi_loss": "ops",
    "load_library": "ops",
    "kernels_available": "ops",
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
