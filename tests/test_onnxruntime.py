"""The lean runtime: the explicit VJP modules against torch.func.vjp, the bundle's ONNX
graphs in onnxruntime against PyTorch, the onnxruntime runner against the torch runner
(one inversion loop), backend and device selection, and `reconstruct` with inversion
on a machine where torch cannot be imported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundles import tiny_networks  # noqa: E402
from test_packaging import block_modules  # noqa: E402

from deeprecon.export.bundle import random_networks  # noqa: E402
from deeprecon.cpp_ext.reference import loss_and_grad, ncc_roi_loss_reference  # noqa: E402
from deeprecon.export.vjp import (EncoderVJP, GeneratorVJP, HybridGrad,  # noqa: E402
                                  LpipsFeatures, LpipsVJP, ncc_roi_terms)
from deeprecon.runtime.backends import auto_backend, open_backend  # noqa: E402
from deeprecon.runtime.bundle import load_bundle  # noqa: E402
from deeprecon.runtime.errors import BundleError, UnavailableError, UsageError  # noqa: E402
from deeprecon.runtime.inversion import (MAX_NCC_WINDOW, InversionSettings,  # noqa: E402
                                         hybrid_loss_and_grad)
from deeprecon.trainer.config import get_preset  # noqa: E402
from deeprecon.trainer.lpips import LPIPS, load_lpips  # noqa: E402

pytestmark = pytest.mark.slow

# float32 against float32 autograd: measured max_rel_err <= 7e-7 (tiny and cpu64)
VJP_RTOL = 1e-5


def _err(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    got, ref = torch.as_tensor(got).double(), torch.as_tensor(ref).double()
    err = float((got - ref).abs().max())
    return err, err / float(ref.abs().max())


def _assert_close(got, ref, what: str, rtol: float = VJP_RTOL) -> None:
    err, rel = _err(got, ref)
    scale = float(torch.as_tensor(ref).abs().max())
    assert scale > 0, f"{what}: the reference is all zeros (the test would prove nothing)"
    assert err <= rtol * scale and rel <= rtol, f"{what}: max_abs_err {err:.3g}, rel {rel:.3g}"


@pytest.mark.parametrize("preset", ["tiny", "cpu64"])
def test_explicit_vjps_match_torch_func_vjp(preset):
    """Each backward rule written as forward ops gives autograd's product: G, E, LPIPS
    and the whole inversion gradient, max-abs and relative error both asserted."""
    m = get_preset(preset)
    nets = random_networks(preset)
    G, E = nets["generator"].requires_grad_(False), nets["encoder"].requires_grad_(False)
    lp = load_lpips(layers=m.lpips_layers)
    R, L, C = m.resolution, G.num_ws, G.w_dim
    g = torch.Generator().manual_seed(1)
    B = 3
    w = G.w_avg[None, None] + torch.randn(B, L, C, generator=g)
    img = torch.rand(B, 1, R, R, generator=g) * 2 - 1
    x = torch.rand(B, 1, R, R, generator=g) * 2 - 1

    gy = torch.randn(B, 1, R, R, generator=g)
    y_ref, vjp = torch.func.vjp(G, w)
    y, gw = GeneratorVJP(G)(w, gy)
    assert torch.equal(y, y_ref)  # the forward is the network's own, op for op
    _assert_close(gw, vjp(gy)[0], "G")

    gw_in = torch.randn(B, L, C, generator=g)
    e_ref, vjp = torch.func.vjp(E, img)
    e, gi = EncoderVJP(E)(img, gw_in)
    assert torch.equal(e, e_ref)
    _assert_close(gi, vjp(gw_in)[0], "E")

    fx = LpipsFeatures(lp)(x)
    assert len(fx) == m.lpips_layers
    gd = torch.randn(B, generator=g)
    d_ref, vjp = torch.func.vjp(lambda t: lp(x, t), img)
    d, gl = LpipsVJP(lp, R)(*fx, img, gd)
    _assert_close(d, d_ref, "LPIPS value")
    _assert_close(gl, vjp(gd)[0], "LPIPS")

    roi = torch.zeros(B, 1, R, R)
    roi[:, :, R // 4:3 * R // 4, R // 3:3 * R // 4] = 1
    lam = torch.tensor([1.0, 0.5, 0.1])
    loss, grad = HybridGrad(G, E, lp)(w, x, roi, *fx, lam, torch.tensor([7]))
    ref_loss, ref_grad = _hybrid_loss_and_grad(G, E, lp, w, x, roi, fx, lam, 7)
    _assert_close(loss, ref_loss, "hybrid loss")
    _assert_close(grad, ref_grad, "hybrid grad")


def _hybrid_loss_and_grad(G, E, lp, w, x, roi, fx, lam, window):
    """The runtime's definition of the inversion loss (the fused op) and its autograd."""
    return hybrid_loss_and_grad(w, x.contiguous(), roi.contiguous(), generator=G, encoder=E,
                                lpips_to_x=lambda y: lp.distance_to([torch.as_tensor(f) for f in fx], y),
                                lambda1=float(lam[0]), lambda2=float(lam[1]),
                                lambda3=float(lam[2]), ncc_window=window)


