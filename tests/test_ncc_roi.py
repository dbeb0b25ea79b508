"""The fused NCC + ROI-L2 loss op (deeprecon.cpp_ext): kernels against the reference.

Tolerances: the kernels' fp32 outputs are compared with the reference evaluated in
float64 on the same (fp32-valued) inputs, the specification, with rtol 1e-4 relative to
the largest magnitude (atol = 1e-4 * max |reference|, rtol = 1e-4 elementwise), which
also bounds max-abs errors; scale and offset errors fail it.

The CUDA kernel is checked three ways: its device code runs on the CPU through an
emulator (every block, phase by phase, shared memory poisoned with NaN) against the
reference; ncc_roi_cuda.cu is compiled by nvcc where nvcc is present; and the same
parity, autograd and opcheck tests run on a CUDA device where one is present (skipped
otherwise, with the reason).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deeprecon.cpp_ext import (KernelUnavailableError, kernels_available, ncc_roi_loss,
                               ncc_roi_loss_grouped_conv, ncc_roi_loss_reference)
from deeprecon.cpp_ext.reference import loss_and_grad
from deeprecon.runtime.errors import ExitCode, exit_code_of

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "cpp_ext" / "csrc"
RTOL = 1e-4

AVAILABLE = kernels_available()
needs_cpu_kernel = pytest.mark.skipif(
    not AVAILABLE["cpu"], reason="deeprecon.cpp_ext._C is not built (torch absent at install?)")
CUDA_SKIP = ("no CUDA device: torch.cuda.is_available() is False" if not torch.cuda.is_available()
             else "a CUDA device is present but the CUDA kernel of deeprecon.cpp_ext was not "
                  "built (torch without CUDA or no nvcc at install time)")
needs_cuda_kernel = pytest.mark.skipif(not AVAILABLE["cuda"], reason=CUDA_SKIP)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda_kernel)]

# (B, H, W, roi batch, window, mode, sigma, lambda_roi, lambda_ncc, data)
# The CUDA tiles are 16 x 32 centres: most H and W below are not multiples of them.
CASES = [
    (1, 37, 53, 1, 9, "box", 1.5, 1.0, 1.0, "uniform"),        # B = 1, non-square
    (64, 12, 20, 1, 9, "box", 1.5, 1.0, 1.0, "uniform"),       # B = 64, roi broadcast
    (64, 9, 14, 64, 5, "gaussian", 1.2, 0.5, 2.0, "uniform"),  # B = 64, per-image roi
    (3, 33, 47, 3, 9, "gaussian", 1.5, 1.0, 1.0, "smooth"),    # smooth, offset images
    (2, 48, 64, 1, 9, "box", 1.5, 2.0, 0.5, "smooth"),         # H, W multiples of the tile
    (2, 70, 45, 2, 25, "box", 1.5, 1.0, 1.0, "uniform"),       # largest CUDA window
    (2, 5, 7, 2, 9, "box", 1.5, 1.0, 1.0, "uniform"),          # window larger than image
    (4, 16, 17, 4, 1, "box", 1.5, 1.0, 1.0, "uniform"),        # 1 x 1 window: cc = 0
    (2, 31, 29, 1, 3, "gaussian", 0.8, 1.0, 3.0, "smooth"),
]
CASE_IDS = [f"B{c[0]}-{c[1]}x{c[2]}-roi{c[3]}-{c[5]}{c[4]}-{c[9]}" for c in CASES]


def make_inputs(B, H, W, roi_b, data="uniform", seed=0, device="cpu"):
    """x, y float32 [B, 1, H, W] and roi float32 [roi_b, 1, H, W] in [0, 1].

    "uniform": independent U(0, 1) pixels; "smooth": blurred images around 0.5 with
    small local variance (MR-like, the case where float sums cancel), y a noisy copy."""
    g = torch.Generator().manual_seed(seed)
    if data == "uniform":
        x = torch.rand(B, 1, H, W, generator=g)
        y = torch.rand(B, 1, H, W, generator=g)
    else:
        base = torch.nn.functional.avg_pool2d(torch.rand(B, 1, H + 4, W + 4, generator=g), 5,
                                              stride=1)  # [B, 1, H, W]
        x = 0.5 + 0.2 * (base - 0.5)
        y = x + 0.01 * torch.randn(B, 1, H, W, generator=g)
    roi = torch.rand(roi_b, 1, H, W, generator=g)
    return x.to(device), y.to(device), roi.to(device)


def reference64(x, y, roi, **kw):
    """The specification: (loss [B], grad [B, 1, H, W]) in float64 by autograd."""
    return loss_and_grad(ncc_roi_loss_reference, x.double(), y.double(), roi.double(), **kw)


def assert_parity(got, want, what):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), what
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * scale,
                               msg=lambda m: f"{what}: {m}")
    assert (got - want).abs().max().item() <= 2 * RTOL * scale, what


def kwargs_of(case):
    _, _, _, _, window, mode, sigma, lr, ln, _ = case
    return dict(window=window, mode=mode, sigma=sigma, lambda_roi=lr, lambda_ncc=ln)


@pytest.fixture
def one_thread():
    """Hundreds of tiny ops: on a loaded 2-core machine OpenMP barriers make them ~20x
    slower with 2 threads than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the reference itself -------------------------------------------------------------

