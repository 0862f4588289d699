// Per-step pointwise kernels of the GRU and LSTM recurrences (forward and
// backward), with the exact semantics of fastseq/ops/recurrence/naive.py.
//
// Design (mirrors fastseq/ops/recurrence/triton.py, with the recurrent product left
// to cuBLAS): per time step the caller issues one GEMM (forward:
// gh = h_{t-1} W_hh^T; backward: dh += dG_t W_hh) and one launch of the
// kernel here, which fuses everything else of the step: bias, gate
// activations, state update, lengths masking, and the writes of hs[t] (cs[t]),
// the saved gates and, for half inputs, the float32 copy of the state that the
// next step's GEMM reads (the state is carried in float32, never rounded to
// half between steps, like the reference). One thread per (b, j) element,
// grid-stride loop; all arithmetic in the compute type (float, or double for
// float64). No shared memory, no atomics. The gate formulas: gates.cuh
// (shared with the decoder's GRU cell kernels).
//
// The same kernels serve the packed layout (a PackedSequence's, kernels.h):
// the caller passes the step's row count as B and pointers already offset to
// the step's rows; rows b >= n_prev read their previous state from the
// alternative pointer (h0 / c0, [B, H] contiguous) instead of the previous
// step's rows (the reverse direction, where longer rows start). The dense
// path passes n_prev = B (forward) or n_prev = t > 0 ? B : 0 (backward).
#include "common.cuh"
#include "gates.cuh"

namespace fastseq {
namespace cuda {
namespace {

using detail::acc_t;
using detail::from_acc;
using detail::ld;
using detail::tanh_;

constexpr int kThreads = detail::kPointwiseThreads;

__device__ __forceinline__ bool row_valid(const int64_t* lengths, int64_t b, int64_t t) {
  return lengths == nullptr || lengths[b] > t;
}

// The previous state of element (b, j): rows b < n_prev from `prev` (rows ld
// apart), the others from `alt` (rows H apart: h0 / c0).
template <typename C>
__device__ __forceinline__ C prev_state(const C* prev, int64_t ld, const C* alt, int64_t n_prev, int64_t b,
                                        int64_t j, int64_t H) {
  return b < n_prev ? prev[b * ld + j] : alt[b * H + j];
}

// ====================================================================== GRU

template <typename S, typename C = acc_t<S>>
__global__ void __launch_bounds__(kThreads)
    gru_fwd_kernel(const S* __restrict__ gi, int64_t ld_gi, const C* __restrict__ gh,
                   const C* __restrict__ bias, const C* __restrict__ h_prev, int64_t ld_h,
                   const C* __restrict__ h_alt, int64_t n_prev, const int64_t* __restrict__ lengths,
                   int64_t t, int64_t B, int64_t H, C* __restrict__ h_state, S* __restrict__ hs_out,
                   S* __restrict__ gates) {
  const int64_t n = B * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const S* x = gi + b * ld_gi;
    const C* hh = gh + b * 3 * H;
    C h_r = hh[j], h_z = hh[H + j], h_n = hh[2 * H + j];
    if (bias != nullptr) {
      h_r += bias[j];
      h_z += bias[H + j];
      h_n += bias[2 * H + j];
    }
    const C hp = prev_state(h_prev, ld_h, h_alt, n_prev, b, j, H);
    const detail::GruGates<C> y =
        detail::gru_gate_forward(ld(x + j), ld(x + H + j), ld(x + 2 * H + j), h_r, h_z, h_n, hp);
    const C h_new = row_valid(lengths, b, t) ? y.h : hp;
    if (h_state != nullptr) h_state[idx] = h_new;
    hs_out[idx] = from_acc<S>(h_new);
    if (gates != nullptr) {
      S* g = gates + b * 4 * H;
      g[j] = from_acc<S>(y.r);
      g[H + j] = from_acc<S>(y.z);
      g[2 * H + j] = from_acc<S>(y.n);
      g[3 * H + j] = from_acc<S>(h_n);
    }
  }
}

template <typename S, typename C = acc_t<S>>
__global__ void __launch_bounds__(kThreads)
    gru_bwd_kernel(const S* __restrict__ grad_hs, const S* __restrict__ gates,
                   const S* __restrict__ h_prev_s, const C* __restrict__ h_prev_c, int64_t n_prev,
                   const int64_t* __restrict__ lengths, int64_t t, int64_t B, int64_t H,
                   C* __restrict__ dh, S* __restrict__ dgi, C* __restrict__ dgh) {
  const int64_t n = B * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const C d = dh[idx] + ld(grad_hs + idx);
    S* gx = dgi + b * 3 * H;
    C* gy = dgh + b * 3 * H;
    if (!row_valid(lengths, b, t)) {
      gx[j] = gx[H + j] = gx[2 * H + j] = from_acc<S>(C(0));
      gy[j] = gy[H + j] = gy[2 * H + j] = C(0);
      dh[idx] = d;
      continue;
    }
    const S* g = gates + b * 4 * H;
    const C hp = b < n_prev ? ld(h_prev_s + idx) : h_prev_c[idx];
    const detail::GruGateGrads<C> y =
        detail::gru_gate_backward(d, ld(g + j), ld(g + H + j), ld(g + 2 * H + j), ld(g + 3 * H + j), hp);
    gx[j] = from_acc<S>(y.dr);
    gx[H + j] = from_acc<S>(y.dz);
    gx[2 * H + j] = from_acc<S>(y.dn);
    gy[j] = y.dr;
    gy[H + j] = y.dz;
    gy[2 * H + j] = y.dhn;
    dh[idx] = y.dh;  // + dgh[t] @ W_hh, added by the caller's GEMM
  }
}

// ===================================================================== LSTM

template <typename S, typename C = acc_t<S>>
__global__ void __launch_bounds__(kThreads)
    lstm_fwd_kernel(const S* __restrict__ gi, int64_t ld_gi, const C* __restrict__ gh,
                    const C* __restrict__ bias, const C* __restrict__ h_prev, int64_t ld_h,
                    const C* __restrict__ c_prev, int64_t ld_c, const C* __restrict__ h_alt,
                    const C* __restrict__ c_alt, int64_t n_prev, const int64_t* __restrict__ lengths,
                    int64_t t, int64_t B, int64_t H, C* __restrict__ h_state, C* __restrict__ c_state,
                    S* __restrict__ hs_out, S* __restrict__ cs_out, S* __restrict__ gates) {
  const int64_t n = B * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const S* x = gi + b * ld_gi;
    const C* hh = gh + b * 4 * H;
    // pre = gi[t] + (h W_hh^T + b_hh), summed in the reference's order.
    C h_i = hh[j], h_f = hh[H + j], h_g = hh[2 * H + j], h_o = hh[3 * H + j];
    if (bias != nullptr) {
      h_i += bias[j];
      h_f += bias[H + j];
      h_g += bias[2 * H + j];
      h_o += bias[3 * H + j];
    }
    const C hp = prev_state(h_prev, ld_h, h_alt, n_prev, b, j, H);
    const C cp = prev_state(c_prev, ld_c, c_alt, n_prev, b, j, H);
    const detail::LstmGates<C> y = detail::lstm_gate_forward(ld(x + j), ld(x + H + j), ld(x + 2 * H + j),
                                                             ld(x + 3 * H + j), h_i, h_f, h_g, h_o, cp);
    const bool valid = row_valid(lengths, b, t);
    const C h_new = valid ? y.h : hp;
    const C c_new = valid ? y.c : cp;
    if (h_state != nullptr) h_state[idx] = h_new;
    if (c_state != nullptr) c_state[idx] = c_new;
    hs_out[idx] = from_acc<S>(h_new);
    cs_out[idx] = from_acc<S>(c_new);
    if (gates != nullptr) {
      S* gg = gates + b * 4 * H;
      gg[j] = from_acc<S>(y.i);
      gg[H + j] = from_acc<S>(y.f);
      gg[2 * H + j] = from_acc<S>(y.g);
      gg[3 * H + j] = from_acc<S>(y.o);
    }
  }
}

