"""The torch-free binding of the fused NCC + ROI-L2 loss (deeprecon.cpp_ext.numpy_ops, the
library _ncc_core through its C ABI) against the reference, on the same cases as the torch
op (tests/test_ncc_roi.py: CASES, same inputs, same tolerances), plus its argument checks,
its independence from torch (a subprocess with torch blocked), and a build of the library
by setup.py without torch.
"""
from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deeprecon.cpp_ext import KernelUnavailableError, ncc_roi_loss
from deeprecon.cpp_ext import numpy_ops, reference
from deeprecon.cpp_ext.numpy_ops import kernel_available, ncc_roi_loss_np
from test_ncc_roi import (AVAILABLE, CASE_IDS, CASES, assert_parity, kwargs_of,  # noqa: I001
                          make_inputs, reference64)

REPO = Path(__file__).resolve().parents[1]

needs_np_kernel = pytest.mark.skipif(
    not kernel_available(), reason="deeprecon.cpp_ext._ncc_core is not built (no C++ compiler "
                                   "at install time?)")
needs_cpu_kernel = pytest.mark.skipif(not AVAILABLE["cpu"],
                                      reason="deeprecon.cpp_ext._C (the torch op) is not built")
pytestmark = needs_np_kernel


def as_np(*tensors):
    return tuple(t.numpy() for t in tensors)


def run_np(x, y, roi, **kw):
    """(loss, grad) of the numpy binding on torch inputs, back as torch tensors."""
    loss, grad = ncc_roi_loss_np(*as_np(x, y, roi), **kw)
    return torch.from_numpy(loss), torch.from_numpy(grad)


# --- parity with the reference --------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_numpy_binding_matches_reference(case):
    x, y, roi = make_inputs(*case[:4], data=case[9])
    kw = kwargs_of(case)
    loss, grad = ncc_roi_loss_np(*as_np(x, y, roi), **kw)
    assert loss.shape == (case[0],) and grad.shape == tuple(x.shape)
    assert loss.dtype == grad.dtype == np.float32 and grad.flags.c_contiguous
    want_loss, want_grad = reference64(x, y, roi, **kw)
    assert_parity(torch.from_numpy(loss), want_loss, "loss")
    assert_parity(torch.from_numpy(grad), want_grad, "grad")


def test_numpy_binding_matches_reference_at_128():
    """The inversion's size: 128 x 128, both window modes."""
    x, y, roi = make_inputs(2, 128, 128, 2, data="smooth", seed=3)
    for kw in (dict(window=9), dict(window=9, mode="gaussian", sigma=2.0)):
        loss, grad = run_np(x, y, roi, **kw)
        want_loss, want_grad = reference64(x, y, roi, **kw)
        assert_parity(loss, want_loss, f"loss {kw}")
        assert_parity(grad, want_grad, f"grad {kw}")


@needs_cpu_kernel
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]],
                         ids=[CASE_IDS[0], CASE_IDS[2], CASE_IDS[3]])
def test_numpy_binding_is_the_torch_ops_core_bitwise(case):
    """One core behind both bindings: the same bits (same compiler, same code)."""
    x, y, roi = make_inputs(*case[:4], data=case[9])
    kw = kwargs_of(case)
    loss, grad = run_np(x, y, roi, **kw)
    want_loss, want_grad = ncc_roi_loss(x, y, roi, **kw)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)


def test_numpy_binding_is_deterministic_across_thread_counts():
    for B in (1, 5):  # rows in parallel (B < threads) or images in parallel
        x, y, roi = as_np(*make_inputs(B, 45, 38, 1, seed=6))
        runs = [ncc_roi_loss_np(x, y, roi, window=9, num_threads=t) for t in (1, 2, 3, 8)]
        for loss, grad in runs[1:]:
            np.testing.assert_array_equal(loss, runs[0][0])
            np.testing.assert_array_equal(grad, runs[0][1])


def test_empty_batch_and_constants():
    x = np.zeros((0, 1, 6, 7), np.float32)
    loss, grad = ncc_roi_loss_np(x, x, np.ones((1, 1, 6, 7), np.float32))
    assert loss.shape == (0,) and grad.shape == (0, 1, 6, 7)
    assert numpy_ops.MODES == reference.MODES
    assert numpy_ops.DEFAULT_SIGMA == reference.DEFAULT_SIGMA


# --- argument checks ------------------------------------------------------------------

