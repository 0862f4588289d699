// The GRU cell of the attention decoder on the CPU (ATen), with the exact
// semantics of fastseq/ops/decoder_step/naive.py (gru_context_cell_forward /
// gru_context_cell_backward):
//
//     x = gi + context W_ic^T,  hh = gh + b_hh
//     r = sigmoid(x_r + hh_r),  z = sigmoid(x_z + hh_z)
//     n = tanh(x_n + r * hh_n), h' = (1 - z) * n + z * h
//
// Forward: context W_ic^T through ATen (one GEMM), then ONE fused pointwise
// pass over [B, H] (at::parallel_for over rows, a vectorised loop over H) that
// adds gi, gh and b_hh, applies the gates and writes h' and the saved gates
// (r, z, n, hh_n). gi, gh and h may be column slices of wider tensors (read in
// place through their row stride).
// Backward: one fused pointwise pass gives grad_gi, grad_gh and the direct
// grad_h; grad_context = grad_gi W_ic and grad_W_ic = grad_gi^T context are two
// GEMMs, grad_b_hh = sum_b grad_gh a reduction.
// The gate formulas (gru_gate_forward, gru_gate_backward) are those of the
// recurrences: gates.h.
//
// float64 stays float64; float16/bfloat16 inputs are computed in float32 and
// the results cast back (like the reference).
#include "attention_common.h"
#include "gates.h"
#include "schemas.h"

#include <torch/library.h>

#include <tuple>
#include <type_traits>

