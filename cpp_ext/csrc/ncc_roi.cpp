// Fused NCC + ROI-L2 loss and its gradient with respect to y: the op's schema and its
// CPU kernel, a thin torch binding of the raw-pointer core (core/ncc_roi_core.cpp, where
// the formulas are). This file checks the tensors, allocates the outputs and runs the
// core on torch's intra-op thread pool (at::parallel_for, at::get_num_threads), so that
// torch.set_num_threads governs it; the results are bitwise the same for any number of
// threads.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <functional>
#include <string>
#include <tuple>

#include "ncc_roi.h"

extern "C" {
// An empty Python module `_C`: importing it loads this library, whose static
// initialisers (TORCH_LIBRARY below) register the op with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "Compiled kernels of deeprecon.cpp_ext (registered as torch.ops.deeprecon.*).", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

namespace deeprecon {

void check_ncc_roi_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& roi,
                        int64_t window, int64_t mode, double sigma, c10::DeviceType device) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) == 1,
                    "ncc_roi_loss: x must have shape [B, 1, H, W], got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(2) >= 1 && x.size(3) >= 1,
                    "ncc_roi_loss: x must have H >= 1 and W >= 1, got ", x.sizes());
  TORCH_CHECK_VALUE(y.sizes() == x.sizes(), "ncc_roi_loss: y must have the shape of x ",
                    x.sizes(), ", got ", y.sizes());
  TORCH_CHECK_VALUE(roi.dim() == 4 && roi.size(1) == 1 && roi.size(2) == x.size(2) &&
                        roi.size(3) == x.size(3) &&
                        (roi.size(0) == x.size(0) || roi.size(0) == 1),
                    "ncc_roi_loss: roi must have shape [B, 1, H, W] or [1, 1, H, W] with "
                    "B, H, W of x ", x.sizes(), ", got ", roi.sizes());
  const std::pair<const char*, const at::Tensor*> args[] = {{"x", &x}, {"y", &y}, {"roi", &roi}};
  for (const auto& [name, t] : args) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "ncc_roi_loss: ", name,
                     " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->device().type() == device, "ncc_roi_loss: ", name, " must be on a ",
                c10::DeviceTypeName(device), " device for this kernel, got ", t->device());
    TORCH_CHECK(t->device() == x.device(), "ncc_roi_loss: ", name,
                " must be on the device of x (", x.device(), "), got ", t->device());
    TORCH_CHECK_VALUE(t->is_contiguous(), "ncc_roi_loss: ", name,
                      " must be contiguous (call .contiguous() on it)");
  }
  const std::string scalars = core::check_scalar_args(window, mode, sigma);
  TORCH_CHECK_VALUE(scalars.empty(), scalars);
  const std::string sizes = core::check_sizes(x.size(0), roi.size(0), x.size(2), x.size(3));
  TORCH_CHECK_VALUE(sizes.empty(), sizes);
}

std::tuple<at::Tensor, at::Tensor> ncc_roi_loss_cpu(const at::Tensor& x, const at::Tensor& y,
                                                    const at::Tensor& roi, int64_t window,
                                                    int64_t mode, double sigma,
                                                    double lambda_roi, double lambda_ncc) {
  check_ncc_roi_args(x, y, roi, window, mode, sigma, c10::DeviceType::CPU);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  at::Tensor loss = at::empty({B}, x.options());  // [B]
  at::Tensor grad = at::empty_like(y);            // [B, 1, H, W]
  if (B == 0) return {loss, grad};

  core::Parallel parallel;
  parallel.threads = at::get_num_threads();
  parallel.run = [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(0, n, /*grain_size=*/1, body);
  };
  core::ncc_roi_loss_cpu(x.data_ptr<float>(), y.data_ptr<float>(), roi.data_ptr<float>(), B,
                         roi.size(0), H, W, window, mode, sigma, lambda_roi, lambda_ncc,
                         loss.data_ptr<float>(), grad.data_ptr<float>(), parallel);
  return {loss, grad};
}

TORCH_LIBRARY(deeprecon, m) {
  // The fake (meta) kernel and the autograd formula live in this Python module.
  m.set_python_module("deeprecon.cpp_ext.ops");
  m.def(
      "ncc_roi_loss(Tensor x, Tensor y, Tensor roi, int window, int mode, float sigma, "
      "float lambda_roi, float lambda_ncc) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deeprecon, CPU, m) { m.impl("ncc_roi_loss", &ncc_roi_loss_cpu); }

}  // namespace deeprecon
