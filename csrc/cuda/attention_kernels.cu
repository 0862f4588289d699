// Additive (Bahdanau) attention kernels: the fused forward and the energy part
// of the backward, with the semantics of fastseq/ops/attention/naive.py:
//
//   energy[b,t,j] = v^T tanh(q[b,t] + K[b,j]);  weights = softmax_j over valid j
//   context[b,t]  = sum_j weights[b,t,j] V[b,j]
//
// Forward: one block per query (b, t). Phase 1: warp w scores source
// positions j = w, w + nwarps, ...; its lanes stride over A and the warp
// reduces with shuffles; invalid positions get -inf without touching K. The
// S scores live in shared memory (a global workspace when S is too large).
// Phase 2: block max and block sum (softmax, exactly exp(e - max) / sum);
// the normalised weights are written out and kept in shared memory. Phase 3:
// threads over D form the context from the weights and V (coalesced V rows).
// Like the reference, a row without any valid position gives NaN weights.
//
// Backward (energy part; the softmax and weighted-sum part are two batched
// GEMMs and a pointwise pass done by the caller): u = tanh(q_t + K_j) is
// recomputed. Two launches, every output element owned by one thread, so no
// atomics and a fixed summation order (deterministic):
//   * keys kernel, one block per (b, chunk of kChunk source positions),
//     threads over A: dk[b,j,a] = v_a sum_t de (1 - u^2) for the chunk's j
//     (kept in registers while looping over t), and the partial
//     dv_part[b, chunk, a] = sum_{t, j in chunk} de u (summed over (b, chunk)
//     afterwards by the caller, deterministically);
//   * query kernel, one block per (b, t), threads over A:
//     dq[b,t,a] = v_a sum_j de (1 - u^2).
// All arithmetic in the compute type (float; double for float64 inputs).
#include "common.cuh"

