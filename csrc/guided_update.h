// Fused guided reverse-diffusion update: one pass over x_t, eps, (v), grad, noise.
// Coefficient table layout (one row of 8 per respaced step index) is built in
// ppap_fast/ops/update.py (build_table); the modes are:
//   0 DDIM  : [sqrt_recip_acp, sqrt_recipm1_acp, sqrt_1m_acp, sqrt_acp_prev, dir_coef, sigma_masked, -, -]
//   1 DDPM, fixed variance   : [sqrt_recip_acp, sqrt_recipm1_acp, coef1, coef2, log_var, -, nonzero, -]
//   2 DDPM, learned range    : [sqrt_recip_acp, sqrt_recipm1_acp, coef1, coef2, log_beta, post_log_var_clipped, nonzero, -]
#pragma once
#include <cmath>

namespace ppap_fast {

constexpr int kGuidedUpdateCols = 8;

template <typename acc_t>
struct GuidedUpdateOut {
  acc_t sample;
  acc_t pred_xstart;
};

#ifdef __CUDACC__
#define PPAP_HD __host__ __device__
#else
#define PPAP_HD
#endif

// DDPM log-variance: the row's (mode 1) or interpolated by the model's v in [-1, 1] (mode 2).
template <typename acc_t>
PPAP_HD inline acc_t guided_update_log_var(const acc_t* c, int mode, acc_t v) {
  if (mode != 2) return c[4];
  acc_t frac = (v + acc_t(1)) / acc_t(2);
  return frac * c[4] + (acc_t(1) - frac) * c[5];
}

// Everything but the exponentials: var = exp(log_var) and sd = exp(log_var / 2) come from the caller
// (DDPM; unused for DDIM), so the CPU loop can hoist them (mode 1) or use a vectorisable exp (mode 2).
template <typename acc_t>
PPAP_HD inline GuidedUpdateOut<acc_t> guided_update_core(const acc_t* c, int mode, bool clip, acc_t x, acc_t eps,
                                                         bool has_grad, acc_t grad, bool has_noise, acc_t noise,
                                                         acc_t var, acc_t sd) {
  acc_t pred = c[0] * x - c[1] * eps;
  if (clip) {  // two selects in min/max form (branch-free: minss/maxss), NaN passes through as in torch.clamp
    pred = acc_t(1) < pred ? acc_t(1) : pred;
    pred = pred < acc_t(-1) ? acc_t(-1) : pred;
  }
  GuidedUpdateOut<acc_t> out;
  if (mode == 0) {
    acc_t e = (c[0] * x - pred) / c[1];
    if (has_grad) {
      e = e - c[2] * grad;
      pred = c[0] * x - c[1] * e;
    }
    acc_t s = pred * c[3] + c[4] * e;
    if (has_noise) s = s + c[5] * noise;
    out.sample = s;
    out.pred_xstart = pred;
    return out;
  }
  acc_t mean = c[2] * pred + c[3] * x;
  if (has_grad) mean = mean + var * grad;
  if (has_noise) mean = mean + c[6] * sd * noise;
  out.sample = mean;
  out.pred_xstart = pred;
  return out;
}

// The whole per-element update (the CUDA kernel's; under --use_fast_math exp is __expf there).
template <typename acc_t>
PPAP_HD inline GuidedUpdateOut<acc_t> guided_update_element(const acc_t* c, int mode, bool clip, acc_t x,
                                                            acc_t eps, acc_t v, bool has_grad, acc_t grad,
                                                            bool has_noise, acc_t noise) {
  acc_t var = acc_t(0), sd = acc_t(0);
  if (mode != 0) {
    const acc_t log_var = guided_update_log_var(c, mode, v);
    if (has_grad) var = exp(log_var);
    if (has_noise) sd = exp(acc_t(0.5) * log_var);
  }
  return guided_update_core(c, mode, clip, x, eps, has_grad, grad, has_noise, noise, var, sd);
}

}  // namespace ppap_fast
