// CUDA path of the fused guided update (math in csrc/guided_update.h).
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

}  // namespace ppap_fast