def _good():
    x, y, roi = as_np(*make_inputs(2, 8, 9, 2))
    return dict(x=x, y=y, roi=roi, window=3, mode="box", sigma=1.5)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: {**a, "x": torch.from_numpy(a["x"])}, TypeError, "x must be a numpy.ndarray"),
    (lambda a: {**a, "roi": a["roi"].tolist()}, TypeError, "roi must be a numpy.ndarray"),
    (lambda a: {**a, "y": a["y"].astype(np.float64)}, ValueError, "y must be float32, got float64"),
    (lambda a: {**a, "x": a["x"].astype(">f4")}, ValueError, "x must be float32.*non-native"),
    (lambda a: {**a, "roi": a["roi"].astype(np.float16)}, ValueError, "roi must be float32"),
    (lambda a: {**a, "x": a["x"][:, 0]}, ValueError, r"x must have shape \[B, 1, H, W\]"),
    (lambda a: {**a, "x": np.concatenate([a["x"]] * 2, 1)}, ValueError,
     r"x must have shape \[B, 1, H, W\]"),
    (lambda a: {**a, "y": a["y"][:, :, :-1].copy()}, ValueError, "y must have the shape of x"),
    (lambda a: {**a, "roi": a["roi"][:, :, :, :-1].copy()}, ValueError, "roi must have shape"),
    (lambda a: {**a, "roi": np.ones((3, 1, 8, 9), np.float32)}, ValueError, "roi must have shape"),
    (lambda a: {**a, "x": np.ascontiguousarray(a["x"].transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)},
     ValueError, "x must be C-contiguous"),
    (lambda a: {**a, "y": np.ones((2, 1, 8, 18), np.float32)[..., ::2]}, ValueError,
     "y must be C-contiguous"),
    (lambda a: {**a, "x": np.zeros((2, 1, 0, 9), np.float32)}, ValueError, "H >= 1 and W >= 1"),
    (lambda a: {**a, "window": 4}, ValueError, "window must be a positive odd integer, got 4"),
    (lambda a: {**a, "window": 0}, ValueError, "window must be a positive odd integer"),
    (lambda a: {**a, "window": True}, ValueError, "window must be a positive odd integer"),
    (lambda a: {**a, "window": 3.0}, ValueError, "window must be a positive odd integer"),
    (lambda a: {**a, "mode": "gauss"}, ValueError, "mode must be one of"),
    (lambda a: {**a, "mode": "gaussian", "sigma": 0.0}, ValueError, "sigma must be finite and > 0"),
    (lambda a: {**a, "mode": "gaussian", "sigma": float("nan")}, ValueError, "sigma must be"),
    (lambda a: {**a, "num_threads": 0}, ValueError, "num_threads must be None or an integer"),
])
def test_bad_inputs_are_refused_naming_the_argument(change, exc, match):
    a = change(_good())
    with pytest.raises(exc, match=match):
        ncc_roi_loss_np(a.pop("x"), a.pop("y"), a.pop("roi"), **a)


def test_misaligned_array_is_refused():
    buf = np.zeros(2 * 8 * 9 * 4 + 1, np.uint8)
    x = buf[1:].view(np.float32).reshape(2, 1, 8, 9)  # C-contiguous, not aligned
    assert x.flags.c_contiguous and not x.flags.aligned
    a = _good()
    with pytest.raises(ValueError, match="x must be C-contiguous and aligned"):
        ncc_roi_loss_np(x, a["y"], a["roi"])


@pytest.mark.parametrize("args,match", [
    (dict(window=6), "window must be a positive odd integer, got 6"),
    (dict(mode=2), r"mode must be 0 \(box\) or 1 \(gaussian\)"),
    (dict(mode=1, sigma=-1.0), "sigma must be finite and > 0"),
    (dict(roi_batch=3), "roi must have shape"),
    (dict(H=0), "H >= 1 and W >= 1"),
    (dict(B=2 ** 40, roi_batch=1, H=2 ** 20, W=2 ** 20), "x is too large"),
])
def test_c_abi_checks_its_arguments(args, match):
    """The library's own checks (called directly, past the Python ones): rc 1 and a message."""
    lib = numpy_ops.load_library()
    x, y, roi = as_np(*make_inputs(2, 8, 9, 2))
    loss, grad = np.empty(2, np.float32), np.empty_like(x)
    a = dict(B=2, roi_batch=2, H=8, W=9, window=3, mode=0, sigma=1.5)
    a.update(args)
    fp = ctypes.POINTER(ctypes.c_float)
    err = ctypes.create_string_buffer(256)
    rc = lib.deeprecon_ncc_roi_loss(
        *(t.ctypes.data_as(fp) for t in (x, y, roi)), a["B"], a["roi_batch"], a["H"], a["W"],
        a["window"], a["mode"], a["sigma"], 1.0, 1.0, 1, loss.ctypes.data_as(fp),
        grad.ctypes.data_as(fp), err, len(err))
    assert rc == 1
    assert re.search(match, err.value.decode()), err.value.decode()


