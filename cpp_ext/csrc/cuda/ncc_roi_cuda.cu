// CUDA kernel of the fused NCC + ROI-L2 loss and its gradient with respect to y: the torch
// binding (schema in ../ncc_roi.cpp, formulas in ../core/ncc_roi_core.cpp and
// cpp_ext/reference.py). The kernel itself is the raw-pointer C entry of
// ncc_roi_cuda_launch.cu; this file checks the tensors, allocates the outputs and the
// workspace (torch's caching allocator) and runs it on the current CUDA stream of x's
// device. The stream comes from c10::cuda::getCurrentCUDAStream (what
// at::cuda::getCurrentCUDAStream forwards to); the c10/cuda headers are used instead of
// ATen/cuda/CUDAContext.h so that this file compiles without the cuBLAS/cuSPARSE headers
// (the test compiles it with nvcc against the CPU wheel's headers).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../ncc_roi.h"
#include "ncc_roi_cuda_launch.h"
#include "ncc_roi_kernels.cuh"

namespace deeprecon {

std::tuple<at::Tensor, at::Tensor> ncc_roi_loss_cuda(const at::Tensor& x, const at::Tensor& y,
                                                     const at::Tensor& roi, int64_t window,
                                                     int64_t mode, double sigma,
                                                     double lambda_roi, double lambda_ncc) {
  namespace k = ncc_cuda;
  check_ncc_roi_args(x, y, roi, window, mode, sigma, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(window <= k::kMaxWindow, "ncc_roi_loss: window must be <= ", k::kMaxWindow,
                    " for the CUDA kernel, got ", window);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(B <= 65535, "ncc_roi_loss: the CUDA kernel takes at most 65535 images, "
                    "x has B = ", B);
  TORCH_CHECK_VALUE(H <= (1 << 24) && W <= (1 << 24), "ncc_roi_loss: x is too large, got ",
                    x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor loss = at::empty({B}, x.options());  // [B]
  at::Tensor grad = at::empty_like(y);            // [B, 1, H, W]
  if (B == 0) return {loss, grad};

  const size_t bytes = deeprecon_ncc_roi_loss_cuda_workspace_bytes(B, H, W);
  // the caching allocator's blocks are 512-byte aligned, as the entry needs
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  char err[512];
  const int rc = deeprecon_ncc_roi_loss_cuda(
      x.data_ptr<float>(), y.data_ptr<float>(), roi.data_ptr<float>(), B, roi.size(0), H, W,
      window, mode, sigma, lambda_roi, lambda_ncc, loss.data_ptr<float>(),
      grad.data_ptr<float>(), workspace.data_ptr(), bytes, stream, err, sizeof(err));
  TORCH_CHECK_VALUE(rc != 1, err);  // DEEPRECON_NCC_EINVAL
  TORCH_CHECK(rc == 0, err);        // a launch error
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(deeprecon, CUDA, m) { m.impl("ncc_roi_loss", &ncc_roi_loss_cuda); }

}  // namespace deeprecon
