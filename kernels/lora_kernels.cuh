// Multi-expert LoRA SGMV (segmented gather matrix-vector) kernels for PPAP: forward
// (shrink, expand) and the weight gradients (seg_outer).
//
// Launchers (host functions; they enqueue on `stream` and never synchronise, so they are
// safe under CUDA graph capture; only seg_outer with split > 1 allocates, an fp32 workspace
// from the caching allocator). Registered in csrc/ (ops.cpp schema, cuda_registration.cpp) as
//
//   ppap_fast::lora_sgmv_shrink(Tensor x, Tensor A, Tensor(a!) out, Tensor sorted_idx, Tensor offsets) -> ()
//   ppap_fast::lora_sgmv_expand(Tensor h, Tensor B, Tensor(a!) out, Tensor sorted_idx, Tensor offsets, float scale) -> ()
//   ppap_fast::lora_seg_outer(Tensor u, Tensor v, Tensor(a!) out, Tensor sorted_idx, Tensor offsets, float alpha, int split) -> ()
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
//   launch_seg_outer:    u [S, M, P], v [S, M, Q], out [N, P, Q]
//       out[e, p, q]  = alpha * sum_{s in segment e, m} u[s, m, p] * v[s, m, q]   (overwritten;
//       zeros for empty experts). split: row chunks per segment (<= 0: chosen from the shapes);
//       partials are summed in a fixed order, so results are deterministic. out may be float32
//       when u/v are half/bf16 (fp32 weights under autocast).
//   sorted_idx int32 [S]:  sample ids stable-sorted by expert id
//   offsets    int32 [N+1]: expert e owns sorted_idx[offsets[e] : offsets[e+1]]
//   (both from ppap_fast.ops.lora.build_segments; e(s) is the expert of sample s)
// Backward (dy [S, M, NOUT]): dh = s dy B_e is a shrink with B^T [N, R, NOUT] (contiguous copy),
// dx += dh A_e an expand with A^T [N, K, R], dA = seg_outer(dh, x), dB = seg_outer(dy, h, s).
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

void launch_seg_outer(const at::Tensor& u, const at::Tensor& v, const at::Tensor& out, const at::Tensor& sorted_idx,
                      const at::Tensor& offsets, double alpha, int64_t split, cudaStream_t stream);

}  // namespace ppap_fast
