// The CUDA kernel of the fused NCC + ROI-L2 loss on raw device pointers and a stream
// (the C ABI of ncc_roi_cuda_launch.h; no torch header here). The device code, its tiling
// and its byte count are in ncc_roi_kernels.cuh; the formulas in ../core/ncc_roi_core.cpp.
//
// Three launches, all on the caller's stream: stats, finalize, grad. The workspace holds
// coef [B, 3, H, W] (C, B, E per centre), the tile partials [B, tiles, 3] and the ROI
// term's coefficient [B], each at a 256-byte boundary.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "../core/ncc_roi_core.h"
#include "ncc_roi_cuda_launch.h"
#include "ncc_roi_kernels.cuh"

namespace deeprecon {
namespace {

namespace k = ncc_cuda;
static_assert(k::kModeBox == core::kModeBox && k::kModeGaussian == core::kModeGaussian,
              "mode codes of the CPU and CUDA kernels differ");

constexpr int kEinval = 1;  // DEEPRECON_NCC_EINVAL of ../capi/ncc_core_capi.h
constexpr int kEfail = 2;   // DEEPRECON_NCC_EFAIL
constexpr size_t kAlign = 256;

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

size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Byte sizes of the three parts of the workspace.
void workspace_parts(int64_t B, int64_t H, int64_t W, size_t* coef, size_t* partials,
                     size_t* roi_coef) {
  const int64_t tiles = static_cast<int64_t>(k::tiles_x(static_cast<int>(W))) *
                        k::tiles_y(static_cast<int>(H));
  *coef = aligned(sizeof(float) * static_cast<size_t>(B * 3 * H * W));
  *partials = aligned(sizeof(float) * static_cast<size_t>(B * tiles * 3));
  *roi_coef = aligned(sizeof(float) * static_cast<size_t>(B));
}

void set_error(char* err, int64_t err_len, const std::string& message) {
  if (err == nullptr || err_len <= 0) return;
  const size_t n = std::min(message.size(), static_cast<size_t>(err_len - 1));
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

std::string check_args(int64_t B, int64_t roi_batch, int64_t H, int64_t W, int64_t window,
                       int64_t mode, double sigma) {
  std::string m = core::check_sizes(B, roi_batch, H, W);
  if (m.empty()) m = core::check_scalar_args(window, mode, sigma);
  if (!m.empty()) return m;
  if (window > k::kMaxWindow)
    return "ncc_roi_loss: window must be <= " + std::to_string(k::kMaxWindow) +
           " for the CUDA kernel, got " + std::to_string(window);
  if (B > 65535)
    return "ncc_roi_loss: the CUDA kernel takes at most 65535 images, x has B = " +
           std::to_string(B);
  if (H > (1 << 24) || W > (1 << 24))
    return "ncc_roi_loss: x is too large for the CUDA kernel, got H = " + std::to_string(H) +
           ", W = " + std::to_string(W);
  return "";
}

bool launch_failed(const char* which, char* err, int64_t err_len) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return false;
  set_error(err, err_len, std::string("ncc_roi_loss: the ") + which +
                              " kernel did not launch: " + cudaGetErrorString(e));
  return true;
}

}  // namespace
}  // namespace deeprecon

