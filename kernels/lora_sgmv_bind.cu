// Standalone pybind module for JIT builds of the SGMV kernels (shrink, expand, seg_outer)
// (ppap_fast/ops/lora/cuda_ops.py: load_jit). The project extension registers the
// same launchers through TORCH_LIBRARY in csrc/ instead; this file is not needed there.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "lora_kernels.cuh"

namespace {

void sgmv_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& out, const at::Tensor& sorted_idx,
                 const at::Tensor& offsets) {
  const c10::cuda::CUDAGuard guard(x.device());
  ppap_fast::launch_sgmv_shrink(x, A, out, sorted_idx, offsets, at::cuda::getCurrentCUDAStream());
}

void sgmv_expand(const at::Tensor& h, const at::Tensor& B, const at::Tensor& out, const at::Tensor& sorted_idx,
                 const at::Tensor& offsets, double scale) {
  const c10::cuda::CUDAGuard guard(h.device());
  ppap_fast::launch_sgmv_expand(h, B, out, sorted_idx, offsets, scale, at::cuda::getCurrentCUDAStream());
}

void seg_outer(const at::Tensor& u, const at::Tensor& v, const at::Tensor& out, const at::Tensor& sorted_idx,
               const at::Tensor& offsets, double alpha, int64_t split) {
  const c10::cuda::CUDAGuard guard(u.device());
  ppap_fast::launch_seg_outer(u, v, out, sorted_idx, offsets, alpha, split, at::cuda::getCurrentCUDAStream());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgmv_shrink", &sgmv_shrink, "out[s,m,:] = x[s,m,:] @ A[e(s)].T");
  m.def("sgmv_expand", &sgmv_expand, "out[s,m,:] += scale * h[s,m,:] @ B[e(s)].T");
  m.def("seg_outer", &seg_outer, "out[e] = alpha * U_e^T V_e over segment e's rows");
}