namespace fastseq {
namespace cuda {
namespace {

using detail::acc_t;
using detail::from_acc;
using detail::ld;
using detail::tanh_;

constexpr int kAttnThreads = 256;
// Bytes of dynamic shared memory the forward may use for one query's scores
// (below the 48 KiB a block gets without an opt-in, leaving room for the
// static reduction buffer).
constexpr int64_t kMaxScoreBytes = 47 * 1024;
// Source positions per block of the keys backward kernel (register tile).
constexpr int kChunk = 8;

template <typename C>
constexpr int64_t score_bytes(int64_t S) {
  return S * static_cast<int64_t>(sizeof(C));
}

// ================================================================== forward

template <typename S, typename C = acc_t<S>>
__global__ void __launch_bounds__(kAttnThreads)
    attn_fwd_kernel(const S* __restrict__ q, int64_t sq_b, int64_t sq_t, const S* __restrict__ k,
                    int64_t sk_b, int64_t sk_s, const S* __restrict__ v, int64_t sv_b, int64_t sv_s,
                    const S* __restrict__ e, const uint8_t* __restrict__ mask, int64_t sm_b,
                    const int64_t* __restrict__ lengths, int64_t T, int64_t Sn, int64_t A, int64_t D,
                    const S* __restrict__ out_bias, int64_t sob_b, int64_t sob_t,
                    S* __restrict__ context, S* __restrict__ weights, C* __restrict__ workspace) {
  FASTSEQ_DYNAMIC_SMEM(smem_raw);
  __shared__ C red[detail::kWarp];

  const int64_t bt = blockIdx.x;
  const int64_t b = bt / T, t = bt - b * T;
  C* sc = workspace != nullptr ? workspace + bt * Sn : reinterpret_cast<C*>(smem_raw);
  const S* qr = q + b * sq_b + t * sq_t;
  const S* kb = k + b * sk_b;
  const S* vb = v + b * sv_b;
  const uint8_t* mrow = mask != nullptr ? mask + b * sm_b : nullptr;
  const int64_t len = lengths != nullptr ? lengths[b] : Sn;
  const int lane = threadIdx.x % detail::kWarp;
  const int warp = threadIdx.x / detail::kWarp;
  const int nwarps = blockDim.x / detail::kWarp;

  // Phase 1: raw scores (warp per source position; the branch is warp-uniform).
  for (int64_t j = warp; j < Sn; j += nwarps) {
    const bool valid = mrow != nullptr ? mrow[j] != 0 : j < len;
    C acc = C(0);
    if (valid) {
      const S* kr = kb + j * sk_s;
      for (int64_t a = lane; a < A; a += detail::kWarp) acc += ld(e + a) * tanh_(ld(qr + a) + ld(kr + a));
      acc = detail::warp_sum(acc);
    }
    if (lane == 0) sc[j] = valid ? acc : detail::neg_inf<C>();
  }
  __syncthreads();

  // Phase 2: softmax over j. Each thread revisits the same j in every loop.
  C m = detail::neg_inf<C>();
  for (int64_t j = threadIdx.x; j < Sn; j += blockDim.x) m = detail::nan_max(m, sc[j]);
  m = detail::block_max(m, red);
  C l = C(0);
  for (int64_t j = threadIdx.x; j < Sn; j += blockDim.x) {
    const C p = detail::exp_(sc[j] - m);
    sc[j] = p;
    l += p;
  }
  l = detail::block_sum(l, red);
  S* wr = weights + bt * Sn;
  for (int64_t j = threadIdx.x; j < Sn; j += blockDim.x) {
    const C p = sc[j] / l;
    sc[j] = p;
    wr[j] = from_acc<S>(p);
  }
  __syncthreads();

  // Phase 3: context = weights @ V, threads over D (with out_bias: tanh(out_bias + context)).
  S* cr = context + bt * D;
  const S* obr = out_bias != nullptr ? out_bias + b * sob_b + t * sob_t : nullptr;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    C acc = C(0);
    for (int64_t j = 0; j < Sn; ++j) acc += sc[j] * ld(vb + j * sv_s + d);
    if (obr != nullptr) acc = tanh_(ld(obr + d) + acc);
    cr[d] = from_acc<S>(acc);
  }
}

// ================================================================= backward

template <typename S, typename C = acc_t<S>>
__global__ void __launch_bounds__(kAttnThreads)
    attn_bwd_keys_kernel(const S* __restrict__ q, int64_t sq_b, int64_t sq_t, const S* __restrict__ k,
                         int64_t sk_b, int64_t sk_s, const S* __restrict__ e, const C* __restrict__ de,
                         int64_t T, int64_t Sn, int64_t A, int64_t n_chunks, S* __restrict__ dk,
                         C* __restrict__ dv_part) {
  const int64_t b = blockIdx.x / n_chunks, c = blockIdx.x - b * n_chunks;
  const int64_t j0 = c * kChunk;
  const int nj = static_cast<int>(Sn - j0 < kChunk ? Sn - j0 : kChunk);
  const C* deb = de + b * T * Sn + j0;
  const S* qb = q + b * sq_b;
  const S* kb = k + b * sk_b + j0 * sk_s;
  for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
    C kk[kChunk], g_sum[kChunk];
#pragma unroll
    for (int jj = 0; jj < kChunk; ++jj) {
      kk[jj] = jj < nj ? ld(kb + jj * sk_s + a) : C(0);
      g_sum[jj] = C(0);
    }
    C dv = C(0);
    for (int64_t t = 0; t < T; ++t) {
      const C qa = ld(qb + t * sq_t + a);
      const C* der = deb + t * Sn;
#pragma unroll
      for (int jj = 0; jj < kChunk; ++jj) {
        if (jj < nj) {
          const C g = der[jj];
          const C u = tanh_(qa + kk[jj]);
          const C gu = g * u;
          g_sum[jj] += g - gu * u;  // de (1 - u^2)
          dv += gu;
        }
      }
    }
    const C ea = ld(e + a);
#pragma unroll
    for (int jj = 0; jj < kChunk; ++jj) {
      if (jj < nj) dk[(b * Sn + j0 + jj) * A + a] = from_acc<S>(g_sum[jj] * ea);
    }
    dv_part[static_cast<int64_t>(blockIdx.x) * A + a] = dv;
  }
}

template <typename S, typename C = acc_t<S>>
__global__ void __launch_bounds__(kAttnThreads)
    attn_bwd_query_kernel(const S* __restrict__ q, int64_t sq_b, int64_t sq_t, const S* __restrict__ k,
                          int64_t sk_b, int64_t sk_s, const S* __restrict__ e, const C* __restrict__ de,
                          int64_t T, int64_t Sn, int64_t A, S* __restrict__ dq) {
  const int64_t bt = blockIdx.x;
  const int64_t b = bt / T, t = bt - b * T;
  const S* qr = q + b * sq_b + t * sq_t;
  const S* kb = k + b * sk_b;
  const C* der = de + bt * Sn;
  for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
    const C qa = ld(qr + a);
    C acc = C(0);
    for (int64_t j = 0; j < Sn; ++j) {
      const C g = der[j];
      const C u = tanh_(qa + ld(kb + j * sk_s + a));
      acc += g - g * u * u;  // de (1 - u^2)
    }
    dq[bt * A + a] = from_acc<S>(acc * ld(e + a));
  }
}

