// The C ABI of the fused NCC + ROI-L2 loss (ncc_core_capi.h): the raw-pointer core run on
// OpenMP threads. Built by setup.py into deeprecon/cpp_ext/_ncc_core*.so with the host
// compiler only: no torch, no Python, no CUDA. Everything but the functions declared in
// the header is hidden (-fvisibility=hidden), so that the core's C++ symbols never clash
// with those of _C when both libraries are loaded in one process.
#include "ncc_core_capi.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <new>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../core/ncc_roi_core.h"

namespace {

void set_error(char* err, int64_t err_len, const std::string& message) {
  if (err == nullptr || err_len <= 0) return;
  const size_t n = std::min(message.size(), static_cast<size_t>(err_len - 1));
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

// Splits [0, n) into one contiguous range per thread, as at::parallel_for does; an
// exception thrown by a range is rethrown after the parallel region.
deeprecon::core::Parallel openmp_parallel(int num_threads) {
  deeprecon::core::Parallel p;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  p.threads = omp_in_parallel() ? 1 : std::max(1, threads);
  p.run = [threads = p.threads](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    std::exception_ptr error;
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(threads, n)))
    {
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t chunk = (n + nt - 1) / nt;
      const int64_t begin = tid * chunk, end = std::min(n, begin + chunk);
      if (begin < end) {
        try {
          body(begin, end);
        } catch (...) {
#pragma omp critical(deeprecon_ncc_error)
          if (!error) error = std::current_exception();
        }
      }
    }
    if (error) std::rethrow_exception(error);
  };
#else
  (void)num_threads;
  p.threads = 1;
#endif
  return p;
}

}  // namespace

extern "C" {

int deeprecon_ncc_abi_version(void) { return DEEPRECON_NCC_ABI_VERSION; }

int deeprecon_ncc_has_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

int deeprecon_ncc_roi_loss(const float* x, const float* y, const float* roi, int64_t B,
                           int64_t roi_batch, int64_t H, int64_t W, int64_t window,
                           int64_t mode, double sigma, double lambda_roi, double lambda_ncc,
                           int num_threads, float* loss, float* grad, char* err,
                           int64_t err_len) {
  namespace core = deeprecon::core;
  std::string message = core::check_sizes(B, roi_batch, H, W);
  if (message.empty()) message = core::check_scalar_args(window, mode, sigma);
  if (message.empty() && B > 0 &&
      (x == nullptr || y == nullptr || roi == nullptr || loss == nullptr || grad == nullptr))
    message = "ncc_roi_loss: a null pointer among x, y, roi, loss, grad";
  if (!message.empty()) {
    set_error(err, err_len, message);
    return DEEPRECON_NCC_EINVAL;
  }
  try {
    core::ncc_roi_loss_cpu(x, y, roi, B, roi_batch, H, W, window, mode, sigma, lambda_roi,
                           lambda_ncc, loss, grad, openmp_parallel(num_threads));
  } catch (const std::bad_alloc&) {
    set_error(err, err_len, "ncc_roi_loss: out of memory (the scratch of an image)");
    return DEEPRECON_NCC_EFAIL;
  } catch (const std::exception& e) {
    set_error(err, err_len, std::string("ncc_roi_loss: ") + e.what());
    return DEEPRECON_NCC_EFAIL;
  } catch (...) {
    set_error(err, err_len, "ncc_roi_loss: unknown failure");
    return DEEPRECON_NCC_EFAIL;
  }
  set_error(err, err_len, "");
  return 0;
}

}  // extern "C"