@pytest.mark.parametrize("mode,window,sigma", [("box", 3, 1.5), ("box", 5, 1.5),
                                               ("gaussian", 5, 1.1)])
def test_reference_gradcheck_float64(mode, window, sigma, one_thread):
    x, y, roi = (t.double() for t in make_inputs(2, 6, 7, 1, seed=1))
    y.requires_grad_(True)

    def fn(y_):
        return ncc_roi_loss_reference(x, y_, roi, window=window, mode=mode, sigma=sigma,
                                      lambda_roi=0.7, lambda_ncc=1.3)

    assert torch.autograd.gradcheck(fn, (y,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_reference_matches_a_direct_evaluation():
    """The reference against a loop over pixels (numpy-free, float64): the formula."""
    x, y, roi = (t.double() for t in make_inputs(1, 5, 6, 1, seed=2))
    k, r, n, eps = 3, 1, 9.0, 1e-5
    xp = torch.nn.functional.pad(x[0, 0], (r, r, r, r))
    yp = torch.nn.functional.pad(y[0, 0], (r, r, r, r))
    cc = 0.0
    for i in range(5):
        for j in range(6):
            a, b = xp[i:i + k, j:j + k], yp[i:i + k, j:j + k]
            cross = (a * b).sum() - a.sum() * b.sum() / n
            vx, vy = (a * a).sum() - a.sum() ** 2 / n, (b * b).sum() - b.sum() ** 2 / n
            cc += cross ** 2 / (vx * vy + eps)
    roi_l2 = (roi * (x - y) ** 2).sum() / (roi.sum() + eps)
    want = 0.5 * roi_l2 - 2.0 * cc / 30
    got = ncc_roi_loss_reference(x, y, roi, window=3, lambda_roi=0.5, lambda_ncc=2.0)
    assert abs(got.item() - want.item()) < 1e-12


@pytest.mark.parametrize("case", CASES[:5], ids=CASE_IDS[:5])
def test_grouped_conv_formulation_matches_reference(case):
    x, y, roi = make_inputs(*case[:4], data=case[9])
    kw = kwargs_of(case)
    loss, grad = loss_and_grad(ncc_roi_loss_grouped_conv, x.double(), y.double(), roi.double(),
                               **kw)
    want_loss, want_grad = reference64(x, y, roi, **kw)
    assert_parity(loss, want_loss, "loss")
    assert_parity(grad, want_grad, "grad")


# --- the compiled kernels against the reference ---------------------------------------

@needs_cpu_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_matches_reference(case, device):
    x, y, roi = make_inputs(*case[:4], data=case[9], device=device)
    kw = kwargs_of(case)
    loss, grad = ncc_roi_loss(x, y, roi, impl=device, **kw)
    assert loss.shape == (case[0],) and grad.shape == x.shape
    assert loss.dtype == grad.dtype == torch.float32 and grad.device == x.device
    want_loss, want_grad = reference64(x.cpu(), y.cpu(), roi.cpu(), **kw)
    assert_parity(loss, want_loss, "loss")
    assert_parity(grad, want_grad, "grad")


@needs_cpu_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_matches_reference_at_128(device):
    """The inversion's size: 128 x 128, both window modes."""
    x, y, roi = make_inputs(2, 128, 128, 2, data="smooth", seed=3, device=device)
    for kw in (dict(window=9), dict(window=9, mode="gaussian", sigma=2.0)):
        loss, grad = ncc_roi_loss(x, y, roi, **kw)
        want_loss, want_grad = reference64(x.cpu(), y.cpu(), roi.cpu(), **kw)
        assert_parity(loss, want_loss, f"loss {kw}")
        assert_parity(grad, want_grad, f"grad {kw}")


@needs_cpu_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["box", "gaussian"])
def test_kernel_gradient_against_finite_differences(mode, device):
    """<grad, v> against the central difference of the kernel's own loss along a random
    direction v (the loss is accumulated in double: fp32 rounding stays far below h)."""
    x, y, roi = make_inputs(3, 20, 23, 3, seed=4, device=device)
    kw = dict(window=7, mode=mode, sigma=1.5, lambda_roi=1.0, lambda_ncc=1.0)
    _, grad = ncc_roi_loss(x, y, roi, **kw)
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(device)
    h = 1e-2
    y_plus, y_minus = y + h * v, y - h * v
    step = (y_plus - y_minus).double()  # the perturbation really applied, in fp32
    fd = (ncc_roi_loss(x, y_plus, roi, **kw)[0].double()
          - ncc_roi_loss(x, y_minus, roi, **kw)[0].double())          # [B]
    analytic = (grad.double() * step).sum(dim=(1, 2, 3))               # [B]
    torch.testing.assert_close(fd.cpu(), analytic.cpu(), rtol=2e-3, atol=1e-6)


@needs_cpu_kernel
def test_cpu_kernel_is_deterministic_across_thread_counts():
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 8):
            torch.set_num_threads(threads)
            for B in (1, 5):  # rows in parallel (B < threads) or images in parallel
                x, y, roi = make_inputs(B, 45, 38, 1, seed=6)
                results.append((threads, B, ncc_roi_loss(x, y, roi, window=9)))
    finally:
        torch.set_num_threads(before)
    for B in (1, 5):
        runs = [(loss, grad) for _, b, (loss, grad) in results if b == B]
        for loss, grad in runs[1:]:
            assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


