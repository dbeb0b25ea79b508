// Test harness, not part of the extension: runs the CUDA kernel's device code
// (ncc_roi_kernels.cuh) on the CPU, block by block and phase by phase, with the same
// grid, tiling, shared-memory layout and launch sequence as ncc_roi_cuda.cu. Shared
// memory is filled with NaN before every block, so that a read of a shared value no
// phase wrote shows up in the results. tests/test_ncc_roi.py compiles it with the host
// C++ compiler into a shared library and calls it through ctypes: the kernel's indexing,
// halos, reductions and numerics are checked against the reference on a machine with no
// GPU. (Races between threads of one phase are not detected; the phases are written so
// that threads of a phase write disjoint locations.)
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ncc_roi_kernels.cuh"

using namespace deeprecon::ncc_cuda;

extern "C" {

// x, y: [B, 1, H, W]; roi: [roi_b, 1, H, W] with roi_b in {1, B}; outputs loss [B] and
// grad [B, 1, H, W]. Returns 0, or -1 for an argument the CUDA kernel rejects.
int deeprecon_ncc_roi_emulate(const float* x, const float* y, const float* roi, int B, int roi_b,
                              int H, int W, int window, int mode, double sigma,
                              double lambda_roi, double lambda_ncc, float* loss, float* grad) {
  if (B < 1 || H < 1 || W < 1 || (roi_b != 1 && roi_b != B)) return -1;
  StatsParams sp{};
  if (!fill_window(window, mode, sigma, sp.taps, &sp.inv_n)) return -1;
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int tx = tiles_x(W), ty = tiles_y(H), r = window / 2;
  std::vector<float> coef(static_cast<size_t>(B) * 3 * HW, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> partials(static_cast<size_t>(B) * tx * ty * 3);
  std::vector<float> roi_coef(B);

  sp.x = x;
  sp.y = y;
  sp.roi = roi;
  sp.roi_stride = roi_b == 1 ? 0 : HW;
  sp.B = B;
  sp.H = H;
  sp.W = W;
  sp.r = r;
  sp.coef = coef.data();
  sp.partials = partials.data();

  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> sm(stats_smem_floats(r));
  for (int b = 0; b < B; ++b)
    for (int by = 0; by < ty; ++by)
      for (int bx = 0; bx < tx; ++bx) {
        std::fill(sm.begin(), sm.end(), nan);
        for (int ph = 0; ph < kStatsPhases; ++ph)
          for (int tid = 0; tid < kThreads; ++tid) stats_phase(ph, sp, bx, by, b, tid, sm.data());
      }

  FinalizeParams fp{};
  fp.partials = partials.data();
  fp.B = B;
  fp.tiles = tx * ty;
  fp.inv_hw = 1.0 / static_cast<double>(HW);
  fp.lambda_roi = lambda_roi;
  fp.lambda_ncc = lambda_ncc;
  fp.loss = loss;
  fp.roi_coef = roi_coef.data();
  for (int b = 0; b < B; ++b) finalize_image(fp, b);

  GradParams gp{};
  gp.x = x;
  gp.y = y;
  gp.roi = roi;
  gp.roi_stride = sp.roi_stride;
  gp.coef = coef.data();
  gp.roi_coef = roi_coef.data();
  gp.B = B;
  gp.H = H;
  gp.W = W;
  gp.r = r;
  for (int i = 0; i < kMaxWindow; ++i) gp.taps[i] = sp.taps[i];
  gp.ncc_coef = static_cast<float>(-lambda_ncc / static_cast<double>(HW));
  gp.grad = grad;
  std::vector<float> gm(grad_smem_floats(r));
  for (int b = 0; b < B; ++b)
    for (int by = 0; by < ty; ++by)
      for (int bx = 0; bx < tx; ++bx) {
        std::fill(gm.begin(), gm.end(), nan);
        for (int ph = 0; ph < kGradPhases; ++ph)
          for (int tid = 0; tid < kThreads; ++tid) grad_phase(ph, gp, bx, by, b, tid, gm.data());
      }
  return 0;
}

}  // extern "C"