template <typename S, typename C = acc_t<S>>
__global__ void __launch_bounds__(kThreads)
    lstm_bwd_kernel(const S* __restrict__ grad_hs, const S* __restrict__ grad_cs,
                    const S* __restrict__ gates, const S* __restrict__ c,
                    const S* __restrict__ c_prev_s, const C* __restrict__ c_prev_c, int64_t n_prev,
                    const int64_t* __restrict__ lengths, int64_t t, int64_t B, int64_t H,
                    C* __restrict__ dh, C* __restrict__ dc, C* __restrict__ dg, S* __restrict__ dgi_s) {
  const int64_t n = B * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const C d = dh[idx] + ld(grad_hs + idx);
    const C dc_in = dc[idx] + ld(grad_cs + idx);
    C* gd = dg + b * 4 * H;
    S* gs = dgi_s != nullptr ? dgi_s + b * 4 * H : nullptr;
    if (!row_valid(lengths, b, t)) {
      gd[j] = gd[H + j] = gd[2 * H + j] = gd[3 * H + j] = C(0);
      if (gs != nullptr) gs[j] = gs[H + j] = gs[2 * H + j] = gs[3 * H + j] = from_acc<S>(C(0));
      dh[idx] = d;
      dc[idx] = dc_in;
      continue;
    }
    const S* g = gates + b * 4 * H;
    const C i = ld(g + j), f = ld(g + H + j), gg = ld(g + 2 * H + j), o = ld(g + 3 * H + j);
    const C tc = tanh_(ld(c + idx));
    const C cp = b < n_prev ? ld(c_prev_s + idx) : c_prev_c[idx];
    const detail::LstmGateGrads<C> y = detail::lstm_gate_backward(d, dc_in, i, f, gg, o, tc, cp);
    gd[j] = y.di;
    gd[H + j] = y.df;
    gd[2 * H + j] = y.dg;
    gd[3 * H + j] = y.d_o;
    if (gs != nullptr) {
      gs[j] = from_acc<S>(y.di);
      gs[H + j] = from_acc<S>(y.df);
      gs[2 * H + j] = from_acc<S>(y.dg);
      gs[3 * H + j] = from_acc<S>(y.d_o);
    }
    dh[idx] = C(0);  // dg[t] @ W_hh is added by the caller's GEMM
    dc[idx] = y.dc;
  }
}

