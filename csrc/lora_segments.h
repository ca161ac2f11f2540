// Segment primitives of the multi-expert LoRA ops (contract: kernels/lora_kernels.cuh), callable
// from C++ on CPU and CUDA tensors alike. CPU: ATen, one matmul per non-empty expert (host loop
// over offsets). CUDA (PPAP_WITH_CUDA builds): the SGMV / seg_outer kernels, never a host sync.
#pragma once

#include <ATen/ATen.h>

namespace ppap_fast {

// out[s, m, :] = x[s, m, :] @ A[e(s)]^T (written)
void seg_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& out, const at::Tensor& sorted_idx,
                const at::Tensor& offsets);
// out[s, m, :] += scale * h[s, m, :] @ B[e(s)]^T
void seg_expand(const at::Tensor& h, const at::Tensor& B, const at::Tensor& out, const at::Tensor& sorted_idx,
                const at::Tensor& offsets, double scale);
// out[e] = alpha * sum over segment e's rows of u^T v (written; zeros for empty experts)
void seg_outer(const at::Tensor& u, const at::Tensor& v, const at::Tensor& out, const at::Tensor& sorted_idx,
               const at::Tensor& offsets, double alpha);

#ifdef PPAP_WITH_CUDA
// csrc/cuda_registration.cpp: the CUDA launchers on the current stream
void cuda_sgmv_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& out, const at::Tensor& sorted_idx,
                      const at::Tensor& offsets);
void cuda_sgmv_expand(const at::Tensor& h, const at::Tensor& B, const at::Tensor& out, const at::Tensor& sorted_idx,
                      const at::Tensor& offsets, double scale);
void cuda_seg_outer(const at::Tensor& u, const at::Tensor& v, const at::Tensor& out, const at::Tensor& sorted_idx,
                    const at::Tensor& offsets, double alpha, int64_t split);
#endif

}  // namespace ppap_fast
