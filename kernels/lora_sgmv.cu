// SGMV shrink / expand forward kernels (see lora_kernels.cuh for the contract).
//
// One kernel serves both: out[row, n] (+)= scale * sum_k X[row, k] * Wt[e, n, k] over the
// rows of expert e's segment. Grid: x = cdiv(S*M, BM) + N row tiles (an upper bound known
// from shapes alone, so no host sync), y = cdiv(NC, BN) column tiles. Each block scans the
// N+1 offsets to find its (expert, tile); blocks without one exit at once, so empty experts
// cost nothing. Rows are gathered through sorted_idx; expert weights are indexed by expert
// id in the stacked [N, ...] tensor (no pointer arrays). Shared-memory tiled, fp32 (opmath)
// accumulation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <tuple>

#include "lora_kernels.cuh"

namespace ppap_fast {
namespace {

constexpr int kBM = 32;       // rows per tile
constexpr int kBN = 32;       // output columns per tile
constexpr int kBK = 32;       // reduction chunk
constexpr int kThreads = 256; // each thread owns (kBM * kBN) / kThreads = 4 outputs

struct Strides3 {
  int64_t s0, s1, s2;
};

__device__ __forceinline__ void find_tile(const int* __restrict__ offsets, int N, int64_t M, int64_t tile,
                                          int& expert, int64_t& start, int64_t& nrows, int& seg0) {
  int64_t acc = 0;
  expert = -1;
  for (int e = 0; e < N; ++e) {
    const int lo = offsets[e];
    const int64_t rows = static_cast<int64_t>(offsets[e + 1] - lo) * M;
    const int64_t nt = (rows + kBM - 1) / kBM;
    if (tile >= acc && tile < acc + nt) {
      expert = e;
      start = (tile - acc) * kBM;
      nrows = rows;
      seg0 = lo;
      return;
    }
    acc += nt;
  }
}

// kRowsFast: consecutive threads own consecutive rows (used when `out` is contiguous along
// rows, e.g. an NCHW map viewed as [S, H*W, C], so stores coalesce); otherwise consecutive
// threads own consecutive output columns (row-major outputs such as [S, L, D]).
template <typename scalar_t, bool kAccum, bool kRowsFast>
__global__ void __launch_bounds__(kThreads)
sgmv_kernel(const scalar_t* __restrict__ X, Strides3 xs, const scalar_t* __restrict__ Wt, Strides3 ws,
            scalar_t* __restrict__ out, Strides3 os, const int* __restrict__ sorted_idx,
            const int* __restrict__ offsets, int N, int64_t M, int64_t K, int64_t NC, float scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t xt[kBM][kBK + 1];
  __shared__ acc_t wt[kBK][kBN + 1];
  __shared__ int64_t xrow[kBM];
  __shared__ int64_t orow[kBM];

  int expert;
  int64_t start = 0, nrows = 0;
  int seg0 = 0;
  find_tile(offsets, N, M, blockIdx.x, expert, start, nrows, seg0);
  if (expert < 0) return;  // uniform across the block

  const int tid = threadIdx.x;
  if (tid < kBM) {
    const int64_t j = start + tid;
    int64_t xr = -1, orr = -1;
    if (j < nrows) {
      const int64_t s = sorted_idx[seg0 + j / M];
      const int64_t m = j % M;
      xr = s * xs.s0 + m * xs.s1;
      orr = s * os.s0 + m * os.s1;
    }
    xrow[tid] = xr;
    orow[tid] = orr;
  }
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const scalar_t* wbase = Wt + static_cast<int64_t>(expert) * ws.s0;

  // thread -> its kPer outputs (r_of(i), c_of(i)); lane_a in [0, 32), lane_b in [0, 8)
  static_assert(kBM == 32 && kBN == 32 && kThreads == 256, "thread mapping assumes 32x32 tiles, 256 threads");
  constexpr int kStep = kThreads / 32;  // 8
  constexpr int kPer = 32 / kStep;      // 4
  const int lane_a = tid % 32;
  const int lane_b = tid / 32;
  auto r_of = [&](int i) { return kRowsFast ? lane_a : lane_b + i * kStep; };
  auto c_of = [&](int i) { return kRowsFast ? lane_b + i * kStep : lane_a; };
  acc_t acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = acc_t(0);
  __syncthreads();

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    for (int i = tid; i < kBM * kBK; i += kThreads) {
      const int r = i % kBM, k = i / kBM;  // row-fastest: coalesced for NCHW-style rows
      const int64_t kk = k0 + k;
      const int64_t base = xrow[r];
      xt[r][k] = (base >= 0 && kk < K) ? static_cast<acc_t>(X[base + kk * xs.s2]) : acc_t(0);
    }
    for (int i = tid; i < kBK * kBN; i += kThreads) {
      const int k = i % kBK, n = i / kBK;  // k-fastest: W is usually contiguous along k
      const int64_t kk = k0 + k, nn = n0 + n;
      wt[k][n] = (kk < K && nn < NC) ? static_cast<acc_t>(wbase[nn * ws.s1 + kk * ws.s2]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kBK; ++k) {
#pragma unroll
      for (int i = 0; i < kPer; ++i) acc[i] += xt[r_of(i)][k] * wt[k][c_of(i)];
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t nn = n0 + c_of(i);
    const int64_t base = orow[r_of(i)];
    if (base < 0 || nn >= NC) continue;
    scalar_t* p = out + base + nn * os.s2;
    acc_t v = acc[i] * static_cast<acc_t>(scale);
    if (kAccum) v += static_cast<acc_t>(*p);
    *p = static_cast<scalar_t>(v);
  }
}

Strides3 strides3(const at::Tensor& t) { return Strides3{t.stride(0), t.stride(1), t.stride(2)}; }

void check_args(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                const at::Tensor& sorted_idx, const at::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && out.dim() == 3, op, ": x, weight and out must be 3-D, got ",
              x.sizes(), ", ", w.sizes(), ", ", out.sizes());
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && out.is_cuda() && sorted_idx.is_cuda() && offsets.is_cuda(), op,
              ": all tensors must be CUDA tensors");
  TORCH_CHECK(x.get_device() == w.get_device() && x.get_device() == out.get_device() &&
                  x.get_device() == sorted_idx.get_device() && x.get_device() == offsets.get_device(),
              op, ": all tensors must be on the same device");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && x.scalar_type() == out.scalar_type(), op,
              ": x, weight and out must share a dtype, got ", x.scalar_type(), ", ", w.scalar_type(), ", ",
              out.scalar_type());
  TORCH_CHECK(sorted_idx.scalar_type() == at::kInt && offsets.scalar_type() == at::kInt, op,
              ": sorted_idx and offsets must be int32");
  TORCH_CHECK(sorted_idx.dim() == 1 && sorted_idx.size(0) == x.size(0) && sorted_idx.is_contiguous(), op,
              ": sorted_idx must be contiguous [S]");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == w.size(0) + 1 && offsets.is_contiguous(), op,
              ": offsets must be contiguous [N+1]");
  TORCH_CHECK(x.size(2) == w.size(2), op, ": reduction dims differ: ", x.size(2), " vs ", w.size(2));
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1) && out.size(2) == w.size(1), op,
              ": out must be [S, M, ", w.size(1), "], got ", out.sizes());
}

