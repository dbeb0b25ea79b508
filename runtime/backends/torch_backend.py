"""The torch backend: the bundle's ``torch.export`` programs on the CPU or a CUDA device.

Differentiable, so the inversion runs by autograd through G, E and LPIPS, with the ROI-L2
and local-NCC terms (and their gradient) from the fused op
:func:`deeprecon.cpp_ext.ncc_roi_loss` (its compiled CPU or CUDA kernel; a missing kernel
is an error, never a silent fallback to the reference).

The inversion optimises every image of a batch together, with Adam written out here so
that each image has its own step count and can stop on its own: an image whose loss
has not improved by ``early_stop_rel_tol`` for ``early_stop_patience`` steps leaves the
batch (later steps compute only the images still moving) and keeps its best code.
Adam's update of one image depends only on that image's gradients, so the results do
not depend on which other images share the batch.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import UnavailableError, UsageError
from .base import Backend, Inversion, InversionSettings, Progress

log = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
EVAL_BATCH = 32  # images per forward pass outside the inversion


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise UnavailableError(f"the torch backend needs PyTorch, which is not installed ({e})",
                               hint="pip install 'deeprecon-rt[torch]', or choose another "
                                    "backend") from None
    return torch


def resolve_torch_device(device: str):
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch.device that really exists here;
    UnavailableError naming what is missing otherwise (no fallback to the CPU)."""
    torch = _import_torch()
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda"
                                           or (device.startswith("cuda:")
                                               and device[5:].isdigit())):
        raise UsageError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise UnavailableError(f"device {device} was asked for, but {why}",
                               hint="run with --device cpu")
    dev = torch.device(device)
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise UnavailableError(f"device {device} does not exist: "
                               f"{torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)


class TorchBackend(Backend):
    """Runs the bundle's torch.export programs (encoder, generator, segmenter, lpips)."""

    name = "torch"

    def __init__(self, bundle: Bundle, device: str = "cpu"):
        torch = _import_torch()
        self.torch = torch
        self.bundle = bundle
        self._device = resolve_torch_device(device)
        self.device = str(self._device)
        from deeprecon.cpp_ext import kernels_available, load_library
        from deeprecon.cpp_ext.errors import KernelUnavailableError
        try:
            load_library()
        except KernelUnavailableError as e:  # the runtime's own error type for its callers
            raise UnavailableError(e.message, hint=e.hint) from None
        kernels = kernels_available()
        need = "cuda" if self._device.type == "cuda" else "cpu"
        if not kernels.get(need, False):
            raise UnavailableError(f"the fused NCC/ROI loss has no compiled {need} kernel in "
                                   "this installation",
                                   hint="reinstall deeprecon-rt with --no-build-isolation "
                                        "(with nvcc on the PATH for CUDA)")
        t0 = time.perf_counter()
        self.programs = {}
        for graph in ("encoder", "generator", "segmenter"):
            self.programs[graph] = bundle.load_program(graph, device=self.device)
        self._lpips = None  # loaded on the first inversion with steps > 0
        log.debug("torch backend: programs loaded on %s in %.2f s", self.device,
                  time.perf_counter() - t0)

    # -- helpers ------------------------------------------------------------------
    def _program(self, graph: str):
        if graph == "lpips" and graph not in self.programs:
            self.programs["lpips"] = self.bundle.load_program("lpips", device=self.device)
        return self.programs[graph]

    def _tensor(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self._device)

    def _batched(self, graph: str, array: np.ndarray, *, progress: Progress, stage: str,
                 post=None) -> np.ndarray:
        spec = self.bundle.graphs[graph]
        spec.check_feeds({spec.inputs[0].name: array})
        torch = self.torch
        prog = self._program(graph)
        outs = []
        n = len(array)
        with torch.no_grad():
            for i in range(0, n, EVAL_BATCH):
                y = prog(self._tensor(array[i:i + EVAL_BATCH]))
                if post is not None:
                    y = post(y)
                outs.append(y.float().cpu().numpy())
                if progress is not None:
                    progress(stage, min(i + EVAL_BATCH, n), n)
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    # -- contract -----------------------------------------------------------------
    def encode(self, images: np.ndarray, *, progress: Progress = None) -> np.ndarray:
        return self._batched("encoder", images, progress=progress, stage="encode")

    def render(self, w: np.ndarray, *, progress: Progress = None) -> np.ndarray:
        return self._batched("generator", w, progress=progress, stage="render")

    def segment(self, images: np.ndarray, *, progress: Progress = None) -> np.ndarray:
        return self._batched("segmenter", images, progress=progress, stage="segment",
                             post=lambda t: t.softmax(dim=1))

    def render_and_segment(self, w: np.ndarray, *, progress: Progress = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        spec = self.bundle.graphs["generator"]
        spec.check_feeds({spec.inputs[0].name: w})
        torch = self.torch
        G, S = self._program("generator"), self._program("segmenter")
        imgs, probs = [], []
        n = len(w)
        with torch.no_grad():
            for i in range(0, n, EVAL_BATCH):
                y = G(self._tensor(w[i:i + EVAL_BATCH]))
                imgs.append(y.float().cpu().numpy())
                probs.append(S(y).softmax(dim=1).float().cpu().numpy())
                if progress is not None:
                    progress("render", min(i + EVAL_BATCH, n), n)
        return np.concatenate(imgs), np.concatenate(probs)

    def invert(self, x: np.ndarray, roi: np.ndarray, w0: np.ndarray, settings: InversionSettings,
               *, progress: Progress = None) -> Inversion:
        n = len(x)
        for name, a, shape in (("roi", roi, x.shape), ("w0", w0, (n,) + tuple(w0.shape[1:]))):
            if tuple(a.shape) != tuple(shape):
                raise UsageError(f"invert: {name} has shape {tuple(a.shape)}, expected {shape}")
        self.bundle.graphs["encoder"].check_feeds({"image": x})
        self.bundle.graphs["generator"].check_feeds({"w": w0})
        if settings.steps == 0:
            recon = self.render(w0)
            nan = np.full(n, np.nan)
            return Inversion(w=np.asarray(w0, np.float32), recon=recon,
                             steps=np.zeros(n, np.int64), loss_init=nan, loss=nan.copy(),
                             stopped_early=np.zeros(n, bool))
        parts = []
        n_chunks = -(-n // settings.batch)
        for k, i in enumerate(range(0, n, settings.batch)):
            sl = slice(i, i + settings.batch)
            parts.append(self._invert_batch(x[sl], roi[sl], w0[sl], settings,
                                            progress=progress, chunk=(k, n_chunks)))
        return Inversion(**{k: np.concatenate([getattr(p, k) for p in parts])
                            for k in ("w", "recon", "steps", "loss_init", "loss",
                                      "stopped_early")})

    def _invert_batch(self, x, roi, w0, s: InversionSettings, *, progress, chunk):
        from deeprecon.cpp_ext import ncc_roi_loss

        torch = self.torch
        G, E = self._program("generator"), self._program("encoder")
        lpips = self._program("lpips")
        xt, rt = self._tensor(x), self._tensor(roi)
        w = self._tensor(w0).clone()
        n = len(x)
        m = torch.zeros_like(w)
        v = torch.zeros_like(w)
        t_img = torch.zeros(n, dtype=torch.long, device=self._device)
        best = torch.full((n,), float("inf"), dtype=torch.float64, device=self._device)
        best_w = w.clone()
        since = torch.zeros(n, dtype=torch.long, device=self._device)
        active = torch.ones(n, dtype=torch.bool, device=self._device)
        loss_init = torch.full((n,), float("nan"), dtype=torch.float64, device=self._device)
        b1, b2 = ADAM_BETAS
        stopped = torch.zeros(n, dtype=torch.bool, device=self._device)
        for step in range(s.steps):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            wa = w[idx].clone().requires_grad_(True)
            xa = xt[idx]
            y = G(wa)
            roi_ncc, _ = ncc_roi_loss(xa, y.contiguous(), rt[idx], window=s.ncc_window,
                                      lambda_roi=s.lambda1, lambda_ncc=s.lambda2)
            loss = (s.lambda1 * lpips(xa, y) + roi_ncc
                    + s.lambda3 * (wa - E(y)).square().mean(dim=(1, 2)))
            (grad,) = torch.autograd.grad(loss.sum(), [wa])
            with torch.no_grad():
                lv = loss.detach().double()
                if step == 0:
                    loss_init[idx] = lv
                # the loss is that of the code *before* this step's update
                improved = (best[idx] - lv) > s.early_stop_rel_tol * best[idx].abs().clamp_min(1e-8)
                improved |= ~torch.isfinite(best[idx])
                bi = idx[improved]
                best[bi] = lv[improved]
                best_w[bi] = w[bi]
                since[idx] = torch.where(improved, torch.zeros_like(since[idx]), since[idx] + 1)
                # Adam, per image
                t_img[idx] += 1
                ma = m[idx].mul_(b1).add_(grad, alpha=1 - b1)
                va = v[idx].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                m[idx], v[idx] = ma, va
                tt = t_img[idx].double()
                c1 = (1 - b1 ** tt).float().view(-1, 1, 1)
                c2 = (1 - b2 ** tt).float().view(-1, 1, 1)
                w[idx] = w[idx] - s.lr * (ma / c1) / ((va / c2).sqrt() + ADAM_EPS)
                if s.early_stop_patience > 0:
                    done = since[idx] >= s.early_stop_patience
                    active[idx[done]] = False
                    stopped[idx[done]] = True
            if progress is not None:  # over all chunks of this call
                progress("invert", chunk[0] * s.steps + step + 1, chunk[1] * s.steps)
        if progress is not None:  # every image of the chunk may have stopped early
            progress("invert", (chunk[0] + 1) * s.steps, chunk[1] * s.steps)
        with torch.no_grad():
            # images that ran every step: their last code has not been scored yet
            last = active.nonzero().squeeze(1)
            if last.numel():
                y = G(w[last])
                roi_ncc, _ = ncc_roi_loss(xt[last], y.contiguous(), rt[last],
                                          window=s.ncc_window, lambda_roi=s.lambda1,
                                          lambda_ncc=s.lambda2)
                lv = (s.lambda1 * lpips(xt[last], y) + roi_ncc
                      + s.lambda3 * (w[last] - E(y)).square().mean(dim=(1, 2))).double()
                better = lv < best[last]
                bi = last[better]
                best[bi] = lv[better]
                best_w[bi] = w[bi]
            recon = torch.cat([G(best_w[i:i + EVAL_BATCH]) for i in range(0, n, EVAL_BATCH)])
        log.debug("inversion chunk %d/%d: %d images, %d stopped early, mean steps %.1f",
                  chunk[0] + 1, chunk[1], n, int(stopped.sum()), float(t_img.double().mean()))
        return Inversion(w=best_w.float().cpu().numpy(), recon=recon.float().cpu().numpy(),
                         steps=t_img.cpu().numpy(), loss_init=loss_init.cpu().numpy(),
                         loss=best.cpu().numpy(), stopped_early=stopped.cpu().numpy())

    def info(self) -> dict[str, Any]:
        torch = self.torch
        d = {"backend": self.name, "device": self.device, "torch": torch.__version__}
        if self._device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self._device)
            d["cuda"] = torch.version.cuda
        else:
            d["threads"] = torch.get_num_threads()
        return d

    def close(self) -> None:
        self.programs.clear()
        if self._device.type == "cuda":
            self.torch.cuda.empty_cache()


__all__ = ["TorchBackend", "resolve_torch_device"]
