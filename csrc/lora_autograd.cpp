// Multi-expert LoRA linear / conv2d forward + backward as C++ autograd Functions (backend "cpp" of
// ppap_fast.ops.lora): the math of ppap_fast/ops/lora/fast.py (LoraLinearFn; stacked A conv +
// LoraConvBFn), every step an ATen call or a segment primitive (lora_segments.h) issued from C++,
// so an eager call costs one Python -> C++ crossing instead of one per op (on a GPU the Python
// path is launch-bound: ~1.5-2 ms of host time for ~0.3 ms of kernels per layer).
//
//   lora_linear_cpp(x, W, bias?, A, B, expert_bias?, expert_idx, sorted_idx, offsets, scale, poison)
//       x [S, ..., K], W [O, K], A [N, R, K], B [N, O, R], expert_bias [N, O]
//   lora_conv2d_cpp(x, W, bias?, A, B, expert_bias?, expert_idx, sorted_idx, offsets, scale,
//                     stride, padding, dilation, groups, poison)
//       A [N, r, C_in/g, kh, kw] (stacked into one conv: N*r channels, ordered [g, N, r/g]),
//       B [N, C_out, r] (dense: the block-diagonal form for groups > 1, made by the caller)
// W and bias are frozen (no gradient). Gradients: x, A, B, expert_bias. poison: buffers the kernels
// fully overwrite start as NaN (tests).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <vector>

#include "lora_segments.h"

namespace ppap_fast {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ----------------------------------------------------------------------------- segment primitives
namespace {

bool on_cuda(const Tensor& t) {
#ifdef PPAP_WITH_CUDA
  return t.is_cuda();
#else
  TORCH_CHECK(!t.is_cuda(), "ppap_fast._C was built without CUDA: the cpp LoRA backend runs on CPU tensors only");
  return false;
#endif
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Non-empty segments (host loop: CPU only), as (expert, row ids).
std::vector<std::pair<int64_t, Tensor>> cpu_segments(const Tensor& sorted_idx, const Tensor& offsets) {
  Tensor off = offsets.to(at::kLong).contiguous();
  Tensor rows = sorted_idx.to(at::kLong);
  const int64_t* o = off.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, Tensor>> segs;
  for (int64_t e = 0; e + 1 < off.numel(); ++e)
    if (o[e + 1] > o[e]) segs.emplace_back(e, rows.slice(0, o[e], o[e + 1]));
  return segs;
}

void check_segment_args(const char* op, const Tensor& x, const Tensor& w, const Tensor& out, const Tensor& sorted_idx,
                        const Tensor& offsets) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && out.dim() == 3, op, ": x, weight and out must be 3-D, got ", x.sizes(),
              ", ", w.sizes(), ", ", out.sizes());
  TORCH_CHECK(sorted_idx.dim() == 1 && sorted_idx.size(0) == x.size(0), op, ": sorted_idx must be [S]");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == w.size(0) + 1, op, ": offsets must be [N+1]");
}

}  // namespace

void seg_shrink(const Tensor& x, const Tensor& A, const Tensor& out, const Tensor& sorted_idx, const Tensor& offsets) {
  if (on_cuda(x)) {
#ifdef PPAP_WITH_CUDA
    cuda_sgmv_shrink(x, A, out, sorted_idx, offsets);
#endif
    return;
  }
  check_segment_args("seg_shrink", x, A, out, sorted_idx, offsets);
  const auto acc = acc_type(x.scalar_type());
  for (auto& [e, rows] : cpu_segments(sorted_idx, offsets))
    out.index_copy_(0, rows, at::matmul(x.index_select(0, rows).to(acc), A[e].to(acc).t()).to(out.scalar_type()));
}

void seg_expand(const Tensor& h, const Tensor& B, const Tensor& out, const Tensor& sorted_idx, const Tensor& offsets,
                double scale) {
  if (on_cuda(h)) {
#ifdef PPAP_WITH_CUDA
    cuda_sgmv_expand(h, B, out, sorted_idx, offsets, scale);
#endif
    return;
  }
  check_segment_args("seg_expand", h, B, out, sorted_idx, offsets);
  const auto acc = acc_type(h.scalar_type());
  for (auto& [e, rows] : cpu_segments(sorted_idx, offsets)) {
    Tensor sum = out.index_select(0, rows).to(acc);
    sum.add_(at::matmul(h.index_select(0, rows).to(acc), B[e].to(acc).t()), scale);
    out.index_copy_(0, rows, sum.to(out.scalar_type()));
  }
}

