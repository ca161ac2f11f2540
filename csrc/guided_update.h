// Fused guided reverse-diffusion update: one pass over x_t, eps, (v), grad, noise.
// Coefficient table layout (one row of 8 per respaced step index) is built in
// ppap_fast/ops/guided_update.py; the modes are:
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

// The per-element math, shared by the CPU loop and the CUDA kernel.
template <typename acc_t>
#ifdef __CUDACC__
__host__ __device__
#endif
inline GuidedUpdateOut<acc_t> guided_update_element(
    const acc_t* c, int mode, bool clip, acc_t x, acc_t eps, acc_t v, bool has_grad, acc_t grad,
    bool has_noise, acc_t noise) {
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
  acc_t log_var = c[4];
  if (mode == 2) {
    acc_t frac = (v + acc_t(1)) / acc_t(2);
    log_var = frac * c[4] + (acc_t(1) - frac) * c[5];
  }
  if (has_grad) mean = mean + exp(log_var) * grad;
  if (has_noise) mean = mean + c[6] * exp(acc_t(0.5) * log_var) * noise;
  out.sample = mean;
  out.pred_xstart = pred;
  return out;
}

}  // namespace ppap_fast
