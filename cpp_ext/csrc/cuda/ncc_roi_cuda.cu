// CUDA kernel of the fused NCC + ROI-L2 loss and its gradient with respect to y
// (schema in ../ncc_roi.cpp, formulas in ../ncc_roi.h and cpp_ext/reference.py; the
// device code, its tiling and its byte count are in ncc_roi_kernels.cuh).
//
// Three launches, all on the current CUDA stream of x's device: stats, finalize, grad.
// The stream comes from c10::cuda::getCurrentCUDAStream (what at::cuda::getCurrentCUDAStream
// forwards to); the c10/cuda headers are used instead of ATen/cuda/CUDAContext.h so that
// this file compiles without the cuBLAS/cuSPARSE headers (the test compiles it with nvcc
// against the CPU wheel's headers).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../ncc_roi.h"
#include "ncc_roi_kernels.cuh"

namespace deeprecon {
namespace {

namespace k = ncc_cuda;
static_assert(k::kModeBox == kModeBox && k::kModeGaussian == kModeGaussian,
              "mode codes of the CPU and CUDA kernels differ");

__global__ void __launch_bounds__(k::kThreads) ncc_stats_kernel(const k::StatsParams p) {
  extern __shared__ float sm[];
#pragma unroll
  for (int ph = 0; ph < k::kStatsPhases; ++ph) {
    k::stats_phase(ph, p, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, sm);
    __syncthreads();
  }
}

__global__ void ncc_finalize_kernel(const k::FinalizeParams p) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b < p.B) k::finalize_image(p, b);
}

__global__ void __launch_bounds__(k::kThreads) ncc_grad_kernel(const k::GradParams p) {
  extern __shared__ float sm[];
#pragma unroll
  for (int ph = 0; ph < k::kGradPhases; ++ph) {
    k::grad_phase(ph, p, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, sm);
    __syncthreads();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ncc_roi_loss_cuda(const at::Tensor& x, const at::Tensor& y,
                                                     const at::Tensor& roi, int64_t window,
                                                     int64_t mode, double sigma,
                                                     double lambda_roi, double lambda_ncc) {
  check_ncc_roi_args(x, y, roi, window, mode, sigma, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(window <= k::kMaxWindow, "ncc_roi_loss: window must be <= ", k::kMaxWindow,
                    " for the CUDA kernel, got ", window);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3), HW = H * W;
  TORCH_CHECK_VALUE(B <= 65535, "ncc_roi_loss: the CUDA kernel takes at most 65535 images, "
                    "x has B = ", B);
  TORCH_CHECK_VALUE(H <= (1 << 24) && W <= (1 << 24), "ncc_roi_loss: x is too large, got ",
                    x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor loss = at::empty({B}, x.options());  // [B]
  at::Tensor grad = at::empty_like(y);            // [B, 1, H, W]
  if (B == 0) return {loss, grad};

  const int r = static_cast<int>(window / 2);
  const int tx = k::tiles_x(static_cast<int>(W)), ty = k::tiles_y(static_cast<int>(H));
  at::Tensor coef = at::empty({B, 3, H, W}, x.options());    // C, B, E per centre
  at::Tensor partials = at::empty({B, ty * tx, 3}, x.options());
  at::Tensor roi_coef = at::empty({B}, x.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  k::StatsParams sp{};
  TORCH_INTERNAL_ASSERT(k::fill_window(static_cast<int>(window), static_cast<int>(mode), sigma,
                                       sp.taps, &sp.inv_n));
  sp.x = x.data_ptr<float>();
  sp.y = y.data_ptr<float>();
  sp.roi = roi.data_ptr<float>();
  sp.roi_stride = roi.size(0) == 1 ? 0 : HW;
  sp.B = static_cast<int>(B);
  sp.H = static_cast<int>(H);
  sp.W = static_cast<int>(W);
  sp.r = r;
  sp.coef = coef.data_ptr<float>();
  sp.partials = partials.data_ptr<float>();
  const dim3 grid(tx, ty, static_cast<unsigned>(B));
  const size_t stats_smem = sizeof(float) * k::stats_smem_floats(r);
  ncc_stats_kernel<<<grid, k::kThreads, stats_smem, stream>>>(sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  k::FinalizeParams fp{};
  fp.partials = sp.partials;
  fp.B = sp.B;
  fp.tiles = tx * ty;
  fp.inv_hw = 1.0 / static_cast<double>(HW);
  fp.lambda_roi = lambda_roi;
  fp.lambda_ncc = lambda_ncc;
  fp.loss = loss.data_ptr<float>();
  fp.roi_coef = roi_coef.data_ptr<float>();
  const int fblocks = static_cast<int>((B + k::kFinalizeThreads - 1) / k::kFinalizeThreads);
  ncc_finalize_kernel<<<fblocks, k::kFinalizeThreads, 0, stream>>>(fp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  k::GradParams gp{};
  gp.x = sp.x;
  gp.y = sp.y;
  gp.roi = sp.roi;
  gp.roi_stride = sp.roi_stride;
  gp.coef = sp.coef;
  gp.roi_coef = fp.roi_coef;
  gp.B = sp.B;
  gp.H = sp.H;
  gp.W = sp.W;
  gp.r = r;
  for (int i = 0; i < k::kMaxWindow; ++i) gp.taps[i] = sp.taps[i];
  gp.ncc_coef = static_cast<float>(-lambda_ncc / static_cast<double>(HW));
  gp.grad = grad.data_ptr<float>();
  const size_t grad_smem = sizeof(float) * k::grad_smem_floats(r);
  ncc_grad_kernel<<<grid, k::kThreads, grad_smem, stream>>>(gp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(deeprecon, CUDA, m) { m.impl("ncc_roi_loss", &ncc_roi_loss_cuda); }

}  // namespace deeprecon
