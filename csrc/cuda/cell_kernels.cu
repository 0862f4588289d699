// Pointwise kernels of the attention decoder's GRU cell (forward and
// backward), with the semantics of fastseq/ops/decoder_step/naive.py
// (gru_context_cell_forward / _backward):
//
//   x = gi + context W_ic^T   (the product xc = context W_ic^T: cuBLAS, by the caller)
//   hh = gh + b_hh;  r = sig(x_r + hh_r), z = sig(x_z + hh_z)
//   n = tanh(x_n + r hh_n);  h' = (1 - z) n + z h;  gates = (r, z, n, hh_n)
//
// Backward (pointwise part; grad_context = dgi W_ic, grad_W_ic = dgi^T context
// and grad_b_hh = sum_b dgh are products / reductions by the caller):
//
//   dn = dh (1 - z)(1 - n^2), dz = dh (h - n) z (1 - z), dr = dn hn r (1 - r)
//   dgi = (dr, dz, dn), dgh = (dr, dz, dn r), dh_prev = dh z
//
// One thread per (b, j) element, grid-stride loop, compute type float
// (double for float64 inputs). The gate formulas: gates.cuh (shared with the
// recurrence kernels).
#include "common.cuh"
#include "gates.cuh"

namespace fastseq {
namespace cuda {
namespace {

using detail::acc_t;
using detail::from_acc;
using detail::ld;

constexpr int kThreads = detail::kPointwiseThreads;

template <typename S, typename C = acc_t<S>>
__global__ void __launch_bounds__(kThreads)
    gru_cell_fwd_kernel(const S* __restrict__ gi, int64_t ld_gi, const C* __restrict__ xc,
                        const S* __restrict__ gh, int64_t ld_gh, const C* __restrict__ bias,
                        const S* __restrict__ h, int64_t ld_h, int64_t B, int64_t H, S* __restrict__ h_out,
                        S* __restrict__ gates) {
  const int64_t n = B * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const S* x = gi + b * ld_gi;
    const C* xr = xc + b * 3 * H;
    const S* hh = gh + b * ld_gh;
    C h_r = ld(hh + j), h_z = ld(hh + H + j), h_n = ld(hh + 2 * H + j);
    if (bias != nullptr) {
      h_r += bias[j];
      h_z += bias[H + j];
      h_n += bias[2 * H + j];
    }
    const detail::GruGates<C> y =
        detail::gru_gate_forward(ld(x + j) + xr[j], ld(x + H + j) + xr[H + j], ld(x + 2 * H + j) + xr[2 * H + j],
                                 h_r, h_z, h_n, ld(h + b * ld_h + j));
    h_out[idx] = from_acc<S>(y.h);
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
    gru_cell_bwd_kernel(const S* __restrict__ grad_h, const S* __restrict__ gates, const S* __restrict__ h,
                        int64_t ld_h, int64_t B, int64_t H, C* __restrict__ dgi_c, C* __restrict__ dgh_c,
                        S* __restrict__ dgi_s, S* __restrict__ dgh_s, S* __restrict__ dh_prev) {
  const int64_t n = B * H;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const S* g = gates + b * 4 * H;
    const detail::GruGateGrads<C> y = detail::gru_gate_backward(
        ld(grad_h + idx), ld(g + j), ld(g + H + j), ld(g + 2 * H + j), ld(g + 3 * H + j), ld(h + b * ld_h + j));
    const int64_t o = b * 3 * H + j;
    dgi_c[o] = y.dr;
    dgi_c[o + H] = y.dz;
    dgi_c[o + 2 * H] = y.dn;
    if (dgh_c != nullptr) {
      dgh_c[o] = y.dr;
      dgh_c[o + H] = y.dz;
      dgh_c[o + 2 * H] = y.dhn;
    }
    if (dgi_s != nullptr) {
      dgi_s[o] = from_acc<S>(y.dr);
      dgi_s[o + H] = from_acc<S>(y.dz);
      dgi_s[o + 2 * H] = from_acc<S>(y.dn);
    }
    if (dgh_s != nullptr) {
      dgh_s[o] = from_acc<S>(y.dr);
      dgh_s[o + H] = from_acc<S>(y.dz);
      dgh_s[o + 2 * H] = from_acc<S>(y.dhn);
    }
    dh_prev[idx] = from_acc<S>(y.dh);
  }
}

template <typename S>
cudaError_t gru_cell_forward_impl(const GruCellFwd& a, cudaStream_t stream) {
  using C = acc_t<S>;
  const int64_t n = a.B * a.H;
  if (n <= 0) return cudaSuccess;
  FASTSEQ_LAUNCH(gru_cell_fwd_kernel<S>, detail::blocks_for(n, kThreads), kThreads, 0, stream,
      static_cast<const S*>(a.gi), a.ld_gi, static_cast<const C*>(a.xc), static_cast<const S*>(a.gh), a.ld_gh,
      static_cast<const C*>(a.bias), static_cast<const S*>(a.h), a.ld_h, a.B, a.H, static_cast<S*>(a.h_out),
      static_cast<S*>(a.gates));
  return detail::launch_status();
}

template <typename S>
cudaError_t gru_cell_backward_impl(const GruCellBwd& a, cudaStream_t stream) {
  using C = acc_t<S>;
  const int64_t n = a.B * a.H;
  if (n <= 0) return cudaSuccess;
  FASTSEQ_LAUNCH(gru_cell_bwd_kernel<S>, detail::blocks_for(n, kThreads), kThreads, 0, stream,
      static_cast<const S*>(a.grad_h), static_cast<const S*>(a.gates), static_cast<const S*>(a.h), a.ld_h, a.B,
      a.H, static_cast<C*>(a.dgi_c), static_cast<C*>(a.dgh_c), static_cast<S*>(a.dgi_s),
      static_cast<S*>(a.dgh_s), static_cast<S*>(a.dh_prev));
  return detail::launch_status();
}

}  // namespace

cudaError_t gru_cell_forward(DType dtype, const GruCellFwd& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, gru_cell_forward_impl, a, stream);
}

cudaError_t gru_cell_backward(DType dtype, const GruCellBwd& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, gru_cell_backward_impl, a, stream);
}

}  // namespace cuda
}  // namespace fastseq