void seg_outer(const Tensor& u, const Tensor& v, const Tensor& out, const Tensor& sorted_idx, const Tensor& offsets,
               double alpha) {
  if (on_cuda(u)) {
#ifdef PPAP_WITH_CUDA
    cuda_seg_outer(u, v, out, sorted_idx, offsets, alpha, 0);
#endif
    return;
  }
  TORCH_CHECK(u.dim() == 3 && v.dim() == 3 && out.dim() == 3 && u.size(0) == v.size(0) && u.size(1) == v.size(1),
              "seg_outer: u [S, M, P], v [S, M, Q], out [N, P, Q], got ", u.sizes(), ", ", v.sizes(), ", ",
              out.sizes());
  const auto acc = acc_type(u.scalar_type());
  out.zero_();
  for (auto& [e, rows] : cpu_segments(sorted_idx, offsets)) {
    Tensor ue = u.index_select(0, rows).reshape({-1, u.size(2)}).to(acc);
    Tensor ve = v.index_select(0, rows).reshape({-1, v.size(2)}).to(acc);
    out[e].copy_(at::mm(ue.t(), ve).mul_(alpha));
  }
}

// ----------------------------------------------------------------------------- autograd Functions
namespace {

// The Functions below call the segment steps through the dispatcher (the registered ops
// ppap_fast::lora_sgmv_shrink / _expand / lora_seg_outer), not directly: under FakeTensor /
// torch.compile tracing they then reach the ops' fake kernels (ppap_fast/ops/_fake_kernels.py), not the
// CPU host loop, which reads offsets' data.
void op_shrink(const Tensor& x, const Tensor& A, const Tensor& out, const Tensor& sorted_idx, const Tensor& offsets) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ppap_fast::lora_sgmv_shrink", "")
                             .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  op.call(x, A, out, sorted_idx, offsets);
}

void op_expand(const Tensor& h, const Tensor& B, const Tensor& out, const Tensor& sorted_idx, const Tensor& offsets,
               double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ppap_fast::lora_sgmv_expand", "")
          .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double)>();
  op.call(h, B, out, sorted_idx, offsets, scale);
}

void op_outer(const Tensor& u, const Tensor& v, const Tensor& out, const Tensor& sorted_idx, const Tensor& offsets,
              double alpha) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ppap_fast::lora_seg_outer", "")
          .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, int64_t)>();
  op.call(u, v, out, sorted_idx, offsets, alpha, 0);
}

