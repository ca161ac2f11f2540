// Op schemas (TORCH_LIBRARY) and CPU implementations.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "guided_update.h"

namespace ppap_fast {

void check_guided_update_args(const at::Tensor& x, const at::Tensor& eps, const c10::optional<at::Tensor>& v,
                              const c10::optional<at::Tensor>& grad, const c10::optional<at::Tensor>& noise,
                              const at::Tensor& idx, const at::Tensor& coefs, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "guided_update: mode must be 0 (ddim), 1 (ddpm fixed) or 2 (ddpm learned), got ", mode);
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "guided_update: x must be contiguous with a batch dim");
  const int64_t B = x.size(0);
  auto check_like = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == x.dim() && t.size(0) == B, "guided_update: ", name, " must have x's batch size and rank");
    for (int64_t d = 1; d < x.dim(); ++d)
      TORCH_CHECK(t.size(d) == x.size(d), "guided_update: ", name, " shape ", t.sizes(), " does not match x ", x.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "guided_update: ", name, " dtype differs from x");
    TORCH_CHECK(t.device() == x.device(), "guided_update: ", name, " is on another device than x");
    TORCH_CHECK(B == 0 || t[0].is_contiguous(), "guided_update: ", name, " must be contiguous within a sample");
  };
  check_like(eps, "eps");
  if (v) check_like(*v, "v");
  if (grad) check_like(*grad, "grad");
  if (noise) check_like(*noise, "noise");
  TORCH_CHECK(mode != 2 || v.has_value(), "guided_update: mode 2 (learned range) needs v");
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == B && idx.scalar_type() == at::kLong && idx.device() == x.device(),
              "guided_update: idx must be a long tensor of shape (B,) on x's device");
  const auto coef_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(1) == kGuidedUpdateCols && coefs.scalar_type() == coef_type &&
                  coefs.is_contiguous() && coefs.device() == x.device(),
              "guided_update: coefs must be a contiguous (T, 8) table on x's device, float64 for float64 x, "
              "else float32");
}

// One contiguous run [j0, j1) of sample b; the mode and the optional inputs are compile-time
// constants so that the inner loop has no branches and vectorises.
template <typename scalar_t, int MODE, bool HAS_GRAD, bool HAS_NOISE>
void guided_update_run(const at::opmath_type<scalar_t>* c, bool clip, const scalar_t* __restrict__ x,
                       const scalar_t* __restrict__ eps, const scalar_t* __restrict__ v,
                       const scalar_t* __restrict__ grad, const scalar_t* __restrict__ noise,
                       scalar_t* __restrict__ sample, scalar_t* __restrict__ pred, int64_t j0, int64_t j1) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t cc[kGuidedUpdateCols];
  for (int k = 0; k < kGuidedUpdateCols; ++k) cc[k] = c[k];
  for (int64_t j = j0; j < j1; ++j) {
    auto o = guided_update_element<acc_t>(cc, MODE, clip, static_cast<acc_t>(x[j]), static_cast<acc_t>(eps[j]),
                                          MODE == 2 ? static_cast<acc_t>(v[j]) : acc_t(0), HAS_GRAD,
                                          HAS_GRAD ? static_cast<acc_t>(grad[j]) : acc_t(0), HAS_NOISE,
                                          HAS_NOISE ? static_cast<acc_t>(noise[j]) : acc_t(0));
    sample[j] = static_cast<scalar_t>(o.sample);
    pred[j] = static_cast<scalar_t>(o.pred_xstart);
  }
}

template <typename scalar_t, int MODE, bool HAS_GRAD, bool HAS_NOISE>
void guided_update_cpu_impl(const at::Tensor& x, const at::Tensor& eps, const c10::optional<at::Tensor>& v,
                            const c10::optional<at::Tensor>& grad, const c10::optional<at::Tensor>& noise,
                            const int64_t* idx, const at::Tensor& coefs, bool clip, at::Tensor& sample,
                            at::Tensor& pred) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), inner = x.numel() / B;
  const acc_t* coef_p = coefs.data_ptr<acc_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ep = eps.data_ptr<scalar_t>();
  const scalar_t* vp = v ? v->data_ptr<scalar_t>() : nullptr;
  const scalar_t* gp = grad ? grad->data_ptr<scalar_t>() : nullptr;
  const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
  const int64_t es = eps.stride(0), vs = v ? v->stride(0) : 0, gs = grad ? grad->stride(0) : 0,
                ns = noise ? noise->stride(0) : 0;
  scalar_t* sp = sample.data_ptr<scalar_t>();
  scalar_t* pp = pred.data_ptr<scalar_t>();
  at::parallel_for(0, B * inner, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / inner, j0 = i % inner, j1 = std::min(inner, j0 + (end - i));
      guided_update_run<scalar_t, MODE, HAS_GRAD, HAS_NOISE>(
          coef_p + idx[b] * kGuidedUpdateCols, clip, xp + b * inner, ep + b * es, vp ? vp + b * vs : nullptr,
          gp ? gp + b * gs : nullptr, np ? np + b * ns : nullptr, sp + b * inner, pp + b * inner, j0, j1);
      i += j1 - j0;
    }
  });
}