template <bool kAccum>
void launch(const at::Tensor& X, const at::Tensor& Wt, const at::Tensor& out, const at::Tensor& sorted_idx,
            const at::Tensor& offsets, double scale, cudaStream_t stream) {
  const int64_t S = X.size(0), M = X.size(1), K = X.size(2);
  const int N = static_cast<int>(Wt.size(0));
  const int64_t NC = Wt.size(1);
  if (S == 0 || M == 0 || NC == 0 || N == 0) return;
  const int64_t tiles = (S * M + kBM - 1) / kBM + N;
  TORCH_CHECK(tiles < (int64_t(1) << 31), "sgmv: too many row tiles");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((NC + kBN - 1) / kBN));
  const bool rows_fast = out.stride(1) == 1 && out.stride(2) != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "ppap_sgmv", [&] {
    auto args = std::make_tuple(X.data_ptr<scalar_t>(), strides3(X), Wt.data_ptr<scalar_t>(), strides3(Wt),
                                out.data_ptr<scalar_t>(), strides3(out), sorted_idx.data_ptr<int>(),
                                offsets.data_ptr<int>(), N, M, K, NC, static_cast<float>(scale));
    auto go = [&](auto kernel) {
      std::apply([&](auto... a) { kernel<<<grid, kThreads, 0, stream>>>(a...); }, args);
    };
    if (rows_fast) {
      go(sgmv_kernel<scalar_t, kAccum, true>);
    } else {
      go(sgmv_kernel<scalar_t, kAccum, false>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


// seg_outer: out[e, p, q] = alpha * sum_{rows j of segment e} U[j, p] * V[j, q] (dA = dh^T x,
// dB = s dy^T h). Grid: x = N experts, y = cdiv(P, 32), z = cdiv(Q, 32) * split. Each block owns
// one 32x32 output tile and 1/split of the segment's rows; with split == 1 it writes `out`
// directly (zeros for an empty segment), else fp32 partials to ws[split, N, P, Q], summed in a
// fixed order by seg_outer_reduce (deterministic: no atomics).
template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
seg_outer_kernel(const scalar_t* __restrict__ U, Strides3 us, const scalar_t* __restrict__ V, Strides3 vs,
                 out_t* __restrict__ out, Strides3 os, at::opmath_type<scalar_t>* __restrict__ ws,
                 const int* __restrict__ sorted_idx, const int* __restrict__ offsets, int N, int64_t M, int64_t P,
                 int64_t Q, int split, float alpha) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t ut[kBM][kBN + 1];  // [row][p]
  __shared__ acc_t vt[kBM][kBN + 1];  // [row][q]
  __shared__ int64_t urow[kBM];
  __shared__ int64_t vrow[kBM];

  const int e = blockIdx.x;
  const int sp = static_cast<int>(blockIdx.z) % split;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int64_t q0 = static_cast<int64_t>(blockIdx.z / split) * kBN;
  const int lo = offsets[e];
  const int64_t nrows = static_cast<int64_t>(offsets[e + 1] - lo) * M;
  const int64_t chunk = ((nrows + split - 1) / split + kBM - 1) / kBM * kBM;
  const int64_t r_begin = sp * chunk;
  const int64_t r_end = r_begin + chunk < nrows ? r_begin + chunk : nrows;

  const int tid = threadIdx.x;
  constexpr int kStep = kThreads / 32;  // 8
  constexpr int kPer = 32 / kStep;      // 4
  const int lane_q = tid % 32;          // q fastest: dA [N,R,K] and dB [N,C,R] are contiguous along q
  const int lane_p = tid / 32;
  // load order per operand: row-fastest when rows are the contiguous axis (NCHW maps)
  const bool u_rows_fast = us.s1 == 1 && us.s2 != 1;
  const bool v_rows_fast = vs.s1 == 1 && vs.s2 != 1;
  acc_t acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = acc_t(0);

  for (int64_t j0 = r_begin; j0 < r_end; j0 += kBM) {
    __syncthreads();  // the previous chunk's smem reads are done
    if (tid < kBM) {
      const int64_t j = j0 + tid;
      int64_t ur = -1, vr = -1;
      if (j < r_end) {
        const int64_t s = sorted_idx[lo + j / M];
        const int64_t m = j % M;
        ur = s * us.s0 + m * us.s1;
        vr = s * vs.s0 + m * vs.s1;
      }
      urow[tid] = ur;
      vrow[tid] = vr;
    }
    __syncthreads();
    for (int i = tid; i < kBM * kBN; i += kThreads) {
      const int r = u_rows_fast ? i % kBM : i / kBN, c = u_rows_fast ? i / kBM : i % kBN;
      const int64_t base = urow[r], pp = p0 + c;
      ut[r][c] = (base >= 0 && pp < P) ? static_cast<acc_t>(U[base + pp * us.s2]) : acc_t(0);
    }
    for (int i = tid; i < kBM * kBN; i += kThreads) {
      const int r = v_rows_fast ? i % kBM : i / kBN, c = v_rows_fast ? i / kBM : i % kBN;
      const int64_t base = vrow[r], qq = q0 + c;
      vt[r][c] = (base >= 0 && qq < Q) ? static_cast<acc_t>(V[base + qq * vs.s2]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kBM; ++j) {
      const acc_t v = vt[j][lane_q];
#pragma unroll
      for (int i = 0; i < kPer; ++i) acc[i] += ut[j][lane_p + i * kStep] * v;
    }
  }

  const int64_t qq = q0 + lane_q;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t pp = p0 + lane_p + i * kStep;
    if (pp >= P || qq >= Q) continue;
    if (split == 1) {
      out[e * os.s0 + pp * os.s1 + qq * os.s2] = static_cast<out_t>(acc[i] * static_cast<acc_t>(alpha));
    } else {
      ws[((static_cast<int64_t>(sp) * N + e) * P + pp) * Q + qq] = acc[i];
    }
  }
}

template <typename acc_t, typename out_t>
__global__ void seg_outer_reduce(const acc_t* __restrict__ ws, out_t* __restrict__ out, Strides3 os, int split,
                                 int64_t N, int64_t P, int64_t Q, float alpha) {
  const int64_t total = N * P * Q;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t v = acc_t(0);
    for (int sp = 0; sp < split; ++sp) v += ws[sp * total + i];  // fixed order
    const int64_t q = i % Q, p = (i / Q) % P, e = i / (P * Q);
    out[e * os.s0 + p * os.s1 + q * os.s2] = static_cast<out_t>(v * static_cast<acc_t>(alpha));
  }
}

template <typename scalar_t, typename out_t>
void launch_seg_outer_typed(const at::Tensor& u, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& sorted_idx, const at::Tensor& offsets, double alpha, int split,
                            cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = u.size(1), P = u.size(2), Q = v.size(2);
  const int N = static_cast<int>(out.size(0));
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((P + kBN - 1) / kBN),
                  static_cast<unsigned>((Q + kBN - 1) / kBN * split));
  at::Tensor ws;
  acc_t* wsp = nullptr;
  if (split > 1) {  // caching allocator: fine under graph capture
    ws = at::empty({split, N, P, Q}, u.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    wsp = ws.data_ptr<acc_t>();
  }
  seg_outer_kernel<scalar_t, out_t><<<grid, kThreads, 0, stream>>>(
      u.data_ptr<scalar_t>(), strides3(u), v.data_ptr<scalar_t>(), strides3(v), out.data_ptr<out_t>(),
      strides3(out), wsp, sorted_idx.data_ptr<int>(), offsets.data_ptr<int>(), N, M, P, Q, split,
      static_cast<float>(alpha));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (split > 1) {
    const int64_t total = static_cast<int64_t>(N) * P * Q;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 4096));
    seg_outer_reduce<acc_t, out_t><<<blocks, 256, 0, stream>>>(wsp, out.data_ptr<out_t>(), strides3(out), split, N,
                                                                P, Q, static_cast<float>(alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_sgmv_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& out,
                        const at::Tensor& sorted_idx, const at::Tensor& offsets, cudaStream_t stream) {
  check_args("sgmv_shrink", x, A, out, sorted_idx, offsets);
  launch<false>(x, A, out, sorted_idx, offsets, 1.0, stream);
}

void launch_sgmv_expand(const at::Tensor& h, const at::Tensor& B, const at::Tensor& out,
                        const at::Tensor& sorted_idx, const at::Tensor& offsets, double scale,
                        cudaStream_t stream) {
  check_args("sgmv_expand", h, B, out, sorted_idx, offsets);
  launch<true>(h, B, out, sorted_idx, offsets, scale, stream);
}

}  // namespace ppap_fast

namespace ppap_fast {

void launch_seg_outer(const at::Tensor& u, const at::Tensor& v, const at::Tensor& out, const at::Tensor& sorted_idx,
                      const at::Tensor& offsets, double alpha, int64_t split, cudaStream_t stream) {
  TORCH_CHECK(u.dim() == 3 && v.dim() == 3 && out.dim() == 3, "seg_outer: u, v and out must be 3-D, got ",
              u.sizes(), ", ", v.sizes(), ", ", out.sizes());
  TORCH_CHECK(u.is_cuda() && v.is_cuda() && out.is_cuda() && sorted_idx.is_cuda() && offsets.is_cuda(),
              "seg_outer: all tensors must be CUDA tensors");
  TORCH_CHECK(u.get_device() == v.get_device() && u.get_device() == out.get_device() &&
                  u.get_device() == sorted_idx.get_device() && u.get_device() == offsets.get_device(),
              "seg_outer: all tensors must be on the same device");
  TORCH_CHECK(u.scalar_type() == v.scalar_type(), "seg_outer: u and v must share a dtype, got ", u.scalar_type(),
              ", ", v.scalar_type());
  TORCH_CHECK(out.scalar_type() == u.scalar_type() || out.scalar_type() == at::kFloat,
              "seg_outer: out must have u's dtype or float32, got ", out.scalar_type());
  TORCH_CHECK(sorted_idx.scalar_type() == at::kInt && offsets.scalar_type() == at::kInt,
              "seg_outer: sorted_idx and offsets must be int32");
  TORCH_CHECK(u.size(0) == v.size(0) && u.size(1) == v.size(1), "seg_outer: u and v must share [S, M], got ",
              u.sizes(), ", ", v.sizes());
  TORCH_CHECK(sorted_idx.dim() == 1 && sorted_idx.size(0) == u.size(0) && sorted_idx.is_contiguous(),
              "seg_outer: sorted_idx must be contiguous [S]");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == out.size(0) + 1 && offsets.is_contiguous(),
              "seg_outer: offsets must be contiguous [N+1]");
  TORCH_CHECK(out.size(1) == u.size(2) && out.size(2) == v.size(2), "seg_outer: out must be [N, ", u.size(2), ", ",
              v.size(2), "], got ", out.sizes());
  const int64_t S = u.size(0), M = u.size(1), P = u.size(2), Q = v.size(2), N = out.size(0);
  if (N == 0 || P == 0 || Q == 0) return;
  if (S == 0 || M == 0) {
    out.zero_();
    return;
  }
  if (split <= 0) {  // from shapes only (no sync): ~2 blocks per SM, >= 4 row tiles per split
    const int64_t tiles = N * ((P + kBN - 1) / kBN) * ((Q + kBN - 1) / kBN);
    const int64_t target = 2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    const int64_t by_rows = (S * M + kBM * N * 4 - 1) / (kBM * N * 4);
    split = std::max<int64_t>(1, std::min<int64_t>({16, (target + tiles - 1) / tiles, by_rows}));
  }
  TORCH_CHECK(split <= 64, "seg_outer: split must be <= 64, got ", split);
  TORCH_CHECK((Q + kBN - 1) / kBN * split < 65536 && (P + kBN - 1) / kBN < 65536, "seg_outer: P or Q too large");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "ppap_seg_outer", [&] {
    if (out.scalar_type() == u.scalar_type()) {
      launch_seg_outer_typed<scalar_t, scalar_t>(u, v, out, sorted_idx, offsets, alpha, static_cast<int>(split),
                                                 stream);
    } else {
      launch_seg_outer_typed<scalar_t, float>(u, v, out, sorted_idx, offsets, alpha, static_cast<int>(split),
                                              stream);
    }
  });
}

}  // namespace ppap_fast