Tensor alloc(at::IntArrayRef shape, const at::TensorOptions& opt, bool poison) {
  Tensor t = at::empty(shape, opt);
  if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

Tensor maybe_cast(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// seg_outer into a new [N, P, Q] tensor of out_dt (u's dtype or float32 directly, else via float32)
Tensor seg_outer_new(const Tensor& u, const Tensor& v, const Tensor& sorted_idx, const Tensor& offsets, double alpha,
                     at::ScalarType out_dt, int64_t N, bool poison) {
  const bool direct = out_dt == u.scalar_type() || out_dt == at::kFloat;
  Tensor out = alloc({N, u.size(2), v.size(2)}, u.options().dtype(direct ? out_dt : at::kFloat), poison);
  op_outer(u, v, out, sorted_idx, offsets, alpha);
  return direct ? out : out.to(out_dt);
}

// d expert_bias [N, C] from dy3 [S, M, C]: per-sample sums added per expert (sync-free). index_add on
// the CPU (sample order); elsewhere, or with deterministic algorithms on, a masked sum over S (fixed
// order, bitwise reproducible: index_add on CUDA adds with atomics). As fast.py's _expert_bias_grad.
Tensor expert_bias_grad(const Tensor& dy3, const Tensor& expert_idx, int64_t N, at::ScalarType dt) {
  Tensor per_sample = at::sum(dy3, at::IntArrayRef{1}, false, acc_type(dy3.scalar_type()));
  if (per_sample.is_cpu() && !at::globalContext().deterministicAlgorithms()) {
    Tensor g = at::zeros({N, per_sample.size(1)}, per_sample.options());
    g.index_add_(0, expert_idx, per_sample);
    return maybe_cast(g, dt);
  }
  Tensor experts = at::arange(N, expert_idx.options());
  Tensor mine = expert_idx.unsqueeze(0).eq(experts.unsqueeze(1)).unsqueeze(2);  // [N, S, 1]
  // where, not a 0/1 product: a non-finite sum stays in its own expert's row
  Tensor g = at::where(mine, per_sample.unsqueeze(0), at::Scalar(0.0)).sum(1);
  return maybe_cast(g, dt);
}

// B^T [N, R, C] contiguous on CUDA (coalesced weight reads, as verified there), a view on CPU
Tensor weight_t(const Tensor& w, double mul = 1.0) {
  Tensor t = w.transpose(1, 2);
  if (mul != 1.0) return t.mul(mul).contiguous();
  return t.is_cuda() ? t.contiguous() : t;
}

// needs_input_grad counts autograd inputs only, and an absent optional (bias, argument 2) has none
bool needs_grad(AutogradContext* ctx, size_t arg) {
  return ctx->needs_input_grad(arg > 2 && !ctx->saved_data["has_bias"].toBool() ? arg - 1 : arg);
}

int64_t dtype_code(at::ScalarType t) { return static_cast<int64_t>(t); }
at::ScalarType code_dtype(const c10::IValue& v) { return static_cast<at::ScalarType>(v.toInt()); }

// what both Functions keep besides tensors, and read back in backward
void save_common(AutogradContext* ctx, double scale, bool poison, const Tensor& A, const Tensor& B,
                 const Tensor& bias, const Tensor& expert_bias, at::ScalarType cdt) {
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["poison"] = poison;
  ctx->saved_data["has_bias"] = bias.defined();
  ctx->saved_data["has_eb"] = expert_bias.defined();
  ctx->saved_data["a_dt"] = dtype_code(A.scalar_type());
  ctx->saved_data["b_dt"] = dtype_code(B.scalar_type());
  ctx->saved_data["eb_dt"] = dtype_code(expert_bias.defined() ? expert_bias.scalar_type() : cdt);
}

struct Common {
  double scale;
  bool poison;
  at::ScalarType a_dt;
};

Common load_common(AutogradContext* ctx) {
  // the backward is built from kernels without derivatives (like @once_differentiable in fast.py)
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "ppap_fast cpp LoRA backend: double backward (create_graph=True) is not supported; use backend='reference'");
  return {ctx->saved_data["scale"].toDouble(), ctx->saved_data["poison"].toBool(), code_dtype(ctx->saved_data["a_dt"])};
}

// dB = s dy_e^T h_e (seg_outer) and d expert_bias, where their inputs need them; dy3 / h3 rows [S, M, *]
void b_bias_grads(AutogradContext* ctx, const Tensor& dy3, const Tensor& h3, const Tensor& expert_idx,
                  const Tensor& sidx, const Tensor& off, int64_t N, Tensor& dB, Tensor& deb) {
  const Common c = load_common(ctx);
  if (needs_grad(ctx, 4))
    dB = seg_outer_new(dy3, h3, sidx, off, c.scale, code_dtype(ctx->saved_data["b_dt"]), N, c.poison);
  if (ctx->saved_data["has_eb"].toBool() && needs_grad(ctx, 5))
    deb = expert_bias_grad(dy3, expert_idx, N, code_dtype(ctx->saved_data["eb_dt"]));
}

struct LoraLinearCpp : public torch::autograd::Function<LoraLinearCpp> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias_opt,
                        const Tensor& A, const Tensor& B, const std::optional<Tensor>& expert_bias_opt,
                        const Tensor& expert_idx, const Tensor& sorted_idx, const Tensor& offsets, double scale,
                        bool poison) {
    const auto cdt = x.scalar_type();
    const Tensor bias = bias_opt.value_or(Tensor()), expert_bias = expert_bias_opt.value_or(Tensor());
    const int64_t S = x.size(0), K = x.size(-1), R = A.size(1), O = W.size(0);
    Tensor Wc = maybe_cast(W.detach(), cdt), Ac = maybe_cast(A.detach(), cdt), Bc = maybe_cast(B.detach(), cdt);
    Tensor x3 = x.reshape({S, -1, K});
    const int64_t M = x3.size(1);
    std::optional<Tensor> bc;
    if (bias.defined()) bc = maybe_cast(bias.detach(), cdt);
    Tensor y = at::linear(x, Wc, bc);
    Tensor y3 = y.view({S, M, O});
    Tensor h = alloc({S, M, R}, x.options(), poison);
    op_shrink(x3, Ac, h, sorted_idx, offsets);
    op_expand(h, Bc, y3, sorted_idx, offsets, scale);
    const bool has_eb = expert_bias.defined();
    if (has_eb) y3.add_(maybe_cast(expert_bias.detach(), cdt).index_select(0, expert_idx).unsqueeze(1));
    ctx->save_for_backward({x3, Wc, Ac, Bc, h, expert_idx, sorted_idx, offsets});
    save_common(ctx, scale, poison, A, B, bias, expert_bias, cdt);
    ctx->saved_data["x_shape"] = x.sizes().vec();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x3 = saved[0], &Wc = saved[1], &Ac = saved[2], &Bc = saved[3], &h = saved[4];
    const Tensor &expert_idx = saved[5], &sidx = saved[6], &off = saved[7];
    const Common c = load_common(ctx);
    const double s = c.scale;
    const bool poison = c.poison;
    const int64_t S = x3.size(0), M = x3.size(1), N = Ac.size(0), R = Ac.size(1), O = Wc.size(0);
    Tensor dy3 = maybe_cast(grads[0].reshape({S, M, O}), x3.scalar_type());
    Tensor dx, dA, dB, deb;
    const bool need_x = needs_grad(ctx, 0), need_a = needs_grad(ctx, 3);
    if (need_x || need_a) {
      Tensor dh0 = alloc({S, M, R}, x3.options(), poison);  // dy B_e (s applied below)
      op_shrink(dy3, weight_t(Bc), dh0, sidx, off);
      if (need_x) {
        dx = at::matmul(dy3, Wc);
        op_expand(dh0, weight_t(Ac), dx, sidx, off, s);
        dx = dx.view(ctx->saved_data["x_shape"].toIntVector());
      }
      if (need_a) dA = seg_outer_new(dh0, x3, sidx, off, s, c.a_dt, N, poison);
    }
    b_bias_grads(ctx, dy3, h, expert_idx, sidx, off, N, dB, deb);
    return {dx, Tensor(), Tensor(), dA, dB, deb, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct ConvGeometry {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

// every expert's A in one conv weight [g*N*rg, C_in/g, kh, kw], output channels ordered [g, N, rg]
Tensor stack_a(const Tensor& A, int64_t groups) {
  const int64_t N = A.size(0), r = A.size(1);
  std::vector<int64_t> split{N, groups, r / groups};
  for (int64_t d = 2; d < A.dim(); ++d) split.push_back(A.size(d));
  std::vector<int64_t> stacked{N * r};
  for (int64_t d = 2; d < A.dim(); ++d) stacked.push_back(A.size(d));
  return A.reshape(split).transpose(0, 1).reshape(stacked);
}

// index [S, g, 1, rg, Ho, Wo] selecting each sample's expert along dim 2 of the stacked output
Tensor expert_index(const Tensor& expert_idx, int64_t S, int64_t groups, int64_t rg, int64_t Ho, int64_t Wo) {
  return expert_idx.view({S, 1, 1, 1, 1, 1}).expand({S, groups, 1, rg, Ho, Wo});
}

struct LoraConv2dCpp : public torch::autograd::Function<LoraConv2dCpp> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias_opt,
                        const Tensor& A, const Tensor& B, const std::optional<Tensor>& expert_bias_opt,
                        const Tensor& expert_idx, const Tensor& sorted_idx, const Tensor& offsets, double scale,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        bool poison) {
    const auto cdt = x.scalar_type();
    const Tensor bias = bias_opt.value_or(Tensor()), expert_bias = expert_bias_opt.value_or(Tensor());
    const int64_t N = A.size(0), rg = A.size(1) / groups;
    Tensor Wc = maybe_cast(W.detach(), cdt), Bc = maybe_cast(B.detach(), cdt);
    Tensor As = stack_a(maybe_cast(A.detach(), cdt), groups);
    std::optional<Tensor> bc;
    if (bias.defined()) bc = maybe_cast(bias.detach(), cdt);
    Tensor y = at::convolution(x, Wc, bc, stride, padding, dilation, false, {0, 0}, groups);
    Tensor hs = at::convolution(x, As, std::nullopt, stride, padding, dilation, false, {0, 0}, groups);
    const int64_t S = y.size(0), C_out = y.size(1), Ho = y.size(2), Wo = y.size(3), P = Ho * Wo, r = A.size(1);
    Tensor sel = expert_index(expert_idx, S, groups, rg, Ho, Wo);
    Tensor h = at::gather(hs.unflatten(1, {groups, N, rg}), 2, sel).reshape({S, A.size(1), Ho, Wo}).contiguous();
    Tensor y3 = y.view({S, C_out, P}).transpose(1, 2);  // rows [S, P, C_out] in NCHW or channels_last
    op_expand(h.view({S, r, P}).transpose(1, 2), Bc, y3, sorted_idx, offsets, scale);
    const bool has_eb = expert_bias.defined();
    if (has_eb) y.add_(maybe_cast(expert_bias.detach(), cdt).index_select(0, expert_idx).view({S, C_out, 1, 1}));
    ctx->save_for_backward({x, Wc, As, Bc, h, expert_idx, sorted_idx, offsets});
    save_common(ctx, scale, poison, A, B, bias, expert_bias, cdt);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["a_shape"] = A.sizes().vec();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &Wc = saved[1], &As = saved[2], &Bc = saved[3], &h = saved[4];
    const Tensor &expert_idx = saved[5], &sidx = saved[6], &off = saved[7];
    const Common c = load_common(ctx);
    const double s = c.scale;
    const bool poison = c.poison;
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const auto a_shape = ctx->saved_data["a_shape"].toIntVector();
    Tensor dy = maybe_cast(grads[0], x.scalar_type());
    dy = dy.contiguous(dy.suggest_memory_format());
    const int64_t S = dy.size(0), C_out = dy.size(1), Ho = dy.size(2), Wo = dy.size(3), P = Ho * Wo;
    const int64_t N = Bc.size(0), r = h.size(1), rg = r / groups;
    Tensor dy3 = dy.view({S, C_out, P}).transpose(1, 2);
    const bool need_x = needs_grad(ctx, 0), need_a = needs_grad(ctx, 3);
    Tensor dx, dA, dB, deb;
    if (need_x)
      dx = std::get<0>(at::convolution_backward(dy, x, Wc, std::nullopt, stride, padding, dilation, false, {0, 0},
                                                groups, {true, false, false}));
    if (need_x || need_a) {
      Tensor dh = alloc({S, r, Ho, Wo}, x.options().memory_format(at::MemoryFormat::Contiguous), poison);
      op_shrink(dy3, weight_t(Bc, s), dh.view({S, r, P}).transpose(1, 2), sidx, off);  // s dy B_e
      Tensor dhs = at::zeros({S, groups, N, rg, Ho, Wo}, dh.options());
      dhs.scatter_(2, expert_index(expert_idx, S, groups, rg, Ho, Wo), dh.view({S, groups, 1, rg, Ho, Wo}));
      auto res = at::convolution_backward(dhs.view({S, groups * N * rg, Ho, Wo}), x, As, std::nullopt, stride,
                                          padding, dilation, false, {0, 0}, groups, {need_x, need_a, false});
      if (need_x) dx.add_(std::get<0>(res));
      if (need_a) {
        std::vector<int64_t> split{groups, N, rg};
        for (size_t d = 2; d < a_shape.size(); ++d) split.push_back(a_shape[d]);
        dA = maybe_cast(std::get<1>(res).reshape(split).transpose(0, 1).reshape(a_shape), c.a_dt);
      }
    }
    b_bias_grads(ctx, dy3, h.view({S, r, P}).transpose(1, 2), expert_idx, sidx, off, N, dB, deb);
    variable_list out(15);
    out[0] = dx;
    out[3] = dA;
    out[4] = dB;
    out[5] = deb;
    return out;
  }
};

void check_common(const char* op, const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& expert_idx,
                  const Tensor& sorted_idx, const Tensor& offsets) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(expert_idx.dim() == 1 && expert_idx.size(0) == x.size(0) && expert_idx.scalar_type() == at::kLong, op,
              ": expert_idx must be int64 [S]=", x.size(0));
  TORCH_CHECK(sorted_idx.scalar_type() == at::kInt && offsets.scalar_type() == at::kInt && sorted_idx.is_contiguous() &&
                  offsets.is_contiguous(),
              op, ": sorted_idx / offsets must be contiguous int32 (build_segments)");
  TORCH_CHECK(offsets.numel() == A.size(0) + 1 && B.size(0) == A.size(0), op, ": offsets must be [N+1] for N=",
              A.size(0));
}