template <typename scalar_t, int MODE>
void guided_update_cpu_flags(bool has_grad, bool has_noise, const at::Tensor& x, const at::Tensor& eps,
                             const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& grad,
                             const c10::optional<at::Tensor>& noise, const int64_t* idx, const at::Tensor& coefs,
                             bool clip, at::Tensor& sample, at::Tensor& pred) {
  if (has_grad && has_noise)
    guided_update_cpu_impl<scalar_t, MODE, true, true>(x, eps, v, grad, noise, idx, coefs, clip, sample, pred);
  else if (has_grad)
    guided_update_cpu_impl<scalar_t, MODE, true, false>(x, eps, v, grad, noise, idx, coefs, clip, sample, pred);
  else if (has_noise)
    guided_update_cpu_impl<scalar_t, MODE, false, true>(x, eps, v, grad, noise, idx, coefs, clip, sample, pred);
  else
    guided_update_cpu_impl<scalar_t, MODE, false, false>(x, eps, v, grad, noise, idx, coefs, clip, sample, pred);
}

std::tuple<at::Tensor, at::Tensor> guided_update_cpu(const at::Tensor& x, const at::Tensor& eps,
                                                     const c10::optional<at::Tensor>& v,
                                                     const c10::optional<at::Tensor>& grad,
                                                     const c10::optional<at::Tensor>& noise, const at::Tensor& idx,
                                                     const at::Tensor& coefs, int64_t mode, bool clip_denoised) {
  check_guided_update_args(x, eps, v, grad, noise, idx, coefs, mode);
  auto sample = at::empty_like(x);
  auto pred = at::empty_like(x);
  const int64_t B = x.size(0);
  if (B == 0 || x.numel() == 0) return {sample, pred};
  const int64_t T = coefs.size(0);
  const int64_t* idx_p = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(idx_p[b] >= 0 && idx_p[b] < T, "guided_update: idx[", b, "]=", idx_p[b], " outside [0, ", T, ")");
  const bool has_grad = grad.has_value(), has_noise = noise.has_value();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "guided_update_cpu", [&] {
    if (mode == 0)
      guided_update_cpu_flags<scalar_t, 0>(has_grad, has_noise, x, eps, v, grad, noise, idx_p, coefs, clip_denoised,
                                           sample, pred);
    else if (mode == 1)
      guided_update_cpu_flags<scalar_t, 1>(has_grad, has_noise, x, eps, v, grad, noise, idx_p, coefs, clip_denoised,
                                           sample, pred);
    else
      guided_update_cpu_flags<scalar_t, 2>(has_grad, has_noise, x, eps, v, grad, noise, idx_p, coefs, clip_denoised,
                                           sample, pred);
  });
  return {sample, pred};
}

}  // namespace ppap_fast

TORCH_LIBRARY(ppap_fast, m) {
  m.def(
      "guided_update(Tensor x, Tensor eps, Tensor? v, Tensor? grad, Tensor? noise, Tensor idx, Tensor coefs, "
      "int mode, bool clip_denoised) -> (Tensor, Tensor)");
#ifdef PPAP_WITH_CUDA
  // Multi-expert LoRA segment kernels (kernels/lora_kernels.cuh documents the contract).
  m.def("lora_sgmv_shrink(Tensor x, Tensor A, Tensor(a!) out, Tensor sorted_idx, Tensor offsets) -> ()");
  m.def("lora_sgmv_expand(Tensor h, Tensor B, Tensor(a!) out, Tensor sorted_idx, Tensor offsets, float scale) -> ()");
#endif
}

TORCH_LIBRARY_IMPL(ppap_fast, CPU, m) { m.impl("guided_update", &ppap_fast::guided_update_cpu); }
