// Fused NCC + ROI-L2 loss and its gradient with respect to y: declarations of the torch
// binding shared by the CPU op (ncc_roi.cpp) and the CUDA op (cuda/ncc_roi_cuda.cu). The
// kernels themselves take raw pointers and know nothing of torch: core/ncc_roi_core.h
// (CPU) and cuda/ncc_roi_cuda_launch.h (CUDA).
//
// Schema (one, in TORCH_LIBRARY(deeprecon, ...)):
//   deeprecon::ncc_roi_loss(Tensor x, Tensor y, Tensor roi, int window, int mode,
//                           float sigma, float lambda_roi, float lambda_ncc)
//       -> (Tensor loss, Tensor grad_y)
//   x, y      float32 [B, 1, H, W], contiguous, same device
//   roi       float32 [B, 1, H, W] or [1, 1, H, W] (broadcast over B), weights in [0, 1]
//   window    odd k >= 1; the window is k x k, centred, zero padding
//   mode      0 = box (n = k*k), 1 = gaussian (weights exp(-d^2/(2 sigma^2)) separable,
//             radius k/2, not normalised; n = sum of the 2D weights)
//   loss      float32 [B]: lambda_roi * roi_l2_b - lambda_ncc * ncc_b
//   grad_y    float32 [B, 1, H, W]: d loss_b / d y
// The formulas are in cpp_ext/reference.py, the specification.
#pragma once

#include <ATen/core/Tensor.h>

#include "core/ncc_roi_core.h"

namespace deeprecon {

using core::kModeBox;
using core::kModeGaussian;
using core::kNccEps;

// Checks every argument at the kernel boundary; each failure names the argument.
void check_ncc_roi_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& roi,
                        int64_t window, int64_t mode, double sigma, c10::DeviceType device);

}  // namespace deeprecon