# --- autograd, the op's registrations, torch.compile / torch.export -------------------

@needs_cpu_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_autograd_uses_the_fused_gradient(device):
    x, y, roi = make_inputs(3, 14, 19, 1, seed=7, device=device)
    y.requires_grad_(True)
    loss, grad = ncc_roi_loss(x, y, roi, window=5)
    assert loss.requires_grad and not grad.requires_grad
    w = torch.tensor([0.5, -1.0, 2.0], device=device)
    (w * loss).sum().backward()
    torch.testing.assert_close(y.grad, w.view(-1, 1, 1, 1) * grad, rtol=0, atol=0)
    # and the same as autograd through the reference
    y_ref = y.detach().double().requires_grad_(True)
    ref_loss = ncc_roi_loss_reference(x.double(), y_ref, roi.double(), window=5)  # [B]
    (w.double() * ref_loss).sum().backward()
    assert_parity(y.grad, y_ref.grad, "y.grad")


@needs_cpu_kernel
def test_gradient_only_with_respect_to_y():
    x, y, roi = make_inputs(2, 10, 11, 1, seed=8)
    with pytest.raises(ValueError, match="x requires grad"):
        ncc_roi_loss(x.requires_grad_(True), y, roi)
    with pytest.raises(ValueError, match="roi requires grad"):
        ncc_roi_loss(x.detach(), y, roi.requires_grad_(True), impl="ref")
    with torch.no_grad():  # no graph: nothing to refuse
        ncc_roi_loss(x, y, roi)
    # the raw op: refuses in backward rather than leaving x.grad silently None
    loss, _ = torch.ops.deeprecon.ncc_roi_loss(x, y.requires_grad_(True), roi.detach(),
                                               9, 0, 1.5, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="with respect to y only"):
        loss.sum().backward()


@needs_cpu_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode_code,roi_b,requires_grad", [(0, 1, True), (1, 2, True),
                                                           (0, 2, False)])
def test_opcheck(mode_code, roi_b, requires_grad, device):
    x, y, roi = make_inputs(2, 9, 12, roi_b, seed=9, device=device)
    y.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.deeprecon.ncc_roi_loss.default,
                          (x, y, roi, 5, mode_code, 1.3, 0.8, 1.7))