// ================================================================ launchers

int threads_over(int64_t n) {
  int64_t t = (n + detail::kWarp - 1) / detail::kWarp * detail::kWarp;
  if (t < detail::kWarp) t = detail::kWarp;
  return static_cast<int>(t < kAttnThreads ? t : kAttnThreads);
}

template <typename S>
cudaError_t attention_forward_impl(const AttnFwd& a, cudaStream_t stream) {
  using C = acc_t<S>;
  const int64_t n_queries = a.B * a.T;
  if (n_queries <= 0) return cudaSuccess;
  const bool shared_scores = score_bytes<C>(a.S) <= kMaxScoreBytes;
  if (!shared_scores && a.workspace == nullptr) return cudaErrorInvalidValue;
  const size_t smem = shared_scores ? static_cast<size_t>(score_bytes<C>(a.S)) : 0;
  FASTSEQ_LAUNCH(attn_fwd_kernel<S>, static_cast<unsigned int>(n_queries), kAttnThreads, smem, stream,
      static_cast<const S*>(a.q), a.sq_b, a.sq_t, static_cast<const S*>(a.k), a.sk_b, a.sk_s,
      static_cast<const S*>(a.v), a.sv_b, a.sv_s, static_cast<const S*>(a.e), a.mask, a.sm_b, a.lengths,
      a.T, a.S, a.A, a.D, static_cast<const S*>(a.out_bias), a.sob_b, a.sob_t,
      static_cast<S*>(a.context), static_cast<S*>(a.weights),
      shared_scores ? nullptr : static_cast<C*>(a.workspace));
  return detail::launch_status();
}

template <typename S>
cudaError_t attention_energy_backward_impl(const AttnEnergyBwd& a, cudaStream_t stream) {
  using C = acc_t<S>;
  if (a.B <= 0 || a.A <= 0) return cudaSuccess;
  const int threads = threads_over(a.A);
  const int64_t n_chunks = attention_backward_chunks(a.S);
  if (n_chunks > 0) {
    FASTSEQ_LAUNCH(attn_bwd_keys_kernel<S>, static_cast<unsigned int>(a.B * n_chunks), threads, 0, stream,
        static_cast<const S*>(a.q), a.sq_b, a.sq_t, static_cast<const S*>(a.k), a.sk_b, a.sk_s,
        static_cast<const S*>(a.e), static_cast<const C*>(a.de), a.T, a.S, a.A, n_chunks,
        static_cast<S*>(a.dk), static_cast<C*>(a.dv_part));
    const cudaError_t err = detail::launch_status();
    if (err != cudaSuccess) return err;
  }
  if (a.T > 0) {
    FASTSEQ_LAUNCH(attn_bwd_query_kernel<S>, static_cast<unsigned int>(a.B * a.T), threads, 0, stream,
        static_cast<const S*>(a.q), a.sq_b, a.sq_t, static_cast<const S*>(a.k), a.sk_b, a.sk_s,
        static_cast<const S*>(a.e), static_cast<const C*>(a.de), a.T, a.S, a.A, static_cast<S*>(a.dq));
  }
  return detail::launch_status();
}

template <typename S>
int64_t workspace_elems_impl(int64_t B, int64_t T, int64_t S_) {
  return score_bytes<acc_t<S>>(S_) <= kMaxScoreBytes ? 0 : B * T * S_;
}

}  // namespace

int64_t attention_forward_workspace_elems(DType dtype, int64_t B, int64_t T, int64_t S) {
  return dtype == DType::Float64 ? workspace_elems_impl<double>(B, T, S) : workspace_elems_impl<float>(B, T, S);
}

int64_t attention_backward_chunks(int64_t S) { return S <= 0 ? 0 : (S + kChunk - 1) / kChunk; }

cudaError_t attention_forward(DType dtype, const AttnFwd& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, attention_forward_impl, a, stream);
}

cudaError_t attention_energy_backward(DType dtype, const AttnEnergyBwd& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, attention_energy_backward_impl, a, stream);
}

}  // namespace cuda
}  // namespace fastseq
