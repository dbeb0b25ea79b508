"""The inversion written once (runtime/inversion.py) and the runner contract
(runtime/backends/base.py): one InversionSettings for export, the bundle reader and the
runtime; the shared loop (Adam per image, early stop, best code) without torch; the torch
runner's ``run`` (feeds, attributes, the composed ``loss_and_grad`` graph) and its
on-device fast path against the shared loop on the host."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_packaging import BLOCK_TORCH  # noqa: E402

from deeprecon.export.bundle import INVERSION_DEFAULTS, inversion_settings, random_bundle  # noqa: E402
from deeprecon.runtime import inversion  # noqa: E402
from deeprecon.runtime.backends import open_backend  # noqa: E402
from deeprecon.runtime.bundle import INVERSION_KEYS, MANIFEST, load_bundle  # noqa: E402
from deeprecon.runtime.cli import run as cli_run  # noqa: E402
from deeprecon.runtime.errors import BundleError, ExitCode, UsageError  # noqa: E402
from deeprecon.runtime.inversion import InversionSettings, hybrid_loss, optimise  # noqa: E402
from deeprecon.runtime.phantom import make_phantom  # noqa: E402
from deeprecon.runtime.pipeline import Reconstructor  # noqa: E402

R, L, C = 32, 8, 32  # the tiny preset: grid, num_ws, w_dim


# ----------------------------------------------------------------------------- settings


def test_one_definition_of_the_settings():
    assert INVERSION_DEFAULTS == InversionSettings().to_dict()
    assert INVERSION_KEYS == {k: type(v) for k, v in InversionSettings().to_dict().items()}
    from deeprecon.trainer.stages import latents

    assert latents.hybrid_loss is hybrid_loss   # the trainer's latents stage: the same loss
    cfg, rt = latents.Config(), InversionSettings()
    assert (cfg.lr, cfg.lambda1, cfg.lambda2, cfg.lambda3, cfg.ncc_window) == \
        (rt.lr, rt.lambda1, rt.lambda2, rt.lambda3, rt.ncc_window)


@pytest.mark.parametrize("values", [{"steps": 0}, {"early_stop_patience": 0},
                                    {"lambda1": 0, "lambda2": 0, "lambda3": 0},
                                    {"ncc_window": 3}, {"early_stop_rel_tol": 0},
                                    {"roi_dilation_mm": 0, "batch": 1}])
def test_settings_at_the_edge_of_their_ranges_are_accepted_everywhere(values):
    s = InversionSettings(**values)
    assert inversion_settings(values) == s.to_dict()                       # export --set
    assert InversionSettings.from_manifest(INVERSION_DEFAULTS, **values) == s  # runtime


@pytest.mark.parametrize("values, message", [
    ({"steps": -1}, "steps must be >= 0"), ({"lr": 0}, "lr must be > 0"),
    ({"lr": -1e-3}, "lr must be > 0"), ({"lambda1": -0.5}, "lambda1 must be >= 0"),
    ({"lambda3": -1}, "lambda3 must be >= 0"),
    ({"ncc_window": 1}, "ncc_window must be odd and in 3..31"),
    ({"ncc_window": 33}, "ncc_window must be odd and in 3..31"),
    ({"ncc_window": 8}, "ncc_window must be odd"), ({"batch": 0}, "batch must be >= 1"),
    ({"early_stop_patience": -2}, "early_stop_patience must be >= 0"),
    ({"early_stop_rel_tol": -1}, "early_stop_rel_tol must be >= 0"),
    ({"roi_dilation_mm": -1}, "roi_dilation_mm must be >= 0"),
    ({"lr": math.nan}, "expected a finite number"), ({"lambda2": math.inf}, "finite"),
    ({"steps": 2.5}, "expected an integer"), ({"steps": True}, "expected an integer"),
    ({"batch": "8"}, "expected an integer"),
])
def test_bad_settings_are_refused_the_same_way_everywhere(values, message):
    with pytest.raises(UsageError, match=message):
        InversionSettings(**values)
    with pytest.raises(UsageError, match=message):
        InversionSettings.from_manifest(INVERSION_DEFAULTS, **values)
    if not any(isinstance(v, str) for v in values.values()):   # --set parses strings
        with pytest.raises(UsageError, match=message):
            inversion_settings(values)


def test_parse_reads_set_strings_and_names_every_problem():
    s = InversionSettings.parse({"steps": "0", "ncc_window": "7.0", "lr": "2e-2"})
    assert (s.steps, s.ncc_window, s.lr) == (0, 7, 0.02)
    assert isinstance(s.ncc_window, int) and isinstance(s.lr, float)
    with pytest.raises(UsageError, match="steps='ten': expected an integer"):
        InversionSettings.parse({"steps": "ten"})
    with pytest.raises(UsageError, match=r"lr must be > 0.*ncc_window must be odd"):
        InversionSettings(lr=0, ncc_window=4)
    with pytest.raises(UsageError, match="unknown inversion setting 'step'"):
        InversionSettings.parse({"step": 3})
    base = InversionSettings(steps=5)
    assert InversionSettings.parse({"lr": 0.5}, base=base) == InversionSettings(steps=5, lr=0.5)


# ----------------------------------------------------------------------------- the shared loop


def _quadratic(target: np.ndarray):
    """loss_i(w) = 0.5 * |w_i - target_i|^2 and its gradient, in numpy."""
    def loss_and_grad(x, roi, w):
        d = w - target[np.asarray(x[:, 0, 0, 0], np.int64)]   # x carries the image index
        return 0.5 * (d.astype(np.float64) ** 2).sum(axis=(1, 2)).astype(np.float32), d
    return loss_and_grad


def _index_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 1, 2, 2)).copy()
    return x, np.ones_like(x)


def test_shared_loop_is_per_image_adam():
    """Without early stop, every image follows torch.optim.Adam on its own loss (with the
    batch shuffled around it), and keeps its best (here: last) code."""
    rng = np.random.default_rng(0)
    n, steps, lr = 5, 25, 0.05
    w0 = rng.normal(size=(n, 3, 4)).astype(np.float32)
    # targets further than steps * lr from w0: the loss falls at every step (best = last)
    target = (w0 + rng.choice([-1, 1], size=w0.shape) * (2 + rng.random(w0.shape))
              ).astype(np.float32)
    x, roi = _index_images(n)
    s = InversionSettings(steps=steps, lr=lr, early_stop_patience=0)
    out = optimise(_quadratic(target), x, roi, w0, s)
    assert out["steps"].tolist() == [steps] * n and not out["stopped_early"].any()
    for i in range(n):
        w = torch.tensor(w0[i], requires_grad=True)
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * (w - torch.from_numpy(target[i])).square().sum()).backward()
            opt.step()
        np.testing.assert_allclose(out["w"][i], w.detach().numpy(), rtol=0, atol=1e-5)
    d0 = w0 - target
    np.testing.assert_allclose(out["loss_init"], 0.5 * (d0.astype(np.float64) ** 2).sum((1, 2)),
                               rtol=1e-6)
    assert (out["loss"] < out["loss_init"]).all()


def test_shared_loop_stops_early_and_keeps_the_best_code():
    """A loss that gets worse after step 3 for image 0 and is flat for image 1: image 0
    stops after `patience` steps without improvement and keeps the code it had at step 3;
    image 1 stops after `patience` steps at its first code."""
    calls = []

    def loss_and_grad(x, roi, w):
        k = len(calls)
        calls.append(len(w))
        idx = np.asarray(x[:, 0, 0, 0], np.int64)
        loss = np.where(idx == 0, abs(k - 3) + 1.0, 5.0).astype(np.float32)
        return loss, np.ones_like(w)

    x, roi = _index_images(2)
    w0 = np.zeros((2, 1, 1), np.float32)
    s = InversionSettings(steps=50, lr=0.1, early_stop_patience=4, early_stop_rel_tol=1e-3)
    out = optimise(loss_and_grad, x, roi, w0, s)
    assert out["stopped_early"].tolist() == [True, True]
    assert out["steps"].tolist() == [8, 5]          # best at step 3 (0-based), 4 more steps
    assert calls[:5] == [2] * 5 and calls[5:] == [1] * 3   # stopped images leave the batch
    assert out["loss"].tolist() == [1.0, 5.0] and out["loss_init"].tolist() == [4.0, 5.0]
    # Adam's first steps move by lr each (a constant gradient): the code before update 4
    np.testing.assert_allclose(out["w"][0], -0.3, atol=1e-6)
    np.testing.assert_allclose(out["w"][1], 0.0)


def test_shared_loop_runs_without_torch():
    code = BLOCK_TORCH + (
        "import numpy as np\n"
        "from deeprecon.runtime.inversion import InversionSettings, optimise\n"
        "x = np.zeros((3, 1, 2, 2), np.float32); w0 = np.ones((3, 2, 2), np.float32)\n"
        "out = optimise(lambda x, r, w: ((w ** 2).sum((1, 2)), 2 * w), x, x, w0,\n"
        "               InversionSettings(steps=30, lr=0.1))\n"
        "assert (out['loss'] < out['loss_init']).all(), out\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


# ----------------------------------------------------------------------------- torch runner


@pytest.fixture(scope="module")
def runner(tiny_bundle):
    r = open_backend(load_bundle(tiny_bundle), "torch", "cpu")
    yield r
    r.close()


def _batch(runner, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 1, R, R)).astype(np.float32)
    roi = (rng.uniform(0, 1, (n, 1, R, R)) > 0.4).astype(np.float32)
    return x, roi, runner.encode(x)


def test_run_checks_feeds_and_attributes(runner):
    x, roi, w = _batch(runner, 2)
    out = runner.run("generator", {"w": w})
    assert list(out) == ["image"] and out["image"].shape == (2, 1, R, R)
    assert out["image"].dtype == np.float32
    d = runner.run("lpips", {"x": x, "y": x})["distance"]
    np.testing.assert_allclose(d, 0, atol=1e-6)
    weights = InversionSettings().loss_weights()
    lg = runner.run("loss_and_grad", {"x": x, "roi": roi, "w": w}, **weights)
    assert sorted(lg) == ["grad", "loss"]
    assert lg["loss"].shape == (2,) and lg["grad"].shape == (2, L, C)
    bad = [
        (("generator", {"w": w.astype(np.float64)}, {}), "expected dtype float32"),
        (("generator", {"w": w[:, :3]}, {}), "expected shape"),
        (("generator", {"image": x}, {}), "expected the inputs"),
        (("lpips", {"x": x, "y": x[:1]}, {}), "dimension 'batch'"),
        (("loss_and_grad", {"x": x, "roi": roi, "w": w}, {}), "takes the attributes"),
        (("generator", {"w": w}, {"lambda1": 1.0}), "takes the attributes"),
        (("nope", {}, {}), "has no graph 'nope'"),
    ]
    for (graph, feeds, attrs), message in bad:
        with pytest.raises(UsageError, match=message):
            runner.run(graph, feeds, **attrs)


def test_loss_and_grad_is_the_gradient_of_the_loss(runner):
    """The composed graph's gradient against a central difference of its own loss along
    a random direction (float32: rtol 2e-2)."""
    x, roi, w = _batch(runner, 3, seed=1)
    weights = InversionSettings().loss_weights()
    out = runner.run("loss_and_grad", {"x": x, "roi": roi, "w": w}, **weights)
    d = np.random.default_rng(2).normal(size=w.shape).astype(np.float32)
    d /= np.sqrt((d ** 2).sum(axis=(1, 2), keepdims=True))
    eps = 1e-2

    def loss(wv):
        return runner.run("loss_and_grad", {"x": x, "roi": roi, "w": wv.astype(np.float32)},
                          **weights)["loss"].astype(np.float64)

    fd = (loss(w + eps * d) - loss(w - eps * d)) / (2 * eps)
    analytic = (out["grad"].astype(np.float64) * d).sum(axis=(1, 2))
    np.testing.assert_allclose(analytic, fd, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("kw", [
    dict(steps=12, batch=4, early_stop_patience=0),
    dict(steps=30, batch=3, early_stop_patience=2, early_stop_rel_tol=2e-2),
])
def test_torch_fast_path_matches_the_shared_loop(runner, kw):
    """The torch runner's on-device inversion and the shared numpy loop over its
    loss_and_grad graph: the same steps and early stops; codes, losses and images to
    max-abs 1e-5 (both run the same float32 operations: on the CPU they agree bitwise)."""
    x, roi, w0 = _batch(runner, 7, seed=3)
    s = InversionSettings(**kw)
    fast = runner.invert(x, roi, w0, s)
    host = inversion.invert(runner, x, roi, w0, s)
    assert fast.steps.tolist() == host.steps.tolist()
    assert fast.stopped_early.tolist() == host.stopped_early.tolist()
    if kw["early_stop_patience"]:
        assert fast.stopped_early.any() and (fast.steps < s.steps).any()
    else:
        assert fast.steps.tolist() == [s.steps] * len(x)
    for name in ("w", "recon", "loss", "loss_init"):
        a, b = getattr(fast, name), getattr(host, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = float(np.abs(a.astype(np.float64) - b).max())
        assert err <= 1e-5 and err <= 1e-5 * float(np.abs(b).max()), (name, err)
    assert (fast.loss <= fast.loss_init + 1e-9).all()


def test_k0_needs_no_gradient_graph(runner):
    x, roi, w0 = _batch(runner, 3)
    for inv in (runner.invert(x, roi, w0, InversionSettings(steps=0)),
                inversion.invert(runner, x, roi, w0, InversionSettings(steps=0))):
        np.testing.assert_array_equal(inv.w, w0)
        np.testing.assert_array_equal(inv.recon, runner.render(w0))
        assert inv.steps.tolist() == [0] * 3 and np.isnan(inv.loss).all()


# ----------------------------------------------------------------------------- bundles


def _rewrite_inversion(src: Path, dst: Path, **values) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    m["inversion"].update(values)
    (dst / MANIFEST).write_text(json.dumps(m, indent=2))
    return dst


@pytest.mark.parametrize("values, message", [
    ({"ncc_window": 4}, "ncc_window must be odd"), ({"steps": -3}, "steps must be >= 0"),
    ({"lr": 0.0}, "lr must be > 0"), ({"batch": 0}, "batch must be >= 1"),
    ({"lambda2": -0.5}, "lambda2 must be >= 0"),
])
def test_bundle_with_bad_inversion_defaults_is_refused(tiny_bundle, tmp_path, values, message,
                                                        capsys):
    bad = _rewrite_inversion(tiny_bundle, tmp_path / "bad", **values)
    with pytest.raises(BundleError, match=f"bad inversion defaults: .*{message}"):
        load_bundle(bad)
    assert cli_run(["bundle", "info", str(bad)]) == ExitCode.BAD_BUNDLE == 78
    assert message.split()[0] in capsys.readouterr().err


def test_runtime_overrides_are_usage_errors(tiny_bundle):
    with Reconstructor(tiny_bundle, device="cpu") as rec:
        assert rec.settings(steps=0, early_stop_patience=0).steps == 0
        for bad, message in (({"ncc_window": 4}, "ncc_window"), ({"lr": -1.0}, "lr"),
                             ({"batch": 0}, "batch"), ({"stpes": 3}, "unknown")):
            with pytest.raises(UsageError, match=message) as e:
                rec.settings(**bad)
            assert e.value.exit_code == ExitCode.USAGE == 2


@pytest.mark.slow
def test_bundle_defaulting_to_k0_is_exported_loaded_and_used(tmp_path):
    """A bundle may default to K = 0 (the encoder's codes): export writes it, the reader
    accepts it, and reconstruct uses it when no --steps is given. (Torch programs only: the
    ONNX graphs take three quarters of an export's time and are not what this is about.)"""
    path = random_bundle(tmp_path / "k0", preset="tiny", onnx=False,
                         inversion={"steps": 0, "early_stop_patience": 0})
    b = load_bundle(path)
    assert b.inversion["steps"] == 0 and b.inversion["early_stop_patience"] == 0
    st = make_phantom(slices=3, phases=2, seed=0, matrix=(64, 72), pixel_spacing_mm=3.0).study
    with Reconstructor(path, device="cpu") as rec:
        assert rec.settings().steps == 0
        res = rec.reconstruct(st, interp=1, phases="ed")
        assert res.options["steps"] == 0 and res.inversion["steps"] == [0] * st.n_slices
        res = rec.reconstruct(st, steps=2, interp=1, phases="ed")   # an override still inverts
        assert res.inversion["steps"] == [2] * st.n_slices