@needs_cpu_kernel
def test_torch_compile_and_export_see_the_op():
    x, y, roi = make_inputs(2, 12, 13, 1, seed=10)
    want_loss, want_grad = ncc_roi_loss(x, y, roi, window=5)

    compiled = torch.compile(lambda a, b, c: ncc_roi_loss(a, b, c, window=5)[0].sum(),
                             backend="aot_eager", fullgraph=True)
    y_ = y.clone().requires_grad_(True)
    compiled(x, y_, roi).backward()
    torch.testing.assert_close(y_.grad, want_grad, rtol=0, atol=0)

    class Loss(torch.nn.Module):
        def forward(self, a, b, c):
            return ncc_roi_loss(a, b, c, window=5)

    ep = torch.export.export(Loss(), (x, y, roi))
    assert "deeprecon.ncc_roi_loss" in str(ep.graph)
    loss, grad = ep.module()(x, y, roi)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)


@needs_cuda_kernel
def test_cuda_kernel_runs_on_the_current_stream():
    x, y, roi = make_inputs(4, 40, 70, 1, seed=11, device="cuda")
    want = ncc_roi_loss(x, y, roi)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ncc_roi_loss(x, y, roi)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_cuda_kernel
def test_cuda_kernel_matches_cpu_kernel_at_b500():
    x, y, roi = make_inputs(500, 128, 128, 1, data="smooth", seed=12)
    loss_c, grad_c = ncc_roi_loss(x, y, roi)
    loss_g, grad_g = ncc_roi_loss(x.cuda(), y.cuda(), roi.cuda())
    assert_parity(loss_g, loss_c, "loss")
    assert_parity(grad_g, grad_c, "grad")


# --- argument checks, availability ----------------------------------------------------

@needs_cpu_kernel
@pytest.mark.parametrize("change,exc,match", [
    (lambda a: {**a, "x": a["x"][:, 0]}, ValueError, r"x must have shape \[B, 1, H, W\]"),
    (lambda a: {**a, "y": a["y"][:, :, :-1]}, ValueError, "y must have the shape of x"),
    (lambda a: {**a, "roi": a["roi"][:, :, :, :-1]}, ValueError, "roi must have shape"),
    (lambda a: {**a, "roi": torch.rand(3, 1, 8, 9)}, ValueError, "roi must have shape"),
    (lambda a: {**a, "y": a["y"].double()}, TypeError, "y must be float32"),
    (lambda a: {**a, "roi": a["roi"].half()}, TypeError, "roi must be float32"),
    (lambda a: {**a, "x": a["x"].transpose(2, 3).contiguous().transpose(2, 3)}, ValueError,
     "x must be contiguous"),
    (lambda a: {**a, "window": 4}, ValueError, "window must be a positive odd integer"),
    (lambda a: {**a, "window": 0}, ValueError, "window must be a positive odd integer"),
    (lambda a: {**a, "mode": "gauss"}, ValueError, "mode must be one of"),
    (lambda a: {**a, "mode": "gaussian", "sigma": 0.0}, ValueError, "sigma must be"),
    (lambda a: {**a, "impl": "fast"}, ValueError, "impl must be one of"),
    (lambda a: {**a, "impl": "cuda"}, ValueError, "impl='cuda' needs x, y and roi on a cuda"),
])
def test_python_argument_checks_name_the_argument(change, exc, match):
    x, y, roi = make_inputs(2, 8, 9, 2)
    args = change(dict(x=x, y=y, roi=roi, window=3, mode="box", sigma=1.5, impl="auto"))
    with pytest.raises(exc, match=match):
        ncc_roi_loss(args.pop("x"), args.pop("y"), args.pop("roi"), **args)


@needs_cpu_kernel
@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "x": a["x"][:, 0]}, r"x must have shape \[B, 1, H, W\]"),
    (lambda a: {**a, "y": a["y"][:1]}, "y must have the shape of x"),
    (lambda a: {**a, "roi": a["roi"][:, :, 1:]}, "roi must have shape"),
    (lambda a: {**a, "y": a["y"].double()}, "y must be float32"),
    (lambda a: {**a, "roi": a["roi"].transpose(2, 3).contiguous().transpose(2, 3)},
     "roi must be contiguous"),
    (lambda a: {**a, "window": 6}, "window must be a positive odd integer, got 6"),
    (lambda a: {**a, "mode": 2}, r"mode must be 0 \(box\) or 1 \(gaussian\)"),
    (lambda a: {**a, "mode": 1, "sigma": -1.0}, "sigma must be finite and > 0"),
])
def test_kernel_argument_checks_name_the_argument(change, match):
    """The TORCH_CHECKs at the kernel boundary (the op called directly)."""
    x, y, roi = make_inputs(2, 8, 9, 2)
    a = change(dict(x=x, y=y, roi=roi, window=3, mode=0, sigma=1.5))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        torch.ops.deeprecon.ncc_roi_loss(a["x"], a["y"], a["roi"], a["window"], a["mode"],
                                         a["sigma"], 1.0, 1.0)


