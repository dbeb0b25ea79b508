// Device code of the CUDA kernel of the fused NCC + ROI-L2 loss (see ../ncc_roi.h for the
// op and ../core/ncc_roi_core.cpp for the formulas and the gradient's derivation).
//
// This header includes no torch header, so that it can be compiled on its own: by nvcc
// (in ncc_roi_cuda_launch.cu, the kernels' raw-pointer entry, which tests/test_ncc_roi.py
// compiles with and without torch's headers) and by a host C++ compiler, where
// tests/native/ncc_roi_emulate.cc runs every block's phases thread by thread on the
// CPU. Each kernel body is therefore written as a sequence of *phases*: a phase is what
// one thread does between two __syncthreads(); the CUDA kernels call the phases with a
// barrier in between, and the emulator runs phase p of all threads of a block before
// phase p + 1, which is exactly the guarantee the barrier gives.
//
// Three launches per call, all on the caller's stream:
//   1. stats (grid: tiles_x, tiles_y, B; kThreads threads; tile kTileH x kTileW centres):
//      x and y tiles with a halo of r in shared memory, shifted by a per-tile constant
//      (the window statistics are shift-invariant when the zero padding is shifted too:
//      n counts every window position), so that the float sums do not cancel; a row pass
//      then a column pass give Sx, Sy, Sxx, Syy, Sxy at every centre; then cc and the
//      per-centre coefficients C = dcc/dSxy, B = dcc/dSyy and E = C mx + 2 B my (local
//      means, relative to a per-image shift), written to coef [B, 3, H, W]; per-tile sums
//      of cc, roi and roi (x - y)^2 (deterministic tree reduction) to partials.
//   2. finalize (one thread per image): sums an image's tile partials in double in tile
//      order (deterministic), writes loss[b] and the ROI term's gradient coefficient.
//   3. grad (same grid): C, B, E tiles with halo in shared memory, row pass then column
//      pass of the same window (the filter is its own adjoint; zero padding), then
//      d loss / d y = roi_coef roi (x - y) - lambda_ncc / HW ((x - x0) W*C + 2 (y - y0) W*B
//      - W*E), with x0, y0 the per-image shift.
// Bytes moved (the benchmark's model): stats reads x, y, roi and writes C, B, E; grad
// reads C, B, E, x, y, roi and writes grad: 13 floats = 52 bytes per pixel (halo re-reads
// hit L2 and are not counted). The ideal single pass (read x, y, roi; write grad) is 16.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DR_HD __host__ __device__ __forceinline__
#else
#define DR_HD inline
#endif