extern "C" {

size_t deeprecon_ncc_roi_loss_cuda_workspace_bytes(int64_t B, int64_t H, int64_t W) {
  if (B < 0 || H < 1 || W < 1 || H > (1 << 24) || W > (1 << 24)) return 0;
  size_t coef, partials, roi_coef;
  deeprecon::workspace_parts(B, H, W, &coef, &partials, &roi_coef);
  return coef + partials + roi_coef;
}

int deeprecon_ncc_roi_loss_cuda(const float* x, const float* y, const float* roi, int64_t B,
                                int64_t roi_batch, int64_t H, int64_t W, int64_t window,
                                int64_t mode, double sigma, double lambda_roi,
                                double lambda_ncc, float* loss, float* grad, void* workspace,
                                size_t workspace_bytes, void* stream_ptr, char* err,
                                int64_t err_len) {
  namespace k = deeprecon::ncc_cuda;
  using deeprecon::kEfail;
  using deeprecon::kEinval;
  const std::string bad = deeprecon::check_args(B, roi_batch, H, W, window, mode, sigma);
  if (!bad.empty()) {
    deeprecon::set_error(err, err_len, bad);
    return kEinval;
  }
  if (B == 0) {
    deeprecon::set_error(err, err_len, "");
    return 0;
  }
  size_t coef_bytes, partials_bytes, roi_coef_bytes;
  deeprecon::workspace_parts(B, H, W, &coef_bytes, &partials_bytes, &roi_coef_bytes);
  if (x == nullptr || y == nullptr || roi == nullptr || loss == nullptr || grad == nullptr ||
      workspace == nullptr) {
    deeprecon::set_error(err, err_len,
                         "ncc_roi_loss: a null pointer among x, y, roi, loss, grad, workspace");
    return kEinval;
  }
  if (workspace_bytes < coef_bytes + partials_bytes + roi_coef_bytes ||
      reinterpret_cast<uintptr_t>(workspace) % deeprecon::kAlign != 0) {
    deeprecon::set_error(err, err_len,
                         "ncc_roi_loss: the workspace must be 256-byte aligned and hold " +
                             std::to_string(coef_bytes + partials_bytes + roi_coef_bytes) +
                             " bytes, got " + std::to_string(workspace_bytes));
    return kEinval;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  char* ws = static_cast<char*>(workspace);
  const int64_t HW = H * W;
  const int r = static_cast<int>(window / 2);
  const int tx = k::tiles_x(static_cast<int>(W)), ty = k::tiles_y(static_cast<int>(H));

  k::StatsParams sp{};
  if (!k::fill_window(static_cast<int>(window), static_cast<int>(mode), sigma, sp.taps,
                      &sp.inv_n)) {
    deeprecon::set_error(err, err_len, "ncc_roi_loss: invalid window or mode");
    return kEinval;
  }
  sp.x = x;
  sp.y = y;
  sp.roi = roi;
  sp.roi_stride = roi_batch == 1 ? 0 : HW;
  sp.B = static_cast<int>(B);
  sp.H = static_cast<int>(H);
  sp.W = static_cast<int>(W);
  sp.r = r;
  sp.coef = reinterpret_cast<float*>(ws);
  sp.partials = reinterpret_cast<float*>(ws + coef_bytes);
  const dim3 grid(tx, ty, static_cast<unsigned>(B));
  const size_t stats_smem = sizeof(float) * k::stats_smem_floats(r);
  deeprecon::ncc_stats_kernel<<<grid, k::kThreads, stats_smem, stream>>>(sp);
  if (deeprecon::launch_failed("stats", err, err_len)) return kEfail;

  k::FinalizeParams fp{};
  fp.partials = sp.partials;
  fp.B = sp.B;
  fp.tiles = tx * ty;
  fp.inv_hw = 1.0 / static_cast<double>(HW);
  fp.lambda_roi = lambda_roi;
  fp.lambda_ncc = lambda_ncc;
  fp.loss = loss;
  fp.roi_coef = reinterpret_cast<float*>(ws + coef_bytes + partials_bytes);
  const int fblocks = static_cast<int>((B + k::kFinalizeThreads - 1) / k::kFinalizeThreads);
  deeprecon::ncc_finalize_kernel<<<fblocks, k::kFinalizeThreads, 0, stream>>>(fp);
  if (deeprecon::launch_failed("finalize", err, err_len)) return kEfail;

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
  gp.grad = grad;
  const size_t grad_smem = sizeof(float) * k::grad_smem_floats(r);
  deeprecon::ncc_grad_kernel<<<grid, k::kThreads, grad_smem, stream>>>(gp);
  if (deeprecon::launch_failed("grad", err, err_len)) return kEfail;
  deeprecon::set_error(err, err_len, "");
  return 0;
}

}  // extern "C"
