// Fused NCC + ROI-L2 loss and its gradient with respect to y: the raw-pointer CPU core
// (no torch; see ncc_roi_core.h for its two bindings). The specification is
// cpp_ext/reference.py; the formulas are repeated here.
//
// Per image (x, y, roi [H, W]; window weights w with n = sum of w; eps = 1e-5):
//   S_f   = sum_{q in win(p)} w(p - q) f(q)  for f in {x, y, xx, yy, xy}, zero padding
//   cross = Sxy - Sx Sy / n,  varx = Sxx - Sx^2 / n,  vary = Syy - Sy^2 / n
//   D     = varx vary + eps,  cc = cross^2 / D,  ncc = mean_p cc
//   roi_l2 = sum roi (x - y)^2 / (sum roi + eps)
//   loss  = lambda_roi roi_l2 - lambda_ncc ncc
// Gradient with respect to y at pixel q: with, at every centre p,
//   C_p = d cc / d Sxy = 2 cross / D
//   B_p = d cc / d Syy = -cc varx / D
//   A_p = d cc / d Sy  = -C_p Sx / n - 2 B_p Sy / n
// d ncc / d y_q = (1 / HW) sum_{p : q in win(p)} w(p - q) (A_p + 2 B_p y_q + C_p x_q)
//              = (1 / HW) (W*A + 2 y_q W*B + x_q W*C)(q)
// where W* is the same zero-padded window filter (w is symmetric, so the filter is its
// own adjoint; centres outside the image contribute nothing, hence zero padding of
// A, B, C). d roi_l2 / d y_q = -2 roi_q (x_q - y_q) / (sum roi + eps).
//
// The kernel: per image, four separable passes over rows (window sums in double, box
// windows by running sums), producing the loss and the gradient in one call. Parallel
// over images when the batch has at least as many images as threads, otherwise over
// the rows of each image, in fixed blocks of rows; row partial sums are reduced in row
// order: the results are bitwise the same for any number of threads.
#include "ncc_roi_core.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace deeprecon {
namespace core {

std::string check_scalar_args(int64_t window, int64_t mode, double sigma) {
  std::ostringstream s;
  if (window < 1 || window % 2 != 1) {
    s << "ncc_roi_loss: window must be a positive odd integer, got " << window;
  } else if (mode != kModeBox && mode != kModeGaussian) {
    s << "ncc_roi_loss: mode must be 0 (box) or 1 (gaussian), got " << mode;
  } else if (mode == kModeGaussian && !(std::isfinite(sigma) && sigma > 0.0)) {
    s << "ncc_roi_loss: sigma must be finite and > 0 for the gaussian window, got " << sigma;
  }
  return s.str();
}

std::string check_sizes(int64_t B, int64_t roi_batch, int64_t H, int64_t W) {
  std::ostringstream s;
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  if (B < 0 || H < 1 || W < 1) {
    s << "ncc_roi_loss: x must have shape [B, 1, H, W] with B >= 0, H >= 1 and W >= 1, got ["
      << B << ", 1, " << H << ", " << W << "]";
  } else if (roi_batch != 1 && roi_batch != B) {
    s << "ncc_roi_loss: roi must have shape [B, 1, H, W] or [1, 1, H, W] with B = " << B
      << ", got a batch of " << roi_batch;
  } else if (H > kMax / W || (B > 0 && H * W > kMax / 8 / B)) {
    s << "ncc_roi_loss: x is too large, got [" << B << ", 1, " << H << ", " << W << "]";
  }
  return s.str();
}

std::vector<double> window_taps(int64_t window, int64_t mode, double sigma, double* n) {
  const int64_t r = window / 2;
  std::vector<double> taps(window, 1.0);
  if (mode == kModeGaussian) {
    for (int64_t d = -r; d <= r; ++d)
      taps[d + r] = std::exp(-static_cast<double>(d * d) / (2.0 * sigma * sigma));
  }
  double s = 0.0;
  for (double t : taps) s += t;
  *n = s * s;
  return taps;
}

namespace {

struct Window {
  std::vector<double> taps;  // [k]
  int64_t k = 1, r = 0;
  bool box = true;
  double n = 1.0;
};

// out[j] = sum_d taps[d] * pad[j + d] for j in [0, W): pad is a row of W values with
// r zeros on each side (length W + 2r).
inline void filter_padded_row(const double* pad, double* out, int64_t W, const Window& w) {
  const int64_t k = w.k;
  if (w.box) {  // running sum
    double s = 0.0;
    for (int64_t d = 0; d < k; ++d) s += pad[d];
    out[0] = s;
    for (int64_t j = 1; j < W; ++j) {
      s += pad[j + k - 1] - pad[j - 1];
      out[j] = s;
    }
  } else {
    const double* t = w.taps.data();
    for (int64_t j = 0; j < W; ++j) {
      double s = 0.0;
      for (int64_t d = 0; d < k; ++d) s += t[d] * pad[j + d];
      out[j] = s;
    }
  }
}

// Column (vertical) window over C planes [H, W]: after at_row(i), acc[c * W + j] =
// sum_d taps[d] * plane_c[i + d - r][j], rows outside [0, H) counting as zero. For box
// windows consecutive rows slide the running sum (add the entering row, subtract the
// leaving one); otherwise every row is summed afresh.
template <int C>
struct ColumnWindow {
  const Window& w;
  const double* planes[C];
  int64_t H, W;
  double* acc;  // [C, W]

