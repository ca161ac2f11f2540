// Standalone C++ check of the CPU guided update through the dispatcher (built by CMakeLists.txt).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("ppap_fast::guided_update", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const c10::optional<at::Tensor>&,
                                                          const c10::optional<at::Tensor>&,
                                                          const c10::optional<at::Tensor>&, const at::Tensor&,
                                                          const at::Tensor&, int64_t, bool)>();
  at::manual_seed(0);
  auto x = at::randn({2, 3, 4, 4}, at::kDouble);
  auto eps = at::randn_like(x);
  auto grad = at::randn_like(x);
  // DDIM row: sqrt(1/a), sqrt(1/a - 1), sqrt(1-a), sqrt(a_prev), dir coef, sigma (eta 0)
  const double a = 0.5, ap = 0.8;
  auto coefs = at::zeros({1, 8}, at::kDouble);
  double row[6] = {std::sqrt(1 / a), std::sqrt(1 / a - 1), std::sqrt(1 - a), std::sqrt(ap), std::sqrt(1 - ap), 0.0};
  for (int k = 0; k < 6; ++k) coefs[0][k] = row[k];
  auto idx = at::zeros({2}, at::kLong);
  auto [sample, pred] = op.call(x, eps, c10::nullopt, grad, c10::nullopt, idx, coefs, 0, true);
  auto x0 = ((x - std::sqrt(1 - a) * eps) / std::sqrt(a)).clamp(-1, 1);
  auto e = (x - std::sqrt(a) * x0) / std::sqrt(1 - a) - std::sqrt(1 - a) * grad;
  auto x0g = (x - std::sqrt(1 - a) * e) / std::sqrt(a);
  auto want = std::sqrt(ap) * x0g + std::sqrt(1 - ap) * e;
  const double err = (sample - want).abs().max().item<double>();
  const double err_pred = (pred - x0g).abs().max().item<double>();
  std::printf("guided_update cpu: max abs err %.3e / %.3e\n", err, err_pred);
  if (!(err < 1e-12 && err_pred < 1e-12)) {
    std::printf("FAILED\n");
    return 1;
  }
  std::printf("1 passed, 0 failed\n");
  return 0;
}