Tensor lora_linear_cpp(const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias, const Tensor& A,
                         const Tensor& B, const std::optional<Tensor>& expert_bias, const Tensor& expert_idx,
                         const Tensor& sorted_idx, const Tensor& offsets, double scale, bool poison) {
  check_common("lora_linear_cpp", x, A, B, expert_idx, sorted_idx, offsets);
  TORCH_CHECK(A.dim() == 3 && W.dim() == 2 && W.size(1) == A.size(2) && x.size(-1) == A.size(2) &&
                  B.dim() == 3 && B.size(1) == W.size(0) && B.size(2) == A.size(1),
              "lora_linear_cpp: shape mismatch: x ", x.sizes(), ", W ", W.sizes(), ", A ", A.sizes(), ", B ",
              B.sizes());
  return LoraLinearCpp::apply(x, W, bias, A, B, expert_bias, expert_idx, sorted_idx, offsets, scale, poison);
}

Tensor lora_conv2d_cpp(const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias, const Tensor& A,
                         const Tensor& B, const std::optional<Tensor>& expert_bias, const Tensor& expert_idx,
                         const Tensor& sorted_idx, const Tensor& offsets, double scale, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool poison) {
  check_common("lora_conv2d_cpp", x, A, B, expert_idx, sorted_idx, offsets);
  TORCH_CHECK(x.dim() == 4 && W.dim() == 4 && A.dim() == 5 && B.dim() == 3 && groups >= 1 && A.size(1) % groups == 0 &&
                  B.size(1) == W.size(0) && B.size(2) == A.size(1) && A.size(2) == W.size(1) &&
                  A.size(3) == W.size(2) && A.size(4) == W.size(3),
              "lora_conv2d_cpp: shape mismatch: x ", x.sizes(), ", W ", W.sizes(), ", A ", A.sizes(), ", B ",
              B.sizes(), " (dense [N, C_out, r]), groups ", groups);
  return LoraConv2dCpp::apply(x, W, bias, A, B, expert_bias, expert_idx, sorted_idx, offsets, scale, stride, padding,
                                dilation, groups, poison);
}

}  // namespace
}  // namespace ppap_fast