  void at_row(int64_t i, bool first) {
    if (w.box && !first) {
      const int64_t enter = i + w.r, leave = i - 1 - w.r;
      if (enter < H)
        for (int c = 0; c < C; ++c) {
          const double* src = planes[c] + enter * W;
          double* a = acc + c * W;
          for (int64_t j = 0; j < W; ++j) a[j] += src[j];
        }
      if (leave >= 0)
        for (int c = 0; c < C; ++c) {
          const double* src = planes[c] + leave * W;
          double* a = acc + c * W;
          for (int64_t j = 0; j < W; ++j) a[j] -= src[j];
        }
      return;
    }
    std::fill(acc, acc + C * W, 0.0);
    for (int64_t d = 0; d < w.k; ++d) {
      const int64_t row = i + d - w.r;
      if (row < 0 || row >= H) continue;
      const double t = w.taps[d];
      for (int c = 0; c < C; ++c) {
        const double* src = planes[c] + row * W;
        double* a = acc + c * W;
        for (int64_t j = 0; j < W; ++j) a[j] += t * src[j];
      }
    }
  }
};

// Runs f(i0, i1) over fixed blocks of kRowBlock rows, in parallel or not. The blocks do
// not depend on the number of threads (running sums restart at every block), so neither
// do the results: they are bitwise the same for any thread count.
constexpr int64_t kRowBlock = 16;

// Runs body(0, n) serially, or through parallel->run when parallel is not null.
inline void run_range(int64_t n, const Parallel* parallel,
                      const std::function<void(int64_t, int64_t)>& body) {
  if (parallel != nullptr && parallel->run && parallel->threads > 1 && n > 1) {
    parallel->run(n, body);
  } else {
    body(0, n);
  }
}

template <class F>
inline void for_rows(int64_t H, const Parallel* parallel, const F& f) {
  const int64_t blocks = (H + kRowBlock - 1) / kRowBlock;
  run_range(blocks, parallel, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      f(blk * kRowBlock, std::min(H, (blk + 1) * kRowBlock));
  });
}

// Loss and gradient of one image. scratch: scratch_size(H, W) doubles.
class ImageKernel {
 public:
  ImageKernel(Window w, int64_t H, int64_t W, double lambda_roi, double lambda_ncc)
      : w_(std::move(w)), H_(H), W_(W), lambda_roi_(lambda_roi), lambda_ncc_(lambda_ncc) {}

  static int64_t scratch_size(int64_t H, int64_t W) { return 8 * H * W + 3 * H; }

