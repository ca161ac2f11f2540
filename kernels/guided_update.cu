// CUDA path of the fused guided update (math in csrc/guided_update.h) and of the guided eps correction.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../csrc/guided_update.h"

namespace ppap_fast {

void check_guided_update_args(const at::Tensor& x, const at::Tensor& eps, const c10::optional<at::Tensor>& v,
                              const c10::optional<at::Tensor>& grad, const c10::optional<at::Tensor>& noise,
                              const at::Tensor& idx, const at::Tensor& coefs, int64_t mode);

template <typename scalar_t>
__global__ void guided_update_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps, int64_t es,
                                     const scalar_t* __restrict__ v, int64_t vs, const scalar_t* __restrict__ grad,
                                     int64_t gs, const scalar_t* __restrict__ noise, int64_t ns,
                                     const int64_t* __restrict__ idx, const at::opmath_type<scalar_t>* __restrict__ coefs, int64_t T,
                                     scalar_t* __restrict__ sample, scalar_t* __restrict__ pred, int64_t B, int64_t inner,
                                     int mode, bool clip) {
  using acc_t = at::opmath_type<scalar_t>;
  // grid axis y holds at most 65535 blocks: each block row walks samples blockIdx.y, + gridDim.y, ...
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    int64_t t = idx[b];
    t = t < 0 ? 0 : (t >= T ? T - 1 : t);  // range is checked on the host side by the Python wrapper
    acc_t c[kGuidedUpdateCols];
#pragma unroll
    for (int k = 0; k < kGuidedUpdateCols; ++k) c[k] = coefs[t * kGuidedUpdateCols + k];
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < inner; j += (int64_t)gridDim.x * blockDim.x) {
      const int64_t i = b * inner + j;
      auto o = guided_update_element<acc_t>(c, mode, clip, static_cast<acc_t>(x[i]), static_cast<acc_t>(eps[b * es + j]),
                                            v ? static_cast<acc_t>(v[b * vs + j]) : acc_t(0), grad != nullptr,
                                            grad ? static_cast<acc_t>(grad[b * gs + j]) : acc_t(0), noise != nullptr,
                                            noise ? static_cast<acc_t>(noise[b * ns + j]) : acc_t(0));
      sample[i] = static_cast<scalar_t>(o.sample);
      pred[i] = static_cast<scalar_t>(o.pred_xstart);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> guided_update_cuda(const at::Tensor& x, const at::Tensor& eps,
                                                      const c10::optional<at::Tensor>& v,
                                                      const c10::optional<at::Tensor>& grad,
                                                      const c10::optional<at::Tensor>& noise, const at::Tensor& idx,
                                                      const at::Tensor& coefs, int64_t mode, bool clip_denoised) {
  check_guided_update_args(x, eps, v, grad, noise, idx, coefs, mode);
  const c10::cuda::CUDAGuard guard(x.device());
  auto sample = at::empty_like(x);
  auto pred = at::empty_like(x);
  const int64_t B = x.size(0);
  if (B == 0 || x.numel() == 0) return {sample, pred};
  const int64_t inner = x.numel() / B;
  const int threads = 256;
  const int64_t blocks_x = std::min<int64_t>((inner + threads - 1) / threads, 4096);
  const int64_t blocks_y = std::min<int64_t>(B, 65535);  // CUDA's cap on grid axis y; the kernel loops past it
  dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "guided_update_cuda", [&] {
    guided_update_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), eps.data_ptr<scalar_t>(), eps.stride(0), v ? v->data_ptr<scalar_t>() : nullptr,
        v ? v->stride(0) : 0, grad ? grad->data_ptr<scalar_t>() : nullptr, grad ? grad->stride(0) : 0,
        noise ? noise->data_ptr<scalar_t>() : nullptr, noise ? noise->stride(0) : 0, idx.data_ptr<int64_t>(),
        coefs.data_ptr<at::opmath_type<scalar_t>>(), coefs.size(0), sample.data_ptr<scalar_t>(), pred.data_ptr<scalar_t>(), B, inner,
        static_cast<int>(mode), clip_denoised);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sample, pred};
}

void check_guided_eps_args(const at::Tensor& model_output, const at::Tensor& grad, const at::Tensor& coef,
                           int64_t channels);

// Products rounded on their own (no FMA contraction under --use_fast_math): head - coef * grad as
// PyTorch's eager ops compute it.
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// One pass over model_output: out[b, j] = head - coef[b] * grad for j < head_len (the first `channels`
// channels), model_output copied for the rest (learned variance).
template <typename scalar_t, typename grad_t>
__global__ void guided_eps_kernel(const scalar_t* __restrict__ mo, int64_t ms, const grad_t* __restrict__ grad,
                                  int64_t gs, const at::opmath_type<scalar_t>* __restrict__ coef,
                                  scalar_t* __restrict__ out, int64_t B, int64_t inner, int64_t head_len) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {  // grid axis y holds at most 65535 blocks
    const acc_t c = coef[b];
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < inner; j += (int64_t)gridDim.x * blockDim.x) {
      const scalar_t m = mo[b * ms + j];
      out[b * inner + j] =
          j < head_len ? static_cast<scalar_t>(static_cast<acc_t>(m) - mul_rn(c, static_cast<acc_t>(grad[b * gs + j])))
                       : m;
    }
  }
}

at::Tensor guided_eps_cuda(const at::Tensor& model_output, const at::Tensor& grad, const at::Tensor& coef,
                           int64_t channels) {
  check_guided_eps_args(model_output, grad, coef, channels);
  const c10::cuda::CUDAGuard guard(model_output.device());
  auto out = at::empty(model_output.sizes(), model_output.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t B = model_output.size(0);
  if (B == 0 || model_output.numel() == 0) return out;
  const int64_t inner = model_output.numel() / B;
  const int64_t head_len = inner / model_output.size(1) * channels;
  const int threads = 256;
  const int64_t blocks_x = std::min<int64_t>((inner + threads - 1) / threads, 4096);
  const int64_t blocks_y = std::min<int64_t>(B, 65535);  // CUDA's cap on grid axis y; the kernel loops past it
  dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool grad_float = grad.scalar_type() != model_output.scalar_type();  // then float32 (checked)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(), "guided_eps_cuda", [&] {
    const auto* mo_p = model_output.data_ptr<scalar_t>();
    const auto* coef_p = coef.data_ptr<at::opmath_type<scalar_t>>();
    auto* out_p = out.data_ptr<scalar_t>();
    if (grad_float) {
      guided_eps_kernel<scalar_t, float><<<grid, threads, 0, stream>>>(
          mo_p, model_output.stride(0), grad.data_ptr<float>(), grad.stride(0), coef_p, out_p, B, inner, head_len);
    } else {
      guided_eps_kernel<scalar_t, scalar_t><<<grid, threads, 0, stream>>>(
          mo_p, model_output.stride(0), grad.data_ptr<scalar_t>(), grad.stride(0), coef_p, out_p, B, inner, head_len);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace ppap_fast
