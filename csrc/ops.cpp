// Op schemas (TORCH_LIBRARY) and CPU implementations.
// GCC if-converts the float selects of the CPU loop (clip, the exp's range clamp) into vector
// min/max only without trapping math, so the whole file (headers included: one option set, so
// everything still inlines) is compiled with it; nothing here reads floating-point exception flags.
// No FMA contraction: the SSE2, AVX2 and AVX-512 clones of the loop give the same bits.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

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
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == B && idx.scalar_type() == at::kLong && idx.device() == x.device()
                  && idx.is_contiguous(),  // the kernels read idx[b] at its data pointer + b
              "guided_update: idx must be a contiguous long tensor of shape (B,) on x's device");
  const auto coef_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(1) == kGuidedUpdateCols && coefs.scalar_type() == coef_type &&
                  coefs.is_contiguous() && coefs.device() == x.device(),
              "guided_update: coefs must be a contiguous (T, 8) table on x's device, float64 for float64 x, "
              "else float32");
}

// guided_eps: out = model_output with its first `channels` channels replaced by head - coef[b] * grad.
// model_output [B, C, ...] and grad [B, channels, ...] are contiguous within a sample (any batch stride);
// coef is the contiguous per-sample coefficient (B,) in the math type (float64 for float64, else float32).
void check_guided_eps_args(const at::Tensor& model_output, const at::Tensor& grad, const at::Tensor& coef,
                           int64_t channels) {
  const auto& mo = model_output;
  TORCH_CHECK(mo.dim() >= 2, "guided_eps: model_output must be [B, C, ...], got ", mo.sizes());
  const auto st = mo.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              "guided_eps: model_output must be float16, bfloat16, float32 or float64, got ", st);
  const int64_t B = mo.size(0);
  TORCH_CHECK(channels >= 1 && channels <= mo.size(1), "guided_eps: channels must lie in [1, ", mo.size(1), "], got ",
              channels);
  TORCH_CHECK(B == 0 || mo[0].is_contiguous(), "guided_eps: model_output must be contiguous within a sample");
  bool same_shape = grad.dim() == mo.dim() && grad.size(0) == B && grad.size(1) == channels;
  for (int64_t d = 2; same_shape && d < mo.dim(); ++d) same_shape = grad.size(d) == mo.size(d);
  TORCH_CHECK(same_shape, "guided_eps: grad must be [B, channels, ...] = [", B, ", ", channels,
              ", ...] of model_output ", mo.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == st || grad.scalar_type() == at::kFloat,
              "guided_eps: grad must have model_output's dtype or float32, got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == mo.device(), "guided_eps: grad is on another device than model_output");
  TORCH_CHECK(B == 0 || grad[0].is_contiguous(), "guided_eps: grad must be contiguous within a sample");
  const auto coef_type = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == B && coef.scalar_type() == coef_type && coef.is_contiguous() &&
                  coef.device() == mo.device(),
              "guided_eps: coef must be a contiguous (B,) tensor on model_output's device, float64 for float64 "
              "model_output, else float32");
}

// exp for the CPU loop. float: branch-free (selects only, no libm call) so that the loop around it
// vectorises. exp(a) = 2^n e^r with n = round(a / ln 2), r = a - n ln 2 (ln 2 split into a part exact
// in float and the rest), |r| <= ln2/2, e^r by its Taylor polynomial to degree 7 (truncation below
// 6e-9 relative, under half an ulp). 2^n is the product of two normal powers of two, so n in
// [-150, 128] needs no branch: underflow goes to 0 through denormals, overflow to inf, NaN passes.
struct CpuExp {
  template <typename T>
  T operator()(T a) const {
    return std::exp(a);
  }
  float operator()(float a) const {
    a = a > 89.f ? 89.f : a;  // both keep NaN (a comparison with NaN is false)
    a = a < -104.f ? -104.f : a;
    const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
    const float t = a * 1.44269504088896341f + shifter;
    const float n = t - shifter;
    const int32_t ni = static_cast<int32_t>(__builtin_bit_cast(uint32_t, t) - __builtin_bit_cast(uint32_t, shifter));
    const float r = (a - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 = 0.693359375 - 2.12194440e-4
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 65]: a normal exponent
    const float s1 = __builtin_bit_cast(float, static_cast<uint32_t>(n1 + 127) << 23);
    const float s2 = __builtin_bit_cast(float, static_cast<uint32_t>(n2 + 127) << 23);
    return p * s1 * s2;
  }
};

// One contiguous run [j0, j1) of sample b. The mode, the optional inputs and the clip are template
// constants so that the loop has no branches and vectorises (a runtime clip flag alone kept most
// variants scalar: "control flow in loop"); mode 1's exps are per-row constants, hoisted.
// x86-64 Linux with GCC: one clone per vector width (SSE2 baseline, AVX2, AVX-512), picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PPAP_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PPAP_VECTOR_CLONES
#endif

