/* The CUDA kernel of the fused NCC + ROI-L2 loss on raw device pointers and a stream: a
 * C ABI with no torch in it, for callers that hold device buffers of their own (e.g.
 * onnxruntime's CUDA execution provider through IOBinding). The torch op
 * (ncc_roi_cuda.cu) is a thin binding of it. This header includes no CUDA header: the
 * stream is a cudaStream_t passed as void* (NULL: the legacy default stream).
 *
 * Device pointers: x, y float32 [B, 1, H, W] contiguous; roi float32 [roi_batch, 1, H, W]
 * contiguous, roi_batch in {1, B}; loss float32 [B]; grad float32 [B, 1, H, W]; workspace:
 * at least deeprecon_ncc_roi_loss_cuda_workspace_bytes(B, H, W) bytes, 256-byte aligned
 * (cudaMalloc's alignment). Limits: window odd <= 25, B <= 65535, H, W <= 2^24.
 *
 * The three launches are enqueued on `stream` and the call returns without waiting: the
 * inputs and the workspace must stay valid until the stream has run them. Returns 0;
 * DEEPRECON_NCC_EINVAL (1) for an invalid argument; DEEPRECON_NCC_EFAIL (2) for a launch
 * error, with a NUL-terminated message in err (at most err_len bytes; err may be NULL). */
#ifndef DEEPRECON_NCC_ROI_CUDA_LAUNCH_H_
#define DEEPRECON_NCC_ROI_CUDA_LAUNCH_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

size_t deeprecon_ncc_roi_loss_cuda_workspace_bytes(int64_t B, int64_t H, int64_t W);

int deeprecon_ncc_roi_loss_cuda(const float* x, const float* y, const float* roi, int64_t B,
                                int64_t roi_batch, int64_t H, int64_t W, int64_t window,
                                int64_t mode, double sigma, double lambda_roi,
                                double lambda_ncc, float* loss, float* grad, void* workspace,
                                size_t workspace_bytes, void* stream, char* err,
                                int64_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* DEEPRECON_NCC_ROI_CUDA_LAUNCH_H_ */