// ================================================================ launchers

template <typename S>
cudaError_t gru_forward_step_impl(const GruFwdStep& a, cudaStream_t stream) {
  using C = acc_t<S>;
  const int64_t n = a.B * a.H;
  if (n <= 0) return cudaSuccess;
  FASTSEQ_LAUNCH(gru_fwd_kernel<S>, detail::blocks_for(n, kThreads), kThreads, 0, stream,
      static_cast<const S*>(a.gi), a.ld_gi, static_cast<const C*>(a.gh), static_cast<const C*>(a.bias),
      static_cast<const C*>(a.h_prev), a.ld_h, static_cast<const C*>(a.h_alt), a.n_prev, a.lengths, a.t,
      a.B, a.H, static_cast<C*>(a.h_state), static_cast<S*>(a.hs_out), static_cast<S*>(a.gates));
  return detail::launch_status();
}

template <typename S>
cudaError_t gru_backward_step_impl(const GruBwdStep& a, cudaStream_t stream) {
  using C = acc_t<S>;
  const int64_t n = a.B * a.H;
  if (n <= 0) return cudaSuccess;
  FASTSEQ_LAUNCH(gru_bwd_kernel<S>, detail::blocks_for(n, kThreads), kThreads, 0, stream,
      static_cast<const S*>(a.grad_hs), static_cast<const S*>(a.gates), static_cast<const S*>(a.h_prev_s),
      static_cast<const C*>(a.h_prev_c), a.n_prev, a.lengths, a.t, a.B, a.H, static_cast<C*>(a.dh),
      static_cast<S*>(a.dgi), static_cast<C*>(a.dgh));
  return detail::launch_status();
}

template <typename S>
cudaError_t lstm_forward_step_impl(const LstmFwdStep& a, cudaStream_t stream) {
  using C = acc_t<S>;
  const int64_t n = a.B * a.H;
  if (n <= 0) return cudaSuccess;
  FASTSEQ_LAUNCH(lstm_fwd_kernel<S>, detail::blocks_for(n, kThreads), kThreads, 0, stream,
      static_cast<const S*>(a.gi), a.ld_gi, static_cast<const C*>(a.gh), static_cast<const C*>(a.bias),
      static_cast<const C*>(a.h_prev), a.ld_h, static_cast<const C*>(a.c_prev), a.ld_c,
      static_cast<const C*>(a.h_alt), static_cast<const C*>(a.c_alt), a.n_prev, a.lengths, a.t, a.B, a.H,
      static_cast<C*>(a.h_state), static_cast<C*>(a.c_state), static_cast<S*>(a.hs_out),
      static_cast<S*>(a.cs_out), static_cast<S*>(a.gates));
  return detail::launch_status();
}

template <typename S>
cudaError_t lstm_backward_step_impl(const LstmBwdStep& a, cudaStream_t stream) {
  using C = acc_t<S>;
  const int64_t n = a.B * a.H;
  if (n <= 0) return cudaSuccess;
  FASTSEQ_LAUNCH(lstm_bwd_kernel<S>, detail::blocks_for(n, kThreads), kThreads, 0, stream,
      static_cast<const S*>(a.grad_hs), static_cast<const S*>(a.grad_cs), static_cast<const S*>(a.gates),
      static_cast<const S*>(a.c), static_cast<const S*>(a.c_prev_s), static_cast<const C*>(a.c_prev_c),
      a.n_prev, a.lengths, a.t, a.B, a.H, static_cast<C*>(a.dh), static_cast<C*>(a.dc), static_cast<C*>(a.dg),
      static_cast<S*>(a.dgi_s));
  return detail::launch_status();
}

}  // namespace

cudaError_t gru_forward_step(DType dtype, const GruFwdStep& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, gru_forward_step_impl, a, stream);
}

cudaError_t gru_backward_step(DType dtype, const GruBwdStep& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, gru_backward_step_impl, a, stream);
}

cudaError_t lstm_forward_step(DType dtype, const LstmFwdStep& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, lstm_forward_step_impl, a, stream);
}

cudaError_t lstm_backward_step(DType dtype, const LstmBwdStep& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, lstm_backward_step_impl, a, stream);
}

}  // namespace cuda
}  // namespace fastseq