def test_missing_library_is_kernel_unavailable(monkeypatch):
    monkeypatch.setattr(numpy_ops, "_lib", [])
    monkeypatch.setattr(numpy_ops, "library_path", lambda: None)
    a = _good()
    with pytest.raises(KernelUnavailableError, match=r"_ncc_core\) was not built") as e:
        ncc_roi_loss_np(a["x"], a["y"], a["roi"])
    assert "torch is not needed" in e.value.hint
    assert not numpy_ops.kernel_available()


# --- without torch ----------------------------------------------------------------------

def _python(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, **kw)


NO_TORCH_RUN = """
import numpy as np
from deeprecon.cpp_ext.numpy_ops import ncc_roi_loss_np
import deeprecon.cpp_ext as c
assert c.ncc_roi_loss_np is ncc_roi_loss_np
rng = np.random.default_rng(0)
x, y = rng.random((2, 2, 1, 20, 23), dtype=np.float32)
roi = rng.random((1, 1, 20, 23), dtype=np.float32)
loss, grad = ncc_roi_loss_np(x, y, roi, window=5, mode="gaussian", sigma=1.2)
assert loss.shape == (2,) and grad.shape == (2, 1, 20, 23) and np.isfinite(grad).all()
try:
    c.ncc_roi_loss(x, y, roi)
except ImportError:
    pass  # the torch op needs torch
else:
    raise SystemExit("the torch op ran without torch")
"""


def test_numpy_binding_runs_with_torch_blocked():
    """sys.modules['torch'] = None, as on a machine without torch (any import of it fails)."""
    code = ("import sys\nsys.modules['torch'] = None\n" + NO_TORCH_RUN +
            "assert not [m for m in sys.modules if m.startswith('torch.')]\n"
            "assert sys.modules['torch'] is None\nprint('ok')\n")
    p = _python(code, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_numpy_binding_never_tries_to_import_torch():
    """A finder that records every attempt to import torch (and fails it): none is made
    by the numpy binding (the torch op's attempt, at the end, is the only one)."""
    code = (
        "import sys, importlib.abc\n"
        "tried = []\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            tried.append(name)\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n" +
        NO_TORCH_RUN.replace("try:\n    c.ncc_roi_loss", "assert not tried, tried\ntry:\n    "
                                                          "c.ncc_roi_loss") +
        "assert tried == ['torch'], tried\nprint('ok')\n")
    p = _python(code, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


@pytest.mark.slow
def test_setup_builds_the_library_without_torch(tmp_path):
    """setup.py run where torch cannot be imported: _ncc_core is built (linking no torch),
    _C is not, and the built package runs the numpy binding with torch blocked."""
    p = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                        "--", "setup.py", "pyproject.toml", "README.md", "cpp_ext"],
                       cwd=REPO, capture_output=True, timeout=60, check=True)
    src = tmp_path / "src"
    for rel in sorted(set(p.stdout.decode().split("\0")) - {""}):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((REPO / rel).read_bytes())
    lib = tmp_path / "lib"
    code = ("import sys\nsys.modules['torch'] = None\n"
            f"sys.argv = ['setup.py', '-q', 'build', '--build-lib', {str(lib)!r}, "
            f"'--build-temp', {str(tmp_path / 'tmp')!r}]\n"
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))\n")
    p = _python(code, cwd=src)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "the fused loss op (deeprecon.cpp_ext._C) is not built" in p.stderr
    built = sorted(x.name for x in (lib / "deeprecon" / "cpp_ext").iterdir())
    assert any(n.startswith("_ncc_core") and n.endswith(".so") for n in built), built
    assert not any(n.startswith("_C") for n in built), built
    so = next((lib / "deeprecon" / "cpp_ext").glob("_ncc_core*.so"))
    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True, timeout=60)
    if ldd.returncode == 0:
        assert "torch" not in ldd.stdout and "libc10" not in ldd.stdout
        assert "libpython" not in ldd.stdout
    code = (f"import sys\nsys.modules['torch'] = None\nsys.path.insert(0, {str(lib)!r})\n" +
            NO_TORCH_RUN +
            "from deeprecon.cpp_ext import numpy_ops\n"
            f"assert numpy_ops.__file__.startswith({str(lib)!r}), numpy_ops.__file__\n"
            f"assert str(numpy_ops.library_path()).startswith({str(lib)!r})\n"
            "print('ok')\n")
    p = _python(code, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"