template <typename scalar_t, int MODE, bool HAS_GRAD, bool HAS_NOISE, bool CLIP>
PPAP_VECTOR_CLONES void guided_update_run(const at::opmath_type<scalar_t>* c, const scalar_t* __restrict__ x,
                       const scalar_t* __restrict__ eps, const scalar_t* __restrict__ v,
                       const scalar_t* __restrict__ grad, const scalar_t* __restrict__ noise,
                       scalar_t* __restrict__ sample, scalar_t* __restrict__ pred, int64_t j0, int64_t j1) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t cc[kGuidedUpdateCols];
  for (int k = 0; k < kGuidedUpdateCols; ++k) cc[k] = c[k];
  const CpuExp exp_fn;
  acc_t var = acc_t(0), sd = acc_t(0);
  if (MODE == 1) {
    var = std::exp(cc[4]);
    sd = std::exp(acc_t(0.5) * cc[4]);
  }
  for (int64_t j = j0; j < j1; ++j) {
    if (MODE == 2) {
      const acc_t log_var = guided_update_log_var<acc_t>(cc, MODE, static_cast<acc_t>(v[j]));
      if (HAS_NOISE) sd = exp_fn(acc_t(0.5) * log_var);
      if (HAS_GRAD) var = HAS_NOISE ? sd * sd : exp_fn(log_var);  // one exp for both (<= 3 ulp apart)
    }
    auto o = guided_update_core<acc_t>(cc, MODE, CLIP, static_cast<acc_t>(x[j]), static_cast<acc_t>(eps[j]),
                                       HAS_GRAD, HAS_GRAD ? static_cast<acc_t>(grad[j]) : acc_t(0), HAS_NOISE,
                                       HAS_NOISE ? static_cast<acc_t>(noise[j]) : acc_t(0), var, sd);
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
  auto run = clip ? guided_update_run<scalar_t, MODE, HAS_GRAD, HAS_NOISE, true>
                  : guided_update_run<scalar_t, MODE, HAS_GRAD, HAS_NOISE, false>;
  at::parallel_for(0, B * inner, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / inner, j0 = i % inner, j1 = std::min(inner, j0 + (end - i));
      run(coef_p + idx[b] * kGuidedUpdateCols, xp + b * inner, ep + b * es, vp ? vp + b * vs : nullptr,
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


// guided_eps on the CPU: samples in parallel; products rounded on their own (fp-contract=off above), so
// the bits are eager PyTorch's.
at::Tensor guided_eps_cpu(const at::Tensor& model_output, const at::Tensor& grad, const at::Tensor& coef,
                          int64_t channels) {
  check_guided_eps_args(model_output, grad, coef, channels);
  auto out = at::empty(model_output.sizes(), model_output.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t B = model_output.size(0);
  if (B == 0 || model_output.numel() == 0) return out;
  const int64_t inner = model_output.numel() / B;
  const int64_t head_len = inner / model_output.size(1) * channels;
  const int64_t ms = model_output.stride(0), gs = grad.stride(0);
  const bool grad_float = grad.scalar_type() != model_output.scalar_type();  // then float32 (checked)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(), "guided_eps_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* mo_p = model_output.data_ptr<scalar_t>();
    const acc_t* coef_p = coef.data_ptr<acc_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    auto run = [&](const auto* grad_p) {
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          const scalar_t* m = mo_p + b * ms;
          const auto* g = grad_p + b * gs;
          scalar_t* o = out_p + b * inner;
          const acc_t c = coef_p[b];
          for (int64_t j = 0; j < head_len; ++j)
            o[j] = static_cast<scalar_t>(static_cast<acc_t>(m[j]) - c * static_cast<acc_t>(g[j]));
          std::copy(m + head_len, m + inner, o + head_len);
        }
      });
    };
    if (grad_float) {
      run(grad.data_ptr<float>());
    } else {
      run(grad.data_ptr<scalar_t>());
    }
  });
  return out;
}
}  // namespace ppap_fast

TORCH_LIBRARY(ppap_fast, m) {
  m.def(
      "guided_update(Tensor x, Tensor eps, Tensor? v, Tensor? grad, Tensor? noise, Tensor idx, Tensor coefs, "
      "int mode, bool clip_denoised) -> (Tensor, Tensor)");
  // Guided eps correction for any scheduler (CPU below, CUDA in kernels/guided_update.cu).
  m.def("guided_eps(Tensor model_output, Tensor grad, Tensor coef, int channels) -> Tensor");
  // Multi-expert LoRA segment kernels (kernels/lora_kernels.cuh documents the contract; CPU
  // versions in lora_autograd.cpp).
  m.def("lora_sgmv_shrink(Tensor x, Tensor A, Tensor(a!) out, Tensor sorted_idx, Tensor offsets) -> ()");
  m.def("lora_sgmv_expand(Tensor h, Tensor B, Tensor(a!) out, Tensor sorted_idx, Tensor offsets, float scale) -> ()");
  m.def("lora_seg_outer(Tensor u, Tensor v, Tensor(a!) out, Tensor sorted_idx, Tensor offsets, float alpha, int split) -> ()");
}

TORCH_LIBRARY_IMPL(ppap_fast, CPU, m) {
  m.impl("guided_update", &ppap_fast::guided_update_cpu);
  m.impl("guided_eps", &ppap_fast::guided_eps_cpu);
}
