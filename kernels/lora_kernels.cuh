// Multi-expert LoRA SGMV (segmented gather matrix-vector) forward kernels for PPAP.
//
// Launchers (host functions; they enqueue on `stream`, never synchronise, allocate
// nothing, so they are safe under CUDA graph capture). Register them from csrc/ as
//
//   ppap_fast::lora_sgmv_shrink(Tensor x, Tensor A, Tensor(a!) out, Tensor sorted_idx, Tensor offsets) -> ()
//   ppap_fast::lora_sgmv_expand(Tensor h, Tensor B, Tensor(a!) out, Tensor sorted_idx, Tensor offsets, float scale) -> ()
//
// calling them with at::cuda::getCurrentCUDAStream(). The Python wrappers in
// ppap_fast/ops/lora/cuda_ops.py use exactly this argument order; the Triton
// fallbacks are ppap_fast/ops/lora/triton_kernels.py: sgmv_shrink / sgmv_expand.
//
// Shapes (every activation / output tensor is a 3-D *strided* view, any strides:
// e.g. tokens [S, L, D] or an NCHW map viewed as [S, H*W, C] with strides (C*H*W, 1, H*W)):
//   launch_sgmv_shrink:  x [S, M, K], A [N, R, K], out [S, M, R]
//       out[s, m, r]  = sum_k x[s, m, k] * A[e(s), r, k]                 (overwritten)
//   launch_sgmv_expand:  h [S, M, R], B [N, NOUT, R], out [S, M, NOUT]
//       out[s, m, n] += scale * sum_r h[s, m, r] * B[e(s), n, r]          (accumulated)
//   sorted_idx int32 [S]:  sample ids stable-sorted by expert id
//   offsets    int32 [N+1]: expert e owns sorted_idx[offsets[e] : offsets[e+1]]
//   (both from ppap_fast.ops.lora.build_segments; e(s) is the expert of sample s)
// dtypes: x/A/out (h/B/out) all float, half or bfloat16 (same dtype); fp32 accumulation
// (double for double). All tensors on the same CUDA device.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

namespace ppap_fast {

void launch_sgmv_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& out,
                        const at::Tensor& sorted_idx, const at::Tensor& offsets, cudaStream_t stream);

void launch_sgmv_expand(const at::Tensor& h, const at::Tensor& B, const at::Tensor& out,
                        const at::Tensor& sorted_idx, const at::Tensor& offsets, double scale,
                        cudaStream_t stream);

}  // namespace ppap_fast