def test_reference_impl_takes_float64_and_gives_autograd_results():
    x, y, roi = (t.double() for t in make_inputs(2, 10, 12, 1, seed=13))
    loss, grad = ncc_roi_loss(x, y, roi, window=5, impl="ref")
    want_loss, want_grad = reference64(x, y, roi, window=5)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)


def test_no_kernel_for_other_devices_is_unavailable_not_a_fallback():
    x, y, roi = (t.to("meta") for t in make_inputs(1, 8, 8, 1))
    with pytest.raises(KernelUnavailableError,
                       match="no compiled kernel for device type 'meta'") as e:
        ncc_roi_loss(x, y, roi)
    assert exit_code_of(e.value) == ExitCode.UNAVAILABLE


@pytest.mark.skipif(not (torch.cuda.is_available() and not AVAILABLE["cuda"]),
                    reason="needs a CUDA device and a build without the CUDA kernel")
def test_cuda_kernel_not_built_is_unavailable():
    x, y, roi = make_inputs(1, 8, 8, 1, device="cuda")
    with pytest.raises(KernelUnavailableError,
                       match="CUDA kernel of deeprecon.cpp_ext was not built") as e:
        ncc_roi_loss(x, y, roi)
    assert exit_code_of(e.value) == ExitCode.UNAVAILABLE


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd="/")


def test_import_is_lazy_and_compiles_nothing():
    code = (
        "import sys\n"
        "import deeprecon.cpp_ext as c\n"
        "assert 'torch' not in sys.modules, 'importing deeprecon.cpp_ext imported torch'\n"
        "import torch\n"
        "x = torch.rand(1, 1, 8, 8)\n"
        "loss, grad = c.ncc_roi_loss(x, x.clone(), torch.ones(1, 1, 8, 8), impl='ref')\n"
        "assert 'deeprecon.cpp_ext._C' not in sys.modules, 'impl=ref loaded the kernels'\n"
        "c.ncc_roi_loss(x, x.clone(), torch.ones(1, 1, 8, 8))\n"
        "assert 'deeprecon.cpp_ext._C' in sys.modules\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'something was compiled'\n"
        "print('ok')\n")
    p = _python(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_missing_kernels_raise_unavailable_never_fall_back():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'deeprecon.cpp_ext._C':\n"
        "            raise ModuleNotFoundError('blocked', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from deeprecon.cpp_ext import ncc_roi_loss, kernels_available, KernelUnavailableError\n"
        "from deeprecon.runtime.errors import exit_code_of\n"
        "x = torch.rand(1, 1, 8, 8)\n"
        "assert kernels_available() == {'cpu': False, 'cuda': False}\n"
        "for impl in ('auto', 'cpu'):\n"
        "    try:\n"
        "        ncc_roi_loss(x, x.clone(), torch.ones(1, 1, 8, 8), impl=impl)\n"
        "    except KernelUnavailableError as e:\n"
        "        print(int(exit_code_of(e)), str(e).splitlines()[0])\n"
        "    else:\n"
        "        raise SystemExit('no error: a silent fallback')\n"
        "ncc_roi_loss(x, x.clone(), torch.ones(1, 1, 8, 8), impl='ref')\n")
    p = _python(code)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(f"{int(ExitCode.UNAVAILABLE)} ")
        assert "deeprecon.cpp_ext (module _C) were not built" in line


BLOCK_C = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'deeprecon.cpp_ext._C':\n"
    "            raise ModuleNotFoundError('blocked', name=name)\n"
    "sys.meta_path.insert(0, Block())\n")


# the torch-free library made unfindable: what an install without a C++ compiler has
BLOCK_CORE = ("import deeprecon.cpp_ext.numpy_ops as _np_ops\n"
              "_np_ops.library_path = lambda: None\n")


