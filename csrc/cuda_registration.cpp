// CUDA implementations of the ops declared in ops.cpp (device code in kernels/).
#include <torch/extension.h>

namespace ppap_fast {
std::tuple<at::Tensor, at::Tensor> guided_update_cuda(const at::Tensor& x, const at::Tensor& eps,
                                                      const c10::optional<at::Tensor>& v,
                                                      const c10::optional<at::Tensor>& grad,
                                                      const c10::optional<at::Tensor>& noise, const at::Tensor& idx,
                                                      const at::Tensor& coefs, int64_t mode, bool clip_denoised);
}

TORCH_LIBRARY_IMPL(ppap_fast, CUDA, m) { m.impl("guided_update", &ppap_fast::guided_update_cuda); }
