// Fused NCC + ROI-L2 loss and its gradient with respect to y: the raw-pointer CPU core.
//
// No torch (ATen, c10) and no Python here: plain float32 arrays in, plain float32 arrays
// out, double accumulation. Two thin bindings call it:
//   - ../ncc_roi.cpp: the TORCH_LIBRARY op deeprecon::ncc_roi_loss (library _C), which
//     checks the tensors and runs the core on torch's thread pool (at::parallel_for);
//   - ../capi/ncc_core_capi.cpp: a C ABI (library _ncc_core, no libtorch), called through
//     ctypes by deeprecon.cpp_ext.numpy_ops, which runs the core on OpenMP.
// The formulas and the gradient's derivation are in ncc_roi_core.cpp; the specification is
// cpp_ext/reference.py.
//
// Layout: x, y float32 [B, 1, H, W] contiguous (row-major); roi float32 [roi_batch, 1, H, W]
// contiguous with roi_batch in {1, B} (1: shared by all images); loss float32 [B];
// grad float32 [B, 1, H, W] = d loss_b / d y.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace deeprecon {
namespace core {

constexpr int64_t kModeBox = 0;
constexpr int64_t kModeGaussian = 1;
constexpr double kNccEps = 1e-5;

// How the core spreads work over threads. `run(n, body)` must call body(begin, end) on
// disjoint ranges covering [0, n) (concurrently or not) and return when all are done; an
// empty `run` runs everything serially. `threads` is how many threads `run` uses: the
// core parallelises over images when B >= threads, otherwise over the rows of each image.
// Results are bitwise the same for any `threads` and any split of the ranges.
struct Parallel {
  int64_t threads = 1;
  std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)> run;
};

// The checks of the scalar arguments; "" if they are valid, else a message naming the
// argument ("ncc_roi_loss: window must be a positive odd integer, got 4").
std::string check_scalar_args(int64_t window, int64_t mode, double sigma);

// The checks of the sizes (B >= 0, H >= 1, W >= 1, roi_batch in {1, B}, no overflow of
// B * H * W); "" if they are valid, else a message.
std::string check_sizes(int64_t B, int64_t roi_batch, int64_t H, int64_t W);

// The 1D taps of the separable window (k of them) and n, the sum of the 2D weights.
std::vector<double> window_taps(int64_t window, int64_t mode, double sigma, double* n);

// loss[b] and grad[b] for every image b. The arguments must have passed the checks above
// (not repeated here). Allocates only its scratch (8 H W + 3 H doubles per thread).
void ncc_roi_loss_cpu(const float* x, const float* y, const float* roi, int64_t B,
                      int64_t roi_batch, int64_t H, int64_t W, int64_t window, int64_t mode,
                      double sigma, double lambda_roi, double lambda_ncc, float* loss,
                      float* grad, const Parallel& parallel);

}  // namespace core
}  // namespace deeprecon