def _reconstruct_code(block: str, study, out, bundle, *args: str) -> str:
    return block + (
        "from deeprecon.runtime.phantom import make_phantom, write_phantom\n"
        "from deeprecon.runtime.cli import run\n"
        "write_phantom(make_phantom(slices=3, phases=2, seed=0, matrix=(48, 48), "
        f"pixel_spacing_mm=3.0), {str(study)!r}, preview=False)\n"
        f"print(run(['reconstruct', {str(study)!r}, '-o', {str(out)!r}, '--bundle', "
        f"{str(bundle)!r}, *{list(args)!r}]))\n")


def test_missing_kernel_is_exit_69_through_the_cli(tiny_bundle, tmp_path):
    """`reconstruct --backend torch` on an installation without the compiled op: the
    runtime maps cpp_ext's KernelUnavailableError to exit 69 with its message (and hint),
    no traceback, no output."""
    study, out = tmp_path / "study", tmp_path / "out"
    p = _python(_reconstruct_code(BLOCK_C, study, out, tiny_bundle, "--fast", "--backend", "torch"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == str(int(ExitCode.UNAVAILABLE)), p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("deeprecon-rt: error:")]
    assert len(errors) == 1, p.stderr
    assert "the compiled kernels of deeprecon.cpp_ext (module _C) were not built" in errors[0]
    assert "hint:" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def test_onnxruntime_inverts_without_any_compiled_kernel(tiny_bundle, tmp_path):
    """The onnxruntime backend's gradient graph holds the NCC/ROI terms (bundle schema
    3): with neither the torch op nor the torch-free library, `reconstruct` still
    inverts (K = 3) and writes its outputs."""
    study, out = tmp_path / "study", tmp_path / "out"
    p = _python(_reconstruct_code(BLOCK_C + BLOCK_CORE, study, out, tiny_bundle,
                                  "--backend", "onnxruntime", "--steps", "3"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "0", p.stderr
    report = json.loads((out / "run_report.json").read_text())
    assert report["backend"] == "onnxruntime" and report["options"]["steps"] == 3
    assert report["inversion"]["steps_max"] == 3 and report["inversion"]["images"] == 6


def test_cpp_ext_imports_nothing_from_the_runtime():
    code = (
        "import sys, torch\n"
        "import deeprecon.cpp_ext as c\n"
        "from deeprecon.cpp_ext import ops, reference, numpy_ops, errors\n"
        "x = torch.rand(1, 1, 8, 8)\n"
        "c.ncc_roi_loss(x, x.clone(), torch.ones(1, 1, 8, 8), impl='ref')\n"
        "c.kernels_available()\n"
        "bad = sorted(m for m in sys.modules if m.startswith('deeprecon.runtime'))\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    p = _python(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


# --- the CUDA kernel's code where no GPU is present ------------------------------------

def _host_cxx() -> str | None:
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """ncc_roi_emulate.cc (the CUDA device code run block by block on the CPU) built into
    a shared library with the host compiler, as a ctypes function."""
    cxx = _host_cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler (c++, g++, clang++) to build the CUDA-code emulator")
    lib = tmp_path_factory.mktemp("emulator") / "libncc_emulate.so"
    p = subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror",
                        "-I", str(CSRC / "cuda"), "-o", str(lib),
                        str(Path(__file__).parent / "native" / "ncc_roi_emulate.cc")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    fn = ctypes.CDLL(str(lib)).deeprecon_ncc_roi_emulate
    fp = ctypes.POINTER(ctypes.c_float)
    i, d = ctypes.c_int, ctypes.c_double
    fn.argtypes = [fp, fp, fp, i, i, i, i, i, i, d, d, d, fp, fp]
    fn.restype = ctypes.c_int

    def run(x, y, roi, *, window, mode, sigma, lambda_roi, lambda_ncc):
        B, _, H, W = x.shape
        loss, grad = torch.empty(B), torch.empty_like(x)
        ptr = lambda t: ctypes.cast(t.data_ptr(), fp)  # noqa: E731
        rc = fn(ptr(x), ptr(y), ptr(roi), B, roi.shape[0], H, W, window,
                {"box": 0, "gaussian": 1}[mode], sigma, lambda_roi, lambda_ncc, ptr(loss),
                ptr(grad))
        assert rc == 0
        return loss, grad

    return run


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_device_code_emulated_matches_reference(case, emulator):
    x, y, roi = make_inputs(*case[:4], data=case[9])
    kw = kwargs_of(case)
    loss, grad = emulator(x, y, roi, **kw)
    want_loss, want_grad = reference64(x, y, roi, **kw)
    assert_parity(loss, want_loss, "loss")
    assert_parity(grad, want_grad, "grad")


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CUDA_HOME/bin or PATH)")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """nvcc -c of the CUDA sources (ncc_roi_cuda.cu, the torch binding, and
    ncc_roi_cuda_launch.cu, the raw-pointer entry it calls) with torch's headers and flags,
    as setup.py builds them (sm_90 only, to keep it short; ~40 s on 2 cores). A CPU-only
    torch wheel lacks c10's generated CUDA macros header: then
    C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for it."""
    import sysconfig

    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    torch_include = Path(cpp_extension.include_paths()[0])
    macros = []
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        macros.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    assert [f.name for f in sources] == ["ncc_roi_cuda.cu", "ncc_roi_cuda_launch.cu"]
    for src in sources:
        obj = tmp_path / (src.stem + ".o")
        cmd = [_nvcc(), "-c", "-std=c++20", "-O3", "--use_fast_math",
               "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC",
               *cpp_extension.COMMON_NVCC_FLAGS, *macros, *includes, "-o", str(obj), str(src)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-5000:]
        assert obj.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CUDA_HOME/bin or PATH)")
def test_cuda_raw_pointer_entry_builds_without_torch(tmp_path):
    """The CUDA kernel's own entry on raw device pointers and a stream
    (cuda/ncc_roi_cuda_launch.cu, a C ABI for e.g. onnxruntime's CUDA provider): built by
    nvcc with the core and no torch header into a shared library, whose host-side checks
    and workspace size are called here (they run before any CUDA call: no GPU needed)."""
    lib_path = tmp_path / "libncc_cuda.so"
    cmd = [_nvcc(), "-shared", "-std=c++17", "-O2", "-gencode", "arch=compute_90,code=sm_90",
           "-Xcompiler", "-fPIC", "-o", str(lib_path), str(CSRC / "cuda" / "ncc_roi_cuda_launch.cu"),
           str(CSRC / "core" / "ncc_roi_core.cpp")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-5000:]
    lib = ctypes.CDLL(str(lib_path))
    i64, fp = ctypes.c_int64, ctypes.POINTER(ctypes.c_float)
    lib.deeprecon_ncc_roi_loss_cuda_workspace_bytes.argtypes = [i64, i64, i64]
    lib.deeprecon_ncc_roi_loss_cuda_workspace_bytes.restype = ctypes.c_size_t
    fn = lib.deeprecon_ncc_roi_loss_cuda
    fn.argtypes = [fp, fp, fp, i64, i64, i64, i64, i64, i64, ctypes.c_double, ctypes.c_double,
                   ctypes.c_double, fp, fp, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                   ctypes.c_char_p, i64]
    fn.restype = ctypes.c_int
    B, H, W = 3, 40, 70
    tiles = -(-H // 16) * -(-W // 32)
    up = lambda n: -(-n // 256) * 256  # noqa: E731
    bytes_ = lib.deeprecon_ncc_roi_loss_cuda_workspace_bytes(B, H, W)
    assert bytes_ == up(4 * B * 3 * H * W) + up(4 * B * tiles * 3) + up(4 * B)

    def call(B=B, roi_b=1, window=9, mode=0, sigma=1.5, workspace=None, size=0):
        err = ctypes.create_string_buffer(256)
        rc = fn(None, None, None, B, roi_b, H, W, window, mode, sigma, 1.0, 1.0, None, None,
                workspace, size, None, err, len(err))
        return rc, err.value.decode()

    assert call(B=0) == (0, "")
    for kw, match in ((dict(window=27), "window must be <= 25 for the CUDA kernel"),
                      (dict(window=4), "window must be a positive odd integer"),
                      (dict(mode=1, sigma=0.0), "sigma must be finite and > 0"),
                      (dict(roi_b=2), "roi must have shape"),
                      (dict(B=70000), "at most 65535 images"),
                      (dict(), "a null pointer")):
        rc, msg = call(**kw)
        assert rc == 1 and match in msg, (kw, msg)