@pytest.mark.parametrize("window", [3, 9, MAX_NCC_WINDOW])
def test_closed_form_ncc_roi_terms_match_the_reference(window):
    """The gradient graph's NCC/ROI-L2 terms (closed form, a MAX_NCC_WINDOW-tap filter
    with the middle `window` taps on) against autograd of the kernel's definition, in
    float64: the same function, not an approximation of it."""
    g = torch.Generator().manual_seed(window)
    x, y = (torch.rand(3, 1, 40, 40, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    roi = (torch.rand(3, 1, 40, 40, generator=g, dtype=torch.float64) > 0.6).double()
    ref_loss, ref_grad = loss_and_grad(ncc_roi_loss_reference, x, y, roi, window=window,
                                       lambda_roi=0.7, lambda_ncc=0.4)
    loss, grad = ncc_roi_terms(x, y, roi, torch.tensor([window]), torch.tensor(0.7, dtype=torch.float64),
                               torch.tensor(0.4, dtype=torch.float64))
    _assert_close(loss, ref_loss.detach(), "NCC/ROI loss", 1e-12)
    _assert_close(grad, ref_grad, "NCC/ROI grad", 1e-12)
    other_loss, _ = loss_and_grad(ncc_roi_loss_reference, x, y, roi, window=window + 2,
                                  lambda_roi=0.7, lambda_ncc=0.4)
    assert (other_loss - loss).abs().max() > 1e-4  # the window matters: the check can fail


def test_lpips_stores_only_the_layers_it_uses():
    lp = LPIPS(layers=3)
    keys = set(lp.used_state_dict())
    assert keys and keys < set(lp.state_dict())
    assert not any(k.startswith(("net.slice4.", "net.slice5.", "lin3.", "lin4.")) for k in keys)
    assert {"net.slice3.9.weight", "lin2.model.1.weight", "scaling_layer.shift"} <= keys
    assert set(LPIPS(layers=5).used_state_dict()) == set(LPIPS(layers=5).state_dict())


def test_onnx_graphs_match_pytorch_at_a_new_batch(tiny_bundle):
    """Every ONNX graph of the bundle, in onnxruntime at batch 5 (exported at 2, checked
    at 3), against the PyTorch networks it came from; the gradient graph against
    autograd of the runtime's inversion loss (the fused op), at a window the export
    was not checked with."""
    import onnxruntime as ort

    b = load_bundle(tiny_bundle)
    nets = {**tiny_networks(seed=0), "lpips": load_lpips()}
    G, E, S, lp = nets["generator"], nets["encoder"], nets["segmenter"], nets["lpips"]
    for n in (G, E, S):
        n.requires_grad_(False)
    R = b.resolution
    g = torch.Generator().manual_seed(7)
    B = 5
    w = G.w_avg[None, None] + torch.randn(B, b.num_ws, b.w_dim, generator=g)
    x = torch.rand(B, 1, R, R, generator=g) * 2 - 1

    def session(graph):
        path, entry = b.artifact(graph, "onnx")
        assert entry["opset"] >= 18
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    with torch.no_grad():
        _assert_close(session("encoder").run(None, {"image": x.numpy()})[0], E(x), "encoder", 1e-4)
        _assert_close(session("generator").run(None, {"w": w.numpy()})[0], G(w), "generator", 1e-4)
        _assert_close(session("segmenter").run(None, {"image": x.numpy()})[0], S(x), "segmenter", 1e-4)
        fx = session("lpips_features").run(None, {"x": x.numpy()})
        for got, ref in zip(fx, lp.reference_features(x)):
            _assert_close(got, ref, "lpips_features", 1e-4)
    _, roi = _study_batch(R, n=B)
    lam = np.array([1.0, 0.5, 0.1], np.float32)
    loss, grad = session("hybrid_grad").run(
        None, {"w": w.numpy(), "x": x.numpy(), "roi": roi,
               **{f"fx{k}": f for k, f in enumerate(fx)}, "lambdas": lam,
               "ncc_window": np.array([5], np.int64)})
    ref_loss, ref_grad = _hybrid_loss_and_grad(G, E, lp, w, x, torch.from_numpy(roi), fx,
                                               torch.from_numpy(lam), 5)
    _assert_close(grad, ref_grad, "hybrid_grad", 1e-4)
    _assert_close(loss, ref_loss, "hybrid_grad loss", 1e-4)


def _study_batch(R: int, n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 1, R, R), dtype=np.float32) * 2 - 1).astype(np.float32)
    roi = np.zeros_like(x)
    roi[:, :, R // 4:3 * R // 4, R // 4:3 * R // 4] = 1
    return x, roi


def test_onnxruntime_runner_matches_the_torch_runner(tiny_bundle):
    """The same loss and gradient, and the same inversion through the one shared loop
    (per-image Adam, early stop, best code) on both runners."""
    b = load_bundle(tiny_bundle)
    o, t = open_backend(b, "onnxruntime", "cpu"), open_backend(b, "torch", "cpu")
    assert (o.name, o.device, t.name) == ("onnxruntime", "cpu", "torch")
    assert o.info()["providers"] == ["CPUExecutionProvider"]
    x, roi = _study_batch(b.resolution)
    w0 = o.encode(x)
    _assert_close(w0, t.encode(x), "encode", 1e-5)
    _assert_close(o.render(w0), t.render(w0), "render", 1e-5)
    _assert_close(o.segment(x), t.segment(x), "segment", 1e-5)
    attrs = InversionSettings().loss_weights()
    a = o.run("loss_and_grad", {"x": x, "roi": roi, "w": w0}, **attrs)
    c = t.run("loss_and_grad", {"x": x, "roi": roi, "w": w0}, **attrs)
    _assert_close(a["loss"], c["loss"], "loss", 1e-5)
    _assert_close(a["grad"], c["grad"], "grad", 1e-4)
    s = InversionSettings(steps=12, batch=4, early_stop_patience=3, early_stop_rel_tol=1e-3)
    io, it = o.invert(x, roi, w0, s), t.invert(x, roi, w0, s)
    assert np.array_equal(io.steps, it.steps) and np.array_equal(io.stopped_early, it.stopped_early)
    assert (io.loss < io.loss_init).all()  # the inversion does its job
    _assert_close(io.w, it.w, "inverted codes", 1e-4)
    np.testing.assert_allclose(io.loss, it.loss, rtol=1e-5)
    with pytest.raises(UsageError, match="expected dtype float32"):
        o.run("encoder", {"image": x.astype(np.float64)})
    for runner in (o, t):  # the gradient graph's box has MAX_NCC_WINDOW taps: no silent clip
        with pytest.raises(UsageError, match=f"ncc_window must be odd and in 3..{MAX_NCC_WINDOW}"):
            runner.run("loss_and_grad", {"x": x, "roi": roi, "w": w0},
                       **{**attrs, "ncc_window": MAX_NCC_WINDOW + 2})


def test_backend_and_device_selection(tiny_bundle, tmp_path):
    b = load_bundle(tiny_bundle)
    assert auto_backend(b) == "onnxruntime"
    assert open_backend(b, "auto", "auto").name == "onnxruntime"
    with pytest.raises(UnavailableError, match="CUDAExecutionProvider"):
        open_backend(b, "onnxruntime", "cuda")   # this onnxruntime is the CPU build
    with pytest.raises(UsageError, match="unknown device"):
        open_backend(b, "onnxruntime", "gpu")
    with pytest.raises(UsageError, match="unknown backend"):
        open_backend(b, "tvm", "cpu")
    with pytest.raises(UsageError, match="TensorRT cannot be installed"):
        open_backend(b, "tensorrt", "cpu")
    # threads: every onnxruntime session gets them (not only those opened later)
    r = open_backend(b, "onnxruntime", "cpu", threads=1)
    assert r.info()["threads"] == 1
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in r._sessions.values())
    for bad in (0, -2, 1.5, True):
        with pytest.raises(UsageError, match="threads must be"):
            open_backend(b, "onnxruntime", "cpu", threads=bad)
    # a torch-only bundle: auto takes torch; onnxruntime names what the bundle lacks
    from deeprecon.export.bundle import random_bundle
    torch_only = load_bundle(random_bundle(tmp_path / "t", preset="tiny", onnx=False))
    assert "hybrid_grad" not in torch_only.graphs
    assert auto_backend(torch_only) == "torch"
    with pytest.raises(BundleError, match="graph 'encoder' has no onnx artifact"):
        open_backend(torch_only, "onnxruntime", "cpu")


