// CUDA implementations of the ops declared in ops.cpp (device code in kernels/).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lora_kernels.cuh"
#include "lora_segments.h"

namespace ppap_fast {
std::tuple<at::Tensor, at::Tensor> guided_update_cuda(const at::Tensor& x, const at::Tensor& eps,
                                                      const c10::optional<at::Tensor>& v,
                                                      const c10::optional<at::Tensor>& grad,
                                                      const c10::optional<at::Tensor>& noise, const at::Tensor& idx,
                                                      const at::Tensor& coefs, int64_t mode, bool clip_denoised);
at::Tensor guided_eps_cuda(const at::Tensor& model_output, const at::Tensor& grad, const at::Tensor& coef,
                           int64_t channels);

void cuda_sgmv_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& out, const at::Tensor& sorted_idx,
                      const at::Tensor& offsets) {
  const c10::cuda::CUDAGuard guard(x.device());
  launch_sgmv_shrink(x, A, out, sorted_idx, offsets, at::cuda::getCurrentCUDAStream());
}

void cuda_sgmv_expand(const at::Tensor& h, const at::Tensor& B, const at::Tensor& out, const at::Tensor& sorted_idx,
                      const at::Tensor& offsets, double scale) {
  const c10::cuda::CUDAGuard guard(h.device());
  launch_sgmv_expand(h, B, out, sorted_idx, offsets, scale, at::cuda::getCurrentCUDAStream());
}

void cuda_seg_outer(const at::Tensor& u, const at::Tensor& v, const at::Tensor& out, const at::Tensor& sorted_idx,
                    const at::Tensor& offsets, double alpha, int64_t split) {
  const c10::cuda::CUDAGuard guard(u.device());
  launch_seg_outer(u, v, out, sorted_idx, offsets, alpha, split, at::cuda::getCurrentCUDAStream());
}
}  // namespace ppap_fast

TORCH_LIBRARY_IMPL(ppap_fast, CUDA, m) {
  m.impl("guided_update", &ppap_fast::guided_update_cuda);
  m.impl("guided_eps", &ppap_fast::guided_eps_cuda);
  m.impl("lora_sgmv_shrink", &ppap_fast::cuda_sgmv_shrink);
  m.impl("lora_sgmv_expand", &ppap_fast::cuda_sgmv_expand);
  m.impl("lora_seg_outer", &ppap_fast::cuda_seg_outer);
}