namespace deeprecon {
namespace ncc_cuda {

constexpr int kTileH = 16;      // centres per tile, rows
constexpr int kTileW = 32;      // centres per tile, columns (one warp wide: coalesced rows)
constexpr int kThreads = 256;   // threads per block of the stats and grad kernels
constexpr int kMaxWindow = 25;  // largest window (radius 12): shared memory stays < 48 KiB
constexpr int kFinalizeThreads = 128;
constexpr int kModeBox = 0;
constexpr int kModeGaussian = 1;
constexpr float kEps = 1e-5f;
constexpr int kReduceSteps = 8;  // log2(kThreads)
static_assert((1 << kReduceSteps) == kThreads, "kThreads must be 2^kReduceSteps");
constexpr int kStatsPhases = 3 + kReduceSteps + 1;  // load, row pass, column pass, tree, write
constexpr int kGradPhases = 3;                      // load, row pass, column pass

struct StatsParams {
  const float* x;          // [B, 1, H, W]
  const float* y;          // [B, 1, H, W]
  const float* roi;        // [B or 1, 1, H, W]
  int64_t roi_stride;      // H * W, or 0 when roi is broadcast
  int B, H, W, r;          // r = window / 2
  float taps[kMaxWindow];  // 1D window weights, [2r + 1] used
  float inv_n;             // 1 / sum of the 2D weights
  float* coef;             // out [B, 3, H, W]: C, B, E at every centre
  float* partials;         // out [B, tiles_y * tiles_x, 3]: sum cc, sum roi, sum roi (x-y)^2
};

struct FinalizeParams {
  const float* partials;  // [B, tiles, 3]
  int B, tiles;
  double inv_hw;          // 1 / (H * W)
  double lambda_roi, lambda_ncc;
  float* loss;            // out [B]
  float* roi_coef;        // out [B]: -2 lambda_roi / (sum roi + eps)
};

struct GradParams {
  const float* x;          // [B, 1, H, W]
  const float* y;          // [B, 1, H, W]
  const float* roi;        // [B or 1, 1, H, W]
  int64_t roi_stride;
  const float* coef;       // [B, 3, H, W] from the stats kernel
  const float* roi_coef;   // [B] from the finalize kernel
  int B, H, W, r;
  float taps[kMaxWindow];
  float ncc_coef;          // -lambda_ncc / (H * W)
  float* grad;             // out [B, 1, H, W]
};

DR_HD int tiles_x(int W) { return (W + kTileW - 1) / kTileW; }
DR_HD int tiles_y(int H) { return (H + kTileH - 1) / kTileH; }
DR_HD int halo_h(int r) { return kTileH + 2 * r; }
DR_HD int halo_w(int r) { return kTileW + 2 * r; }

// Shared memory of the stats kernel, in floats: x, y halo tiles; 5 row-filtered planes;
// the 3 x kThreads reduction buffer.
DR_HD int stats_smem_floats(int r) {
  return 2 * halo_h(r) * halo_w(r) + 5 * halo_h(r) * kTileW + 3 * kThreads;
}
// Shared memory of the grad kernel, in floats: 3 coefficient halo tiles; 3 row-filtered planes.
DR_HD int grad_smem_floats(int r) { return 3 * halo_h(r) * halo_w(r) + 3 * halo_h(r) * kTileW; }

// The per-image shift: the values at the image's centre pixel.
DR_HD void image_shift(const float* xb, const float* yb, int H, int W, float* x0, float* y0) {
  const int64_t c = static_cast<int64_t>(H / 2) * W + W / 2;
  *x0 = xb[c];
  *y0 = yb[c];
}

// The per-tile shift: the values at the tile's centre pixel (clamped into the image).
DR_HD void tile_shift(const float* xb, const float* yb, int H, int W, int ty0, int tx0,
                      float* cx, float* cy) {
  const int ci = ty0 + kTileH / 2 < H ? ty0 + kTileH / 2 : H - 1;
  const int cj = tx0 + kTileW / 2 < W ? tx0 + kTileW / 2 : W - 1;
  const int64_t c = static_cast<int64_t>(ci) * W + cj;
  *cx = xb[c];
  *cy = yb[c];
}

// One phase of the stats kernel for thread `tid` of block (bx, by, b). sm: shared memory
// of stats_smem_floats(p.r) floats.
DR_HD void stats_phase(int phase, const StatsParams& p, int bx, int by, int b, int tid,
                       float* sm) {
  const int r = p.r, k = 2 * r + 1, H = p.H, W = p.W;
  const int hh = halo_h(r), hw = halo_w(r);
  const int ty0 = by * kTileH, tx0 = bx * kTileW;
  const int64_t HW = static_cast<int64_t>(H) * W;
  const float* xb = p.x + b * HW;
  const float* yb = p.y + b * HW;
  float* sx = sm;                   // [hh, hw] x - cx (padding: -cx)
  float* sy = sx + hh * hw;         // [hh, hw] y - cy
  float* hs = sy + hh * hw;         // [5, hh, kTileW] row sums
  float* red = hs + 5 * hh * kTileW;  // [3, kThreads]
  const int plane = hh * kTileW;

  if (phase == 0) {  // load the halo tiles
    float cx, cy;
    tile_shift(xb, yb, H, W, ty0, tx0, &cx, &cy);
    for (int i = tid; i < hh * hw; i += kThreads) {
      const int row = i / hw, col = i - row * hw;
      const int gi = ty0 - r + row, gj = tx0 - r + col;
      const bool in = gi >= 0 && gi < H && gj >= 0 && gj < W;
      const int64_t g = static_cast<int64_t>(gi) * W + gj;
      sx[i] = (in ? xb[g] : 0.0f) - cx;
      sy[i] = (in ? yb[g] : 0.0f) - cy;
    }
  } else if (phase == 1) {  // row pass: 5 sums for every (halo row, tile column)
    for (int i = tid; i < plane; i += kThreads) {
      const int row = i / kTileW, col = i - row * kTileW;
      const float* ax = sx + row * hw + col;
      const float* ay = sy + row * hw + col;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f;
      for (int d = 0; d < k; ++d) {
        const float t = p.taps[d], a = ax[d], c = ay[d], ta = t * a, tc = t * c;
        s0 += ta;
        s1 += tc;
        s2 += ta * a;
        s3 += tc * c;
        s4 += ta * c;
      }
      hs[i] = s0;
      hs[plane + i] = s1;
      hs[2 * plane + i] = s2;
      hs[3 * plane + i] = s3;
      hs[4 * plane + i] = s4;
    }
  } else if (phase == 2) {  // column pass, cc, coefficients, per-thread partial sums
    float cx, cy, x0, y0;
    tile_shift(xb, yb, H, W, ty0, tx0, &cx, &cy);
    image_shift(xb, yb, H, W, &x0, &y0);
    const float dx = cx - x0, dy = cy - y0;  // tile shift relative to the image shift
    const float* rb = p.roi + b * p.roi_stride;
    float* cb = p.coef + b * 3 * HW;
    const float inv_n = p.inv_n;
    float acc_cc = 0.f, acc_roi = 0.f, acc_err = 0.f;
    for (int i = tid; i < kTileH * kTileW; i += kThreads) {
      const int row = i / kTileW, col = i - row * kTileW;
      const int gi = ty0 + row, gj = tx0 + col;
      if (gi >= H || gj >= W) continue;
      float s[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
      for (int d = 0; d < k; ++d) {
        const float t = p.taps[d];
        const int o = (row + d) * kTileW + col;
        for (int c = 0; c < 5; ++c) s[c] += t * hs[c * plane + o];
      }
      const float cross = s[4] - s[0] * s[1] * inv_n;
      const float varx = s[2] - s[0] * s[0] * inv_n;
      const float vary = s[3] - s[1] * s[1] * inv_n;
      const float inv_d = 1.0f / (varx * vary + kEps);
      const float cc = cross * cross * inv_d;
      const float C = 2.0f * cross * inv_d;
      const float Bc = -cc * varx * inv_d;
      const float mx = s[0] * inv_n + dx, my = s[1] * inv_n + dy;  // local means - (x0, y0)
      const int64_t g = static_cast<int64_t>(gi) * W + gj;
      cb[g] = C;
      cb[HW + g] = Bc;
      cb[2 * HW + g] = C * mx + 2.0f * Bc * my;
      const float rv = rb[g], e = xb[g] - yb[g];
      acc_cc += cc;
      acc_roi += rv;
      acc_err += rv * e * e;
    }
    red[tid] = acc_cc;
    red[kThreads + tid] = acc_roi;
    red[2 * kThreads + tid] = acc_err;
  } else if (phase < 3 + kReduceSteps) {  // tree reduction, fixed order
    const int s = kThreads >> (phase - 2);
    if (tid < s)
      for (int c = 0; c < 3; ++c) red[c * kThreads + tid] += red[c * kThreads + tid + s];
  } else if (phase == 3 + kReduceSteps && tid == 0) {  // this tile's partial sums
    const int64_t t = static_cast<int64_t>(b) * tiles_x(W) * tiles_y(H) +
                      static_cast<int64_t>(by) * tiles_x(W) + bx;
    for (int c = 0; c < 3; ++c) p.partials[t * 3 + c] = red[c * kThreads];
  }
}

// The finalize step of image b (one thread).
DR_HD void finalize_image(const FinalizeParams& p, int b) {
  double cc = 0.0, sroi = 0.0, serr = 0.0;
  const float* t = p.partials + static_cast<int64_t>(b) * p.tiles * 3;
  for (int i = 0; i < p.tiles; ++i) {
    cc += t[3 * i];
    sroi += t[3 * i + 1];
    serr += t[3 * i + 2];
  }
  const double inv_den = 1.0 / (sroi + static_cast<double>(kEps));
  p.loss[b] = static_cast<float>(p.lambda_roi * serr * inv_den - p.lambda_ncc * cc * p.inv_hw);
  p.roi_coef[b] = static_cast<float>(-2.0 * p.lambda_roi * inv_den);
}

// One phase of the grad kernel for thread `tid` of block (bx, by, b). sm: shared memory
// of grad_smem_floats(p.r) floats.
DR_HD void grad_phase(int phase, const GradParams& p, int bx, int by, int b, int tid,
                      float* sm) {
  const int r = p.r, k = 2 * r + 1, H = p.H, W = p.W;
  const int hh = halo_h(r), hw = halo_w(r);
  const int ty0 = by * kTileH, tx0 = bx * kTileW;
  const int64_t HW = static_cast<int64_t>(H) * W;
  const float* cb = p.coef + b * 3 * HW;
  float* ct = sm;                   // [3, hh, hw] C, B, E (zero outside the image)
  float* hs = ct + 3 * hh * hw;     // [3, hh, kTileW] row sums
  const int plane = hh * kTileW;

  if (phase == 0) {  // load the halo tiles of C, B, E
    for (int i = tid; i < hh * hw; i += kThreads) {
      const int row = i / hw, col = i - row * hw;
      const int gi = ty0 - r + row, gj = tx0 - r + col;
      const bool in = gi >= 0 && gi < H && gj >= 0 && gj < W;
      const int64_t g = static_cast<int64_t>(gi) * W + gj;
      for (int c = 0; c < 3; ++c) ct[c * hh * hw + i] = in ? cb[c * HW + g] : 0.0f;
    }
  } else if (phase == 1) {  // row pass
    for (int i = tid; i < plane; i += kThreads) {
      const int row = i / kTileW, col = i - row * kTileW;
      for (int c = 0; c < 3; ++c) {
        const float* a = ct + c * hh * hw + row * hw + col;
        float s = 0.f;
        for (int d = 0; d < k; ++d) s += p.taps[d] * a[d];
        hs[c * plane + i] = s;
      }
    }
  } else if (phase == 2) {  // column pass and the gradient
    float x0, y0;
    image_shift(p.x + b * HW, p.y + b * HW, H, W, &x0, &y0);
    const float* xb = p.x + b * HW;
    const float* yb = p.y + b * HW;
    const float* rb = p.roi + b * p.roi_stride;
    float* gb = p.grad + b * HW;
    const float roi_coef = p.roi_coef[b], ncc_coef = p.ncc_coef;
    for (int i = tid; i < kTileH * kTileW; i += kThreads) {
      const int row = i / kTileW, col = i - row * kTileW;
      const int gi = ty0 + row, gj = tx0 + col;
      if (gi >= H || gj >= W) continue;
      float f[3] = {0.f, 0.f, 0.f};
      for (int d = 0; d < k; ++d) {
        const float t = p.taps[d];
        const int o = (row + d) * kTileW + col;
        for (int c = 0; c < 3; ++c) f[c] += t * hs[c * plane + o];
      }
      const int64_t g = static_cast<int64_t>(gi) * W + gj;
      const float xv = xb[g], yv = yb[g];
      const float dncc = (xv - x0) * f[0] + 2.0f * (yv - y0) * f[1] - f[2];
      gb[g] = roi_coef * rb[g] * (xv - yv) + ncc_coef * dncc;
    }
  }
}

// Host: the window's 1D taps (as float) and 1 / n, with n = (sum of the taps)^2 taken in
// double, as the CPU kernel and the reference do. Returns false for a bad window or mode.
inline bool fill_window(int window, int mode, double sigma, float* taps, float* inv_n) {
  if (window < 1 || window % 2 == 0 || window > kMaxWindow) return false;
  if (mode != kModeBox && mode != kModeGaussian) return false;
  const int r = window / 2;
  double s = 0.0;
  for (int d = -r; d <= r; ++d) {
    const double t = mode == kModeBox ? 1.0 : std::exp(-double(d) * d / (2.0 * sigma * sigma));
    taps[d + r] = static_cast<float>(t);
    s += t;
  }
  for (int i = window; i < kMaxWindow; ++i) taps[i] = 0.0f;
  *inv_n = static_cast<float>(1.0 / (s * s));
  return true;
}

}  // namespace ncc_cuda
}  // namespace deeprecon