def test_reconstruct_with_inversion_without_torch(tiny_bundle, tmp_path):
    """`pip install 'deeprecon-rt[cli,onnx]'`, no torch and no matplotlib: reconstruct
    with K > 0 runs on the onnxruntime backend and writes every output but the QC
    pictures, with one warning naming the report extra (log, run report, HTML report);
    torch and matplotlib are never imported."""
    from deeprecon.runtime.outputs import verify_outputs
    from deeprecon.runtime.phantom import make_phantom, write_phantom

    write_phantom(make_phantom(slices=5, phases=2, seed=3, matrix=(64, 72),
                               pixel_spacing_mm=3.0), tmp_path / "study", preview=False)
    out = tmp_path / "out"
    code = block_modules("torch", "matplotlib", "PIL") + (
        "from deeprecon.runtime.cli import run\n"
        f"rc = run(['reconstruct', {str(tmp_path / 'study')!r}, '-o', {str(out)!r}, "
        f"'--bundle', {str(tiny_bundle)!r}, '--steps', '3', '--interp', '1', '--json'])\n"
        "assert rc == 0, rc\n"
        "bad = [m for m in sys.modules if m.partition('.')[0] in ('torch', 'matplotlib', 'PIL')]\n"
        "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, cwd="/")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    summary = json.loads(p.stdout[p.stdout.index("{"):])
    assert summary["timings_s"]["invert"] > 0
    report = json.loads((out / "run_report.json").read_text())
    assert report["backend"] == "onnxruntime" and report["device"] == "cpu"
    assert report["inversion"]["settings"]["steps"] == 3 and report["inversion"]["steps_max"] >= 1
    files = set(verify_outputs(out)["files"])
    assert {"measures.csv", "measures.json", "report.html", "run_report.json",
            "segmentation"} <= {f.split("/")[0] for f in files}
    assert not [f for f in files if f.startswith("qc/")]
    warned = [w for w in report["warnings"] if w.startswith("no QC pictures")]
    assert len(warned) == 1 and "matplotlib" in warned[0] and "deeprecon-rt[report]" in warned[0]
    assert warned[0] in p.stderr
    import html
    assert html.escape(warned[0]) in (out / "report.html").read_text()
