/* A C ABI for the fused NCC + ROI-L2 loss (the raw-pointer core, ../core/ncc_roi_core.h):
 * the library deeprecon/cpp_ext/_ncc_core*.so, which links neither libtorch nor Python
 * and is called through ctypes by deeprecon.cpp_ext.numpy_ops (or from C, C++, ...).
 *
 * x, y: float32 [B, 1, H, W] contiguous; roi: float32 [roi_batch, 1, H, W] contiguous with
 * roi_batch in {1, B}; window odd >= 1; mode 0 = box, 1 = gaussian (sigma > 0);
 * outputs loss float32 [B] and grad float32 [B, 1, H, W] = d loss_b / d y, which must not
 * overlap the inputs. num_threads: OpenMP threads (<= 0: OpenMP's default, i.e.
 * OMP_NUM_THREADS or the number of cores); the results do not depend on it, bitwise.
 *
 * Returns 0 on success; DEEPRECON_NCC_EINVAL for an invalid argument and
 * DEEPRECON_NCC_EFAIL for a failure (out of memory), with a NUL-terminated message in
 * err (at most err_len bytes, err may be NULL). */
#ifndef DEEPRECON_NCC_CORE_CAPI_H_
#define DEEPRECON_NCC_CORE_CAPI_H_

#include <stdint.h>

#if defined(_WIN32)
#define DEEPRECON_NCC_API __declspec(dllexport)
#else
#define DEEPRECON_NCC_API __attribute__((visibility("default")))
#endif

#define DEEPRECON_NCC_ABI_VERSION 1
#define DEEPRECON_NCC_EINVAL 1
#define DEEPRECON_NCC_EFAIL 2

#ifdef __cplusplus
extern "C" {
#endif

/* DEEPRECON_NCC_ABI_VERSION of the library (the Python binding checks it on load). */
DEEPRECON_NCC_API int deeprecon_ncc_abi_version(void);

/* Whether the library was built with OpenMP (1) or runs serially (0). */
DEEPRECON_NCC_API int deeprecon_ncc_has_openmp(void);

DEEPRECON_NCC_API int deeprecon_ncc_roi_loss(const float* x, const float* y, const float* roi,
                                             int64_t B, int64_t roi_batch, int64_t H,
                                             int64_t W, int64_t window, int64_t mode,
                                             double sigma, double lambda_roi,
                                             double lambda_ncc, int num_threads, float* loss,
                                             float* grad, char* err, int64_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* DEEPRECON_NCC_CORE_CAPI_H_ */