  // rows: the thread pool for the rows of this image, or nullptr (serial).
  void run(const float* x, const float* y, const float* roi, float* grad, float* loss,
           double* scratch, const Parallel* rows) const {
    const int64_t H = H_, W = W_, HW = H * W, r = w_.r, Wp = W + 2 * r;
    double* h = scratch;              // [5, H, W]: row-filtered x, y, xx, yy, xy; then A, B, C
    double* coef = scratch + 5 * HW;  // [3, H, W]: A, B, C at every centre
    double* row_cc = scratch + 8 * HW;  // [H] sum of cc over each row
    double* row_roi = row_cc + H;       // [H] sum of roi
    double* row_err = row_roi + H;      // [H] sum of roi (x - y)^2

    // Pass 1: products, row filter, ROI sums.
    for_rows(H, rows, [&](int64_t i0, int64_t i1) {
      std::vector<double> pad(5 * Wp, 0.0);  // zero margins stay zero
      for (int64_t i = i0; i < i1; ++i) {
        const float *xr = x + i * W, *yr = y + i * W, *rr = roi + i * W;
        double sroi = 0.0, serr = 0.0;
        for (int64_t j = 0; j < W; ++j) {
          const double xv = xr[j], yv = yr[j], rv = rr[j], e = xv - yv;
          pad[r + j] = xv;
          pad[Wp + r + j] = yv;
          pad[2 * Wp + r + j] = xv * xv;
          pad[3 * Wp + r + j] = yv * yv;
          pad[4 * Wp + r + j] = xv * yv;
          sroi += rv;
          serr += rv * e * e;
        }
        for (int c = 0; c < 5; ++c)
          filter_padded_row(pad.data() + c * Wp, h + c * HW + i * W, W, w_);
        row_roi[i] = sroi;
        row_err[i] = serr;
      }
    });

    // Pass 2: column filter -> the five window sums at every centre; cc and A, B, C.
    const double n = w_.n, inv_n = 1.0 / n;
    for_rows(H, rows, [&](int64_t i0, int64_t i1) {
      std::vector<double> acc(5 * W);
      ColumnWindow<5> cw{w_, {h, h + HW, h + 2 * HW, h + 3 * HW, h + 4 * HW}, H, W, acc.data()};
      for (int64_t i = i0; i < i1; ++i) {
        cw.at_row(i, i == i0);
        double ccs = 0.0;
        double* row_a = coef + i * W;
        double* row_b = coef + HW + i * W;
        double* row_c = coef + 2 * HW + i * W;
        for (int64_t j = 0; j < W; ++j) {
          const double sx = acc[j], sy = acc[W + j], sxx = acc[2 * W + j],
                       syy = acc[3 * W + j], sxy = acc[4 * W + j];
          const double cross = sxy - sx * sy * inv_n;
          const double varx = sxx - sx * sx * inv_n;
          const double vary = syy - sy * sy * inv_n;
          const double inv_d = 1.0 / (varx * vary + kNccEps);
          const double cc = cross * cross * inv_d;
          const double C = 2.0 * cross * inv_d;
          const double Bc = -cc * varx * inv_d;
          row_a[j] = -(C * sx + 2.0 * Bc * sy) * inv_n;
          row_b[j] = Bc;
          row_c[j] = C;
          ccs += cc;
        }
        row_cc[i] = ccs;
      }
    });

    // The loss, from the row partials in row order (deterministic).
    double cc_sum = 0.0, roi_sum = 0.0, err_sum = 0.0;
    for (int64_t i = 0; i < H; ++i) {
      cc_sum += row_cc[i];
      roi_sum += row_roi[i];
      err_sum += row_err[i];
    }
    const double inv_den = 1.0 / (roi_sum + kNccEps);
    *loss = static_cast<float>(lambda_roi_ * err_sum * inv_den -
                               lambda_ncc_ * cc_sum / static_cast<double>(HW));
    const double roi_coef = -2.0 * lambda_roi_ * inv_den;
    const double ncc_coef = -lambda_ncc_ / static_cast<double>(HW);

    // Pass 3: row filter of A, B, C (into the first three planes of h).
    for_rows(H, rows, [&](int64_t i0, int64_t i1) {
      std::vector<double> pad(Wp, 0.0);
      for (int64_t i = i0; i < i1; ++i)
        for (int c = 0; c < 3; ++c) {
          std::copy(coef + c * HW + i * W, coef + c * HW + (i + 1) * W, pad.begin() + r);
          filter_padded_row(pad.data(), h + c * HW + i * W, W, w_);
        }
    });

    // Pass 4: column filter of A, B, C and the gradient.
    for_rows(H, rows, [&](int64_t i0, int64_t i1) {
      std::vector<double> acc(3 * W);
      ColumnWindow<3> cw{w_, {h, h + HW, h + 2 * HW}, H, W, acc.data()};
      for (int64_t i = i0; i < i1; ++i) {
        cw.at_row(i, i == i0);
        const float *xr = x + i * W, *yr = y + i * W, *rr = roi + i * W;
        float* g = grad + i * W;
        for (int64_t j = 0; j < W; ++j) {
          const double xv = xr[j], yv = yr[j];
          const double dncc = acc[j] + 2.0 * yv * acc[W + j] + xv * acc[2 * W + j];
          g[j] = static_cast<float>(roi_coef * rr[j] * (xv - yv) + ncc_coef * dncc);
        }
      }
    });
  }

 private:
  Window w_;
  int64_t H_, W_;
  double lambda_roi_, lambda_ncc_;
};

}  // namespace

void ncc_roi_loss_cpu(const float* x, const float* y, const float* roi, int64_t B,
                      int64_t roi_batch, int64_t H, int64_t W, int64_t window, int64_t mode,
                      double sigma, double lambda_roi, double lambda_ncc, float* loss,
                      float* grad, const Parallel& parallel) {
  if (B == 0) return;
  const int64_t HW = H * W;
  Window w;
  w.taps = window_taps(window, mode, sigma, &w.n);
  w.k = window;
  w.r = window / 2;
  w.box = mode == kModeBox;
  const ImageKernel kernel(std::move(w), H, W, lambda_roi, lambda_ncc);
  const int64_t roi_stride = roi_batch == 1 ? 0 : HW;
  const int64_t scratch = ImageKernel::scratch_size(H, W);

  if (B >= parallel.threads) {  // enough images: one image per task, serial inside
    run_range(B, &parallel, [&](int64_t b0, int64_t b1) {
      std::vector<double> buf(scratch);
      for (int64_t b = b0; b < b1; ++b)
        kernel.run(x + b * HW, y + b * HW, roi + b * roi_stride, grad + b * HW, loss + b,
                   buf.data(), /*rows=*/nullptr);
    });
  } else {  // few images: parallel over the rows of each
    std::vector<double> buf(scratch);
    for (int64_t b = 0; b < B; ++b)
      kernel.run(x + b * HW, y + b * HW, roi + b * roi_stride, grad + b * HW, loss + b,
                 buf.data(), &parallel);
  }
}

}  // namespace core
}  // namespace deeprecon