namespace fastseq {
namespace cpu_attn {
namespace {

using at::Tensor;
using ::fastseq::cpu::gru_gate_backward;
using ::fastseq::cpu::gru_gate_forward;
using ::fastseq::cpu::GruGateGrads;
using ::fastseq::cpu::GruGates;

constexpr const char* kFwd = "fastseq_cpp::gru_context_cell_forward";
constexpr const char* kBwd = "fastseq_cpp::gru_context_cell_backward";

// ==================================================================== forward

template <typename T>
struct CellFwd {
  const T* gi;    // [B, 3H], row stride s_gi
  const T* cw;    // [B, 3H] context W_ic^T (contiguous)
  const T* gh;    // [B, 3H] W_hh h (no bias), row stride s_gh
  const T* bias;  // [3H] or nullptr
  const T* h;     // [B, H], row stride s_h
  T* out;         // [B, H]
  T* gates;       // [B, 4H] or nullptr
  int64_t s_gi, s_gh, s_h, H;
};

template <typename T, bool BIAS, bool SAVE>
FASTSEQ_INLINE void cell_fwd_row(const T* FASTSEQ_RESTRICT xi, const T* FASTSEQ_RESTRICT cw,
                                      const T* FASTSEQ_RESTRICT hh, const T* FASTSEQ_RESTRICT bb,
                                      const T* FASTSEQ_RESTRICT hp, T* FASTSEQ_RESTRICT ho,
                                      T* FASTSEQ_RESTRICT g, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T x_r = xi[j] + cw[j];
    const T x_z = xi[H + j] + cw[H + j];
    const T x_n = xi[2 * H + j] + cw[2 * H + j];
    const T h_r = BIAS ? hh[j] + bb[j] : hh[j];
    const T h_z = BIAS ? hh[H + j] + bb[H + j] : hh[H + j];
    const T h_n = BIAS ? hh[2 * H + j] + bb[2 * H + j] : hh[2 * H + j];
    const GruGates<T> y = gru_gate_forward(x_r, x_z, x_n, h_r, h_z, h_n, hp[j]);
    ho[j] = y.h;
    if (SAVE) {
      g[j] = y.r;
      g[H + j] = y.z;
      g[2 * H + j] = y.n;
      g[3 * H + j] = h_n;
    }
  }
}

template <typename T, bool BIAS, bool SAVE>
FASTSEQ_INLINE void cell_fwd_rows_t(const CellFwd<T>& p, int64_t b0, int64_t b1) {
  const int64_t H = p.H;
  for (int64_t b = b0; b < b1; ++b) {
    cell_fwd_row<T, BIAS, SAVE>(p.gi + b * p.s_gi, p.cw + b * 3 * H, p.gh + b * p.s_gh, p.bias,
                                p.h + b * p.s_h, p.out + b * H, SAVE ? p.gates + b * 4 * H : nullptr, H);
  }
}

template <typename T>
FASTSEQ_INLINE void cell_fwd_rows_impl(const CellFwd<T>& p, int64_t b0, int64_t b1) {
  if (p.bias != nullptr) {
    if (p.gates != nullptr) {
      cell_fwd_rows_t<T, true, true>(p, b0, b1);
    } else {
      cell_fwd_rows_t<T, true, false>(p, b0, b1);
    }
  } else {
    if (p.gates != nullptr) {
      cell_fwd_rows_t<T, false, true>(p, b0, b1);
    } else {
      cell_fwd_rows_t<T, false, false>(p, b0, b1);
    }
  }
}

// =================================================================== backward

template <typename T>
struct CellBwd {
  const T* dy;     // [B, H] grad of h'
  const T* gates;  // [B, 4H] (r, z, n, hh_n)
  const T* h;      // [B, H]
  T* dgi;          // [B, 3H]
  T* dgh;          // [B, 3H]
  T* dh;           // [B, H] direct part z * dy
  int64_t H;
};

template <typename T>
FASTSEQ_INLINE void cell_bwd_rows_impl(const CellBwd<T>& p, int64_t b0, int64_t b1) {
  const int64_t H = p.H;
  for (int64_t b = b0; b < b1; ++b) {
    const T* FASTSEQ_RESTRICT dy = p.dy + b * H;
    const T* FASTSEQ_RESTRICT g = p.gates + b * 4 * H;
    const T* FASTSEQ_RESTRICT hp = p.h + b * H;
    T* FASTSEQ_RESTRICT dx = p.dgi + b * 3 * H;
    T* FASTSEQ_RESTRICT dhh = p.dgh + b * 3 * H;
    T* FASTSEQ_RESTRICT dh = p.dh + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const GruGateGrads<T> y = gru_gate_backward(dy[j], g[j], g[H + j], g[2 * H + j], g[3 * H + j], hp[j]);
      dx[j] = y.dr;
      dx[H + j] = y.dz;
      dx[2 * H + j] = y.dn;
      dhh[j] = y.dr;
      dhh[H + j] = y.dz;
      dhh[2 * H + j] = y.dhn;
      dh[j] = y.dh;
    }
  }
}

FASTSEQ_ATTN_DISPATCHED(cell_fwd_rows, CellFwd)
FASTSEQ_ATTN_DISPATCHED(cell_bwd_rows, CellBwd)

// ======================================================================== ops

std::tuple<Tensor, Tensor> gru_context_cell_forward(const Tensor& gi, const Tensor& context, const Tensor& w_ic,
                                                    const Tensor& gh, const std::optional<Tensor>& b_hh,
                                                    const Tensor& h, bool save_gates) {
  check_float(gi, kFwd, "gi");
  check_float(context, kFwd, "context");
  check_float(w_ic, kFwd, "w_ic");
  check_float(gh, kFwd, "gh");
  check_float(h, kFwd, "h");
  TORCH_CHECK(h.dim() == 2, kFwd, ": h: expected [B, H], got shape ", h.sizes());
  TORCH_CHECK(context.dim() == 2, kFwd, ": context: expected [B, D], got shape ", context.sizes());
  const int64_t B = h.size(0), H = h.size(1), D = context.size(1);
  check_shape(gi, {B, 3 * H}, kFwd, "gi");
  check_shape(context, {B, D}, kFwd, "context");
  check_shape(w_ic, {3 * H, D}, kFwd, "w_ic");
  check_shape(gh, {B, 3 * H}, kFwd, "gh");
  const bool has_bias = given(b_hh);
  if (has_bias) {
    check_float(*b_hh, kFwd, "b_hh");
    check_shape(*b_hh, {3 * H}, kFwd, "b_hh");
  }
  const auto cd = compute_dtype(gi.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor x = rows_cd(gi, cd), hh = rows_cd(gh, cd), hp = rows_cd(h, cd);
  const Tensor bias = has_bias ? in_cd(*b_hh, cd) : Tensor();
  const Tensor cw = at::mm(in_cd(context, cd), in_cd(w_ic, cd).t()).contiguous();
  Tensor out = at::empty({B, H}, opt);
  Tensor gates = save_gates ? at::empty({B, 4 * H}, opt) : Tensor();

  AT_DISPATCH_FLOATING_TYPES(cd, kFwd, [&] {
    CellFwd<scalar_t> p;
    p.gi = x.data_ptr<scalar_t>();
    p.cw = cw.data_ptr<scalar_t>();
    p.gh = hh.data_ptr<scalar_t>();
    p.bias = has_bias ? bias.data_ptr<scalar_t>() : nullptr;
    p.h = hp.data_ptr<scalar_t>();
    p.out = out.data_ptr<scalar_t>();
    p.gates = save_gates ? gates.data_ptr<scalar_t>() : nullptr;
    p.s_gi = x.stride(0);
    p.s_gh = hh.stride(0);
    p.s_h = hp.stride(0);
    p.H = H;
    parallel_items(B, 48 * H, [&](int64_t b0, int64_t b1) { cell_fwd_rows(p, b0, b1); });
  });
  const auto out_dt = gi.scalar_type();
  return {finish(out, out_dt), save_gates ? finish(gates, out_dt) : at::empty({0}, gi.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_context_cell_backward(
    const Tensor& grad_h, const Tensor& gates, const Tensor& h, const Tensor& context, const Tensor& w_ic,
    bool has_bias) {
  check_float(grad_h, kBwd, "grad_h");
  check_float(gates, kBwd, "gates");
  check_float(h, kBwd, "h");
  check_float(context, kBwd, "context");
  check_float(w_ic, kBwd, "w_ic");
  TORCH_CHECK(h.dim() == 2, kBwd, ": h: expected [B, H], got shape ", h.sizes());
  TORCH_CHECK(context.dim() == 2, kBwd, ": context: expected [B, D], got shape ", context.sizes());
  const int64_t B = h.size(0), H = h.size(1), D = context.size(1);
  check_shape(grad_h, {B, H}, kBwd, "grad_h");
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == B && gates.size(1) == 4 * H, kBwd,
              ": gates: expected shape [", B, ", ", 4 * H,
              "] (saved by gru_context_cell_forward with save_gates=True), got ", gates.sizes());
  check_shape(w_ic, {3 * H, D}, kBwd, "w_ic");
  const auto cd = compute_dtype(h.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor dy = in_cd(grad_h, cd), g = in_cd(gates, cd), hp = in_cd(h, cd);
  Tensor dgi = at::empty({B, 3 * H}, opt);
  Tensor dgh = at::empty({B, 3 * H}, opt);
  Tensor dh = at::empty({B, H}, opt);

  AT_DISPATCH_FLOATING_TYPES(cd, kBwd, [&] {
    CellBwd<scalar_t> p;
    p.dy = dy.data_ptr<scalar_t>();
    p.gates = g.data_ptr<scalar_t>();
    p.h = hp.data_ptr<scalar_t>();
    p.dgi = dgi.data_ptr<scalar_t>();
    p.dgh = dgh.data_ptr<scalar_t>();
    p.dh = dh.data_ptr<scalar_t>();
    p.H = H;
    parallel_items(B, 24 * H, [&](int64_t b0, int64_t b1) { cell_bwd_rows(p, b0, b1); });
  });
  const Tensor w = in_cd(w_ic, cd);
  Tensor dctx = at::mm(dgi, w);
  Tensor dw = at::mm(dgi.t(), in_cd(context, cd));
  const auto wdt = w_ic.scalar_type(), gdt = gates.scalar_type();
  Tensor db = has_bias ? finish(dgh.sum(0), wdt) : at::empty({0}, w_ic.options());
  return {finish(dgi, gdt), finish(dctx, context.scalar_type()), finish(dw, wdt), finish(dgh, gdt), db,
          finish(dh, h.scalar_type())};
}

}  // namespace
}  // namespace cpu_attn
}  // namespace fastseq

TORCH_LIBRARY_FRAGMENT(FASTSEQ_CPP_LIBRARY, m) {
  fastseq::define_cell_ops(m);
}

TORCH_LIBRARY_IMPL(FASTSEQ_CPP_LIBRARY, CPU, m) {
  m.impl("gru_context_cell_forward", &fastseq::cpu_attn::gru_context_cell_forward);
  m.impl("gru_context_cell_backward", &fastseq::cpu_attn::gru_context_cell_backward);
}