TORCH_LIBRARY_FRAGMENT(ppap_fast, m) {
  m.def(
      "lora_linear_cpp(Tensor x, Tensor W, Tensor? bias, Tensor A, Tensor B, Tensor? expert_bias, "
      "Tensor expert_idx, Tensor sorted_idx, Tensor offsets, float scale, bool poison=False) -> Tensor");
  m.def(
      "lora_conv2d_cpp(Tensor x, Tensor W, Tensor? bias, Tensor A, Tensor B, Tensor? expert_bias, "
      "Tensor expert_idx, Tensor sorted_idx, Tensor offsets, float scale, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool poison=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(ppap_fast, CompositeImplicitAutograd, m) {
  m.impl("lora_linear_cpp", &ppap_fast::lora_linear_cpp);
  m.impl("lora_conv2d_cpp", &ppap_fast::lora_conv2d_cpp);
}

TORCH_LIBRARY_IMPL(ppap_fast, CPU, m) {
  m.impl("lora_sgmv_shrink", &ppap_fast::seg_shrink);
  m.impl("lora_sgmv_expand", &ppap_fast::seg_expand);
  m.impl("lora_seg_outer", [](const at::Tensor& u, const at::Tensor& v, const at::Tensor& out,
                              const at::Tensor& sorted_idx, const at::Tensor& offsets, double alpha,
                              int64_t) { ppap_fast::seg_outer(u, v, out, sorted_idx, offsets, alpha); });
}
