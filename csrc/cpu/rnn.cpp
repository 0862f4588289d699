// GRU and LSTM recurrences on the CPU (ATen), with the exact semantics of
// fastseq/ops/recurrence/naive.py: time-major gi [T, B, G*H] (the input projection,
// computed outside), optional int64/int32 lengths (rows past their length pass
// their state through), saved gates GRU (r, z, n, hn) / LSTM activated
// (i, f, g, o) as [T, B, 4H], half inputs computed in float32.
//
// Per step: the recurrent product h_{t-1} W_hh^T into a preallocated buffer,
// then ONE fused pointwise kernel (gates, state update, lengths mask, saved
// gates; raw pointers, loops the compiler vectorises, no ATen call per
// element). Backward: per step one fused pointwise kernel and the dh carry
// product; dW_hh and db_hh as products over all steps at the end. Nothing is
// allocated per step. The gate formulas are those of gates.h (shared with the
// decoder's GRU cell, cell.cpp); the step loops, forward_steps<> and
// backward_steps<>, are shared by the GRU and the LSTM.
//
// Two ways to run the products:
//  * BLAS path (float/double, when the BLAS that ATen itself uses exports
//    sgemm_/dgemm_, i.e. the MKL x86-64 wheels): the work is split between
//    threads once per call (see split_work): by batch rows (each thread runs
//    every step of its rows, no synchronisation) or, for small batches, by
//    hidden units (each thread multiplies its own rows of W_hh, which stay in
//    its core's cache, and runs the pointwise kernel on its own units; the
//    forward runs all steps in one OpenMP region with a barrier per step,
//    the backward one at::parallel_for per step). Each thread calls the BLAS
//    single-threaded, except the float forward product at up to 32 rows with
//    AVX2+FMA, which runs on our own kernel (gemm.h, sgemm_nt_avx2: no
//    repacking of W_hh per call, unlike MKL's small-batch sgemm).
//  * ATen path (no BLAS symbols, or FASTSEQ_CPP_GEMM=aten): at::mm_out /
//    addmm_ for the whole product (threaded by ATen's BLAS), then the
//    pointwise kernel with at::parallel_for over batch rows.
// Both give the same results up to float rounding (tests cover both).
#include "common.h"
#include "gates.h"
#include "gemm.h"
#include "schemas.h"

#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastseq {
namespace cpu {
namespace {

using at::Tensor;

// ============================================================ pointwise kernels
//
// Every kernel handles batch rows [b0, b1) and hidden units [j0, j1). A row is
// processed in blocks of kBlock units, one simple pass per activation: each
// pass is a short loop with independent iterations that the out-of-order core
// overlaps (one loop computing all the gates of an element is a long
// dependency chain and runs about 2x slower). With SAVE the activations are
// written straight into the saved gates, otherwise into stack buffers.
// Whether a row is still running is decided per row, outside the loops (GCC
// does not vectorise a select on a bool).

constexpr int64_t kBlock = 256;

// out = sigmoid(x + (h + b))
template <typename T>
FASTSEQ_INLINE void sigmoid_pass(const T* FASTSEQ_RESTRICT x, const T* FASTSEQ_RESTRICT h,
                                 const T* FASTSEQ_RESTRICT b, T* FASTSEQ_RESTRICT out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = sigmoid_gate(x[j], h[j] + b[j]);
}

// out = tanh(x + (h + b))
template <typename T>
FASTSEQ_INLINE void tanh_pass(const T* FASTSEQ_RESTRICT x, const T* FASTSEQ_RESTRICT h,
                              const T* FASTSEQ_RESTRICT b, T* FASTSEQ_RESTRICT out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = tanh_gate(x[j], h[j] + b[j]);
}

template <typename T>
FASTSEQ_INLINE void tanh_copy_pass(const T* FASTSEQ_RESTRICT x, T* FASTSEQ_RESTRICT out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = tanh_f(x[j]);
}

template <typename T>
FASTSEQ_INLINE void add_pass(const T* FASTSEQ_RESTRICT a, T* FASTSEQ_RESTRICT acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] + a[j];
}

template <typename T>
FASTSEQ_INLINE void zero_pass(T* FASTSEQ_RESTRICT out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = T(0);
}

// The rows a step runs and where their previous state lies. Dense input: all
// B rows, every previous state at h_prev + b*H. Packed input (a
// PackedSequence's layout, rows sorted by length): the step's `rows` rows at
// row `off` of the packed tensors, and rows b >= n_prev (the reverse
// direction's rows that start at this step) read their previous state from
// h_alt/c_alt + b*H (h0, c0) instead of h_prev/c_prev.
template <typename T>
struct StepRows {
  int64_t rows = 0;           // rows that run at this step
  int64_t off = 0;            // index of the step's first row in [N, ...] tensors (t*B when dense)
  int64_t n_prev = INT64_MAX;  // rows b < n_prev read h_prev/c_prev, the others h_alt/c_alt
  const T* h_alt = nullptr;
  const T* c_alt = nullptr;
};

template <typename T>
FASTSEQ_INLINE const T* prev_row(const T* prev, const T* alt, const StepRows<T>& st, int64_t b, int64_t H) {
  return (b < st.n_prev ? prev : alt) + b * H;
}

// ------------------------------------------------------------- GRU forward

template <typename T>
struct GruFwd {
  const T* gi;             // [B, 3H] (gi[t])
  const T* gh;             // h_{t-1} W_hh^T (no bias): (b, gate k, unit j) at gh[b * gh_ld + k * gh_gs + j]
  const T* bias;           // [3H] (zeros when there is no bias)
  const T* h_prev;         // [B, H]
  const int64_t* lengths;  // [B] or nullptr
  T* h_out;                // [B, H] (hs[t])
  T* gates;                // [B, 4H] (gates[t]) or nullptr
  int64_t t, H, gh_ld, gh_gs;
  StepRows<T> step;        // the rows this step runs, and where their previous state is
};

// hn = h + b; n = tanh(x + r * hn)
template <typename T>
FASTSEQ_INLINE void gru_n_pass(const T* FASTSEQ_RESTRICT x, const T* FASTSEQ_RESTRICT h,
                               const T* FASTSEQ_RESTRICT b, const T* FASTSEQ_RESTRICT r,
                               T* FASTSEQ_RESTRICT hn, T* FASTSEQ_RESTRICT n_out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T v = h[j] + b[j];
    hn[j] = v;
    n_out[j] = gru_candidate(x[j], r[j], v);
  }
}

// h' = (1 - z) * n + z * h
template <typename T>
FASTSEQ_INLINE void gru_h_pass(const T* FASTSEQ_RESTRICT z, const T* FASTSEQ_RESTRICT nn,
                               const T* FASTSEQ_RESTRICT hp, T* FASTSEQ_RESTRICT ho, int64_t n) {
  for (int64_t j = 0; j < n; ++j) ho[j] = gru_state(z[j], nn[j], hp[j]);
}

template <typename T, bool SAVE>
FASTSEQ_INLINE void gru_fwd_rows_impl(const GruFwd<T>& a, int64_t b0, int64_t b1, int64_t j_begin,
                                      int64_t j_end) {
  const int64_t H = a.H, gs = a.gh_gs;
  const T* bb = a.bias;
  T buf[4][kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const bool valid = a.lengths == nullptr || a.lengths[b] > a.t;
    const T* xi = a.gi + b * 3 * H;
    const T* hh = a.gh + b * a.gh_ld;
    const T* hp = prev_row(a.h_prev, a.step.h_alt, a.step, b, H);
    T* ho = a.h_out + b * H;
    T* g = SAVE ? a.gates + b * 4 * H : nullptr;
    if (!valid) {
      std::memcpy(ho + j_begin, hp + j_begin, sizeof(T) * (j_end - j_begin));
      if (!SAVE) continue;  // the reference still saves the (unused) gates of a finished row
    }
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlock) {
      const int64_t n = std::min(kBlock, j_end - j0);
      T* r = SAVE ? g + j0 : buf[0];
      T* z = SAVE ? g + H + j0 : buf[1];
      T* nn = SAVE ? g + 2 * H + j0 : buf[2];
      T* hn = SAVE ? g + 3 * H + j0 : buf[3];
      sigmoid_pass<T>(xi + j0, hh + j0, bb + j0, r, n);
      sigmoid_pass<T>(xi + H + j0, hh + gs + j0, bb + H + j0, z, n);
      gru_n_pass<T>(xi + 2 * H + j0, hh + 2 * gs + j0, bb + 2 * H + j0, r, hn, nn, n);
      if (valid) gru_h_pass<T>(z, nn, hp + j0, ho + j0, n);
    }
  }
}

// ------------------------------------------------------------ GRU backward

template <typename T>
struct GruBwd {
  const T* grad_hs;  // [B, H] (grad_hs[t])
  const T* gates;    // [B, 4H] (gates[t])
  const T* h_prev;   // [B, H]
  const int64_t* lengths;
  T* dh;   // [B, H]: in: gradient into h_t from step t+1; out: the carry part of dh_{t-1}
  T* dgi;  // [B, 3H] (dgi[t])
  T* dgh;  // [B, 3H] (dgh[t])
  int64_t t, H;
  StepRows<T> step;
};

template <typename T>
FASTSEQ_INLINE void gru_bwd_pass(const T* FASTSEQ_RESTRICT gy, const T* FASTSEQ_RESTRICT gr,
                                 const T* FASTSEQ_RESTRICT gz, const T* FASTSEQ_RESTRICT gn,
                                 const T* FASTSEQ_RESTRICT ghn, const T* FASTSEQ_RESTRICT hp,
                                 T* FASTSEQ_RESTRICT dh, T* FASTSEQ_RESTRICT dxr, T* FASTSEQ_RESTRICT dxz,
                                 T* FASTSEQ_RESTRICT dxn, T* FASTSEQ_RESTRICT dhr, T* FASTSEQ_RESTRICT dhz,
                                 T* FASTSEQ_RESTRICT dhn, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const GruGateGrads<T> g = gru_gate_backward(dh[j] + gy[j], gr[j], gz[j], gn[j], ghn[j], hp[j]);
    dxr[j] = g.dr;
    dxz[j] = g.dz;
    dxn[j] = g.dn;
    dhr[j] = g.dr;
    dhz[j] = g.dz;
    dhn[j] = g.dhn;
    dh[j] = g.dh;  // + dgh[t] @ W_hh, added by the product that follows
  }
}

template <typename T>
FASTSEQ_INLINE void gru_bwd_rows_impl(const GruBwd<T>& a, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
  const int64_t H = a.H, n = j1 - j0;
  for (int64_t b = b0; b < b1; ++b) {
    const bool valid = a.lengths == nullptr || a.lengths[b] > a.t;
    const T* gy = a.grad_hs + b * H + j0;
    const T* g = a.gates + b * 4 * H + j0;
    T* dh = a.dh + b * H + j0;
    T* dx = a.dgi + b * 3 * H + j0;
    T* dhh = a.dgh + b * 3 * H + j0;
    if (valid) {
      gru_bwd_pass<T>(gy, g, g + H, g + 2 * H, g + 3 * H, prev_row(a.h_prev, a.step.h_alt, a.step, b, H) + j0,
                      dh, dx, dx + H, dx + 2 * H,
                      dhh, dhh + H, dhh + 2 * H, n);
    } else {  // past its length: no gate gradients, dh passes through (+ grad_hs[t])
      add_pass<T>(gy, dh, n);
      for (int64_t k = 0; k < 3; ++k) {
        zero_pass<T>(dx + k * H, n);
        zero_pass<T>(dhh + k * H, n);
      }
    }
  }
}

// ------------------------------------------------------------ LSTM forward

template <typename T>
struct LstmFwd {
  const T* gi;      // [B, 4H]
  const T* gh;      // h_{t-1} W_hh^T (no bias): (b, gate k, unit j) at gh[b * gh_ld + k * gh_gs + j]
  const T* bias;    // [4H] (zeros when there is no bias)
  const T* h_prev;  // [B, H]
  const T* c_prev;  // [B, H]
  const int64_t* lengths;
  T* h_out;  // [B, H]
  T* c_out;  // [B, H]
  T* gates;  // [B, 4H] or nullptr
  int64_t t, H, gh_ld, gh_gs;
  StepRows<T> step;
};

// c' = f * c + i * g
template <typename T>
FASTSEQ_INLINE void lstm_c_pass(const T* FASTSEQ_RESTRICT i, const T* FASTSEQ_RESTRICT f,
                                const T* FASTSEQ_RESTRICT gg, const T* FASTSEQ_RESTRICT cp,
                                T* FASTSEQ_RESTRICT co, int64_t n) {
  for (int64_t j = 0; j < n; ++j) co[j] = lstm_cell_state(i[j], f[j], gg[j], cp[j]);
}

// h' = o * tanh(c')
template <typename T>
FASTSEQ_INLINE void lstm_h_pass(const T* FASTSEQ_RESTRICT o, const T* FASTSEQ_RESTRICT c,
                                T* FASTSEQ_RESTRICT ho, int64_t n) {
  for (int64_t j = 0; j < n; ++j) ho[j] = lstm_hidden(o[j], c[j]);
}

template <typename T, bool SAVE>
FASTSEQ_INLINE void lstm_fwd_rows_impl(const LstmFwd<T>& a, int64_t b0, int64_t b1, int64_t j_begin,
                                       int64_t j_end) {
  const int64_t H = a.H, gs = a.gh_gs;
  const T* bb = a.bias;
  T buf[4][kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const bool valid = a.lengths == nullptr || a.lengths[b] > a.t;
    const T* xi = a.gi + b * 4 * H;
    const T* hh = a.gh + b * a.gh_ld;
    const T* hp = prev_row(a.h_prev, a.step.h_alt, a.step, b, H);
    const T* cp = prev_row(a.c_prev, a.step.c_alt, a.step, b, H);
    T* ho = a.h_out + b * H;
    T* co = a.c_out + b * H;
    T* g = SAVE ? a.gates + b * 4 * H : nullptr;
    if (!valid) {
      std::memcpy(ho + j_begin, hp + j_begin, sizeof(T) * (j_end - j_begin));
      std::memcpy(co + j_begin, cp + j_begin, sizeof(T) * (j_end - j_begin));
      if (!SAVE) continue;
    }
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlock) {
      const int64_t n = std::min(kBlock, j_end - j0);
      T* i = SAVE ? g + j0 : buf[0];
      T* f = SAVE ? g + H + j0 : buf[1];
      T* gg = SAVE ? g + 2 * H + j0 : buf[2];
      T* o = SAVE ? g + 3 * H + j0 : buf[3];
      sigmoid_pass<T>(xi + j0, hh + j0, bb + j0, i, n);
      sigmoid_pass<T>(xi + H + j0, hh + gs + j0, bb + H + j0, f, n);
      tanh_pass<T>(xi + 2 * H + j0, hh + 2 * gs + j0, bb + 2 * H + j0, gg, n);
      sigmoid_pass<T>(xi + 3 * H + j0, hh + 3 * gs + j0, bb + 3 * H + j0, o, n);
      if (valid) {
        lstm_c_pass<T>(i, f, gg, cp + j0, co + j0, n);
        lstm_h_pass<T>(o, co + j0, ho + j0, n);
      }
    }
  }
}

// ----------------------------------------------------------- LSTM backward

template <typename T>
struct LstmBwd {
  const T* grad_hs;  // [B, H]
  const T* grad_cs;  // [B, H]
  const T* gates;    // [B, 4H]
  const T* c;        // [B, H] (cs[t])
  const T* c_prev;   // [B, H]
  const int64_t* lengths;
  T* dh;  // in: gradient into h_t from step t+1; out: carry part of dh_{t-1}
  T* dc;  // in: gradient into c_t from step t+1; out: dc_{t-1}
  T* dg;  // [B, 4H] (dg[t])
  int64_t t, H;
  StepRows<T> step;
};

template <typename T>
FASTSEQ_INLINE void lstm_bwd_pass(const T* FASTSEQ_RESTRICT gy, const T* FASTSEQ_RESTRICT gc,
                                  const T* FASTSEQ_RESTRICT gi_, const T* FASTSEQ_RESTRICT gf,
                                  const T* FASTSEQ_RESTRICT gg_, const T* FASTSEQ_RESTRICT go,
                                  const T* FASTSEQ_RESTRICT tcs, const T* FASTSEQ_RESTRICT cp,
                                  T* FASTSEQ_RESTRICT dh, T* FASTSEQ_RESTRICT dc, T* FASTSEQ_RESTRICT di,
                                  T* FASTSEQ_RESTRICT df, T* FASTSEQ_RESTRICT dgg, T* FASTSEQ_RESTRICT dout,
                                  int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const LstmGateGrads<T> g =
        lstm_gate_backward(dh[j] + gy[j], dc[j] + gc[j], gi_[j], gf[j], gg_[j], go[j], tcs[j], cp[j]);
    di[j] = g.di;
    df[j] = g.df;
    dgg[j] = g.dg;
    dout[j] = g.d_o;
    dh[j] = T(0);  // dg[t] @ W_hh is added by the product that follows
    dc[j] = g.dc;
  }
}

template <typename T>
FASTSEQ_INLINE void lstm_bwd_rows_impl(const LstmBwd<T>& a, int64_t b0, int64_t b1, int64_t j_begin,
                                       int64_t j_end) {
  const int64_t H = a.H;
  T tc[kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const bool valid = a.lengths == nullptr || a.lengths[b] > a.t;
    const T* gy = a.grad_hs + b * H;
    const T* gc = a.grad_cs + b * H;
    const T* g = a.gates + b * 4 * H;
    const T* cc = a.c + b * H;
    const T* cp = prev_row(a.c_prev, a.step.c_alt, a.step, b, H);
    T* dh = a.dh + b * H;
    T* dc = a.dc + b * H;
    T* dg = a.dg + b * 4 * H;
    if (!valid) {  // past its length: no gate gradients, dh and dc pass through
      const int64_t n = j_end - j_begin;
      add_pass<T>(gy + j_begin, dh + j_begin, n);
      add_pass<T>(gc + j_begin, dc + j_begin, n);
      for (int64_t k = 0; k < 4; ++k) zero_pass<T>(dg + k * H + j_begin, n);
      continue;
    }
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlock) {
      const int64_t n = std::min(kBlock, j_end - j0);
      tanh_copy_pass<T>(cc + j0, tc, n);
      lstm_bwd_pass<T>(gy + j0, gc + j0, g + j0, g + H + j0, g + 2 * H + j0, g + 3 * H + j0, tc, cp + j0,
                       dh + j0, dc + j0, dg + j0, dg + H + j0, dg + 2 * H + j0, dg + 3 * H + j0, n);
    }
  }
}

// ------------------------------------------------- ISA dispatch of the kernels
//
// float: a baseline build and an AVX2+FMA build of each kernel, picked once at
// run time. double: the baseline build (libm activations).

#define FASTSEQ_DEFINE_ROWS(NAME, ARGS, ...)                                                              \
  template <typename T>                                                                                  \
  void NAME##_base(const ARGS<T>& a, int64_t b0, int64_t b1, int64_t j0, int64_t j1, bool save) {        \
    __VA_ARGS__                                                                                          \
  }                                                                                                      \
  FASTSEQ_TARGET_AVX2 void NAME##_avx2(const ARGS<float>& a, int64_t b0, int64_t b1, int64_t j0,         \
                                       int64_t j1, bool save) {                                          \
    using T = float;                                                                                     \
    __VA_ARGS__                                                                                          \
  }                                                                                                      \
  template <typename T>                                                                                  \
  void NAME(const ARGS<T>& a, int64_t b0, int64_t b1, int64_t j0, int64_t j1, bool save) {               \
    if constexpr (std::is_same_v<T, float>) {                                                            \
      if (FASTSEQ_X86_DISPATCH && cpu_has_avx2_fma()) return NAME##_avx2(a, b0, b1, j0, j1, save);       \
    }                                                                                                    \
    NAME##_base<T>(a, b0, b1, j0, j1, save);                                                             \
  }

FASTSEQ_DEFINE_ROWS(gru_fwd_rows, GruFwd,
                    if (save) gru_fwd_rows_impl<T, true>(a, b0, b1, j0, j1);
                    else gru_fwd_rows_impl<T, false>(a, b0, b1, j0, j1);)
FASTSEQ_DEFINE_ROWS(gru_bwd_rows, GruBwd, (void)save; gru_bwd_rows_impl<T>(a, b0, b1, j0, j1);)
FASTSEQ_DEFINE_ROWS(lstm_fwd_rows, LstmFwd,
                    if (save) lstm_fwd_rows_impl<T, true>(a, b0, b1, j0, j1);
                    else lstm_fwd_rows_impl<T, false>(a, b0, b1, j0, j1);)
FASTSEQ_DEFINE_ROWS(lstm_bwd_rows, LstmBwd, (void)save; lstm_bwd_rows_impl<T>(a, b0, b1, j0, j1);)

#undef FASTSEQ_DEFINE_ROWS

// ==================================================================== helpers

struct Dims {
  int64_t T, B, H;
};

using StateArgs = std::initializer_list<std::pair<const Tensor*, const char*>>;

// The states [B, H], W_hh [G*H, H] and b_hh [G*H] of a forward call (dense or packed).
void check_states_and_weights(int64_t G, int64_t B, int64_t H, StateArgs states, const Tensor& w_hh,
                              const std::optional<Tensor>& b_hh) {
  for (const auto& s : states) {
    check_float_cpu(*s.first, s.second);
    check_shape(*s.first, {B, H}, s.second);
  }
  check_float_cpu(w_hh, "w_hh");
  check_shape(w_hh, {G * H, H}, "w_hh");
  if (b_hh.has_value() && b_hh->defined()) {
    check_float_cpu(*b_hh, "b_hh");
    check_shape(*b_hh, {G * H}, "b_hh");
  }
}

Dims check_forward(int64_t G, const Tensor& gi, StateArgs states, const Tensor& w_hh,
                   const std::optional<Tensor>& b_hh) {
  TORCH_CHECK(gi.dim() == 3, "fastseq_cpp: gi: expected a 3-D tensor [T, B, ", G, "*H], got shape ",
              gi.sizes());
  check_float_cpu(gi, "gi");
  const Tensor& h0 = *states.begin()->first;
  TORCH_CHECK(h0.dim() == 2, "fastseq_cpp: h0: expected a 2-D tensor [B, H], got shape ", h0.sizes());
  const int64_t T = gi.size(0), B = gi.size(1), H = h0.size(1);
  TORCH_CHECK(gi.size(2) == G * H, "fastseq_cpp: gi: expected size(2) == ", G, "*H = ", G * H,
              " (H from h0), got shape ", gi.sizes());
  check_states_and_weights(G, B, H, states, w_hh, b_hh);
  return {T, B, H};
}

// The bias in the compute dtype, or zeros when there is none.
Tensor bias_or_zeros(const std::optional<Tensor>& b_hh, int64_t n, at::ScalarType cd) {
  if (b_hh.has_value() && b_hh->defined()) return in_cd(*b_hh, cd);
  return at::zeros({n}, at::TensorOptions().dtype(cd));
}

// ATen path: the pointwise pass over batch rows, in parallel when big enough.
template <typename F>
void for_rows(int64_t B, int64_t cols, const F& f) {
  const int64_t grain = row_grain(cols);
  if (B <= grain) {
    f(0, B);
  } else {
    at::parallel_for(0, B, grain, f);
  }
}

// How the BLAS path shares a call between threads:
//  * kRows: batch rows split into `chunks` slices of `width` rows. A row of
//    h_t depends only on the same row of h_{t-1}, so each thread runs ALL the
//    steps of its rows (its own products and pointwise passes) with no
//    synchronisation at all: one at::parallel_for per call. Used when every
//    thread gets enough rows for an efficient product (and, with one chunk,
//    for single-threaded calls).
//  * kUnits: hidden units split into `chunks` slices of `width` units (a
//    multiple of 8, for vector alignment). One at::parallel_for per step; each
//    thread multiplies its own rows of W_hh (which stay in its core's cache
//    from step to step) and runs the pointwise pass on its units. Used for
//    small batches, where the product is a matrix-vector product bound by
//    reading W_hh.
enum class SplitKind { kRows, kUnits };

struct Split {
  SplitKind kind;
  int64_t chunks, width;
};

Split split_work(int64_t B, int64_t G, int64_t H) {
  // Below this many multiply-adds per step a fork/join costs more than it saves.
  constexpr int64_t kMinParallelMacs = 1 << 15;
  // Measured on 2 cores (bench/cpu_rnn_cpp.py, H 256/512): splitting the units
  // wins up to B = 32 (each thread reads only its half of W_hh); the batch
  // split is as fast from 32 rows per thread on and needs no per-step sync.
  constexpr int64_t kRowsPerThreadBig = 32;
  // With many threads a unit slice gets thin; then split rows from 8 per thread.
  constexpr int64_t kMinUnitsPerThread = 32;
  constexpr int64_t kRowsPerThreadSmall = 8;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  auto rows = [&]() {
    const int64_t width = (B + threads - 1) / threads;
    return Split{SplitKind::kRows, (B + width - 1) / width, width};
  };
  if (threads <= 1 || B * G * H * H < kMinParallelMacs) return {SplitKind::kRows, 1, std::max<int64_t>(B, 1)};
  if (B >= kRowsPerThreadBig * threads) return rows();
  if (H >= kMinUnitsPerThread * threads) {
    int64_t width = (H + threads - 1) / threads;
    width = (width + 7) / 8 * 8;
    return {SplitKind::kUnits, (H + width - 1) / width, width};
  }
  if (B >= kRowsPerThreadSmall * threads) return rows();
  return {SplitKind::kRows, 1, std::max<int64_t>(B, 1)};
}

// f(begin, end) for every slice [c * width, min(n, (c + 1) * width)), in parallel.
template <typename F>
void for_slices(const Split& s, int64_t n, const F& f) {
  if (s.chunks == 1) {
    f(0, n);  // on the calling thread; the BLAS may use its own threads
    return;
  }
  at::parallel_for(0, s.chunks, 1, [&](int64_t c0, int64_t c1) {
    BlasOneThread one_thread;
    for (int64_t c = c0; c < c1; ++c) f(c * s.width, std::min(n, (c + 1) * s.width));
  });
}

// The forward steps of a kUnits split: f(t, j0, j1) for every step t in
// order and every slice [j0, j1) of the hidden units. With OpenMP all the
// steps run in ONE parallel region, a barrier between steps (a fork/join per
// step costs more); the slices are dealt out by the team size OpenMP actually
// gives, so a smaller team (nested region) still covers them all.
template <typename F>
void for_unit_steps(const Split& s, int64_t T, int64_t H, const F& f) {
#ifdef _OPENMP
  if (s.chunks > 1) {
#pragma omp parallel num_threads(static_cast<int>(s.chunks))
    {
      BlasOneThread one_thread;
      const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t c = tid; c < s.chunks; c += nth) f(t, c * s.width, std::min(H, (c + 1) * s.width));
#pragma omp barrier
      }
    }
    return;
  }
#endif
  for (int64_t t = 0; t < T; ++t) for_slices(s, H, [&](int64_t j0, int64_t j1) { f(t, j0, j1); });
}

// The forward product of one thread's slice [j0, j1) of the hidden units in
// the kUnits split: the rows k*H + j0 .. k*H + j1 of W_hh for every gate k.
// From kPackMinRows rows on, W_hh is first copied (once per call, each thread
// its own slice) so that a slice's rows are contiguous: one product per step
// instead of one per gate (about 15% faster at B = 8; for a matrix-vector
// product it makes no difference and the copy would be pure cost). The
// product then lands in gh with the columns of slice [j0, j1) grouped as
// (gate, unit) at offset G*j0, which the forward kernels read through
// (gh_ld, gh_gs).
template <typename T>
struct UnitsProduct {
  int64_t G, B, H;
  const T* w;          // W_hh [G*H, H]
  T* packed = nullptr;  // [G*H, H], slices contiguous, or nullptr
  T* gh;                // [B, G*H]
  bool own = false;     // float, AVX2+FMA: sgemm_nt_avx2 (gemm.h), W_hh as it is, gate by gate

  static constexpr int64_t kPackMinRows = 4;

  void pack_slice(int64_t j0, int64_t j1) {
    const int64_t n = j1 - j0;
    for (int64_t k = 0; k < G; ++k) {
      std::memcpy(packed + (G * j0 + k * n) * H, w + (k * H + j0) * H, sizeof(T) * n * H);
    }
  }

  // gh for slice [j0, j1) of the step's rows (a.step: the rows b < n_prev from
  // h_prev, the others from h_alt), and the args of the pointwise pass reading it.
  template <typename Args>
  Args run(const Args& a, const T* h_prev, int64_t j0, int64_t j1) const {
    Args s = a;
    const int64_t rows = a.step.rows, split = std::min(rows, a.step.n_prev);
    if (split > 0) product(h_prev, 0, split, j0, j1);
    if (rows > split) product(a.step.h_alt, split, rows, j0, j1);
    if (packed != nullptr && !own) {
      s.gh = gh + (G - 1) * j0;  // so that gh[b*ld + k*n + j] is (b, k, j) for j in [j0, j1)
      s.gh_gs = j1 - j0;
    }
    return s;
  }

  // gh rows [b0, b1) for slice [j0, j1): rows b of `src` at src + b*H.
  void product(const T* src, int64_t b0, int64_t b1, int64_t j0, int64_t j1) const {
    const int64_t n = j1 - j0, m = b1 - b0;
    const T* h = src + b0 * H;
    T* out = gh + b0 * G * H;
#if FASTSEQ_X86_DISPATCH
    if constexpr (std::is_same_v<T, float>) {
      if (own) {
        for (int64_t k = 0; k < G; ++k) {
          sgemm_nt_avx2(m, n, H, h, H, w + (k * H + j0) * H, H, out + k * H + j0, G * H);
        }
        return;
      }
    }
#endif
    if (packed != nullptr) {
      gemm_nt<T>(m, G * n, H, h, H, packed + G * j0 * H, H, T(0), out + G * j0, G * H);
    } else if (j0 == 0 && j1 == H) {
      gemm_nt<T>(m, G * H, H, h, H, w, H, T(0), out, G * H);
    } else {
      for (int64_t k = 0; k < G; ++k) {
        gemm_nt<T>(m, n, H, h, H, w + (k * H + j0) * H, H, T(0), out + k * H + j0, G * H);
      }
    }
  }
};

// Whether the kUnits forward product runs on sgemm_nt_avx2 (gemm.h) instead of
// the BLAS: float with AVX2+FMA, up to kOwnMaxRows batch rows (measured on 2
// cores, T = 32, H 256/512: 1.3-1.7x faster than MKL's sgemm/sgemv from B = 1
// to 8, about 1.15x at B = 32). FASTSEQ_CPP_GEMM=blas keeps the BLAS (A/B runs,
// tests of that path).
template <typename T>
bool use_own_gemm(int64_t B) {
  constexpr int64_t kOwnMaxRows = 32;
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    if (!(FASTSEQ_X86_DISPATCH && cpu_has_avx2_fma()) || B > kOwnMaxRows) return false;
    const char* v = std::getenv("FASTSEQ_CPP_GEMM");
    return v == nullptr || std::strcmp(v, "blas") != 0;
  }
}

template <typename T>
bool use_blas(int64_t B, int64_t G, int64_t H) {
  return blas_available<T>() && !gemm_forced_aten() && B > 0 && H > 0 && B * G * H < INT_MAX &&
         G * H <= INT_MAX / 2;
}

Tensor finish(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// dW_hh = sum_t dg[t]^T h_{t-1}: step 0 against h0, the other steps as one product.
Tensor weight_grad(const Tensor& dg, const Tensor& h_init, const Tensor& hs, int64_t GH, int64_t H) {
  const int64_t T = dg.size(0), B = dg.size(1);
  Tensor dw = at::empty({GH, H}, dg.options());
  if (T == 0) return dw.zero_();
  at::mm_out(dw, dg.select(0, 0).t(), h_init);
  if (T > 1) {
    dw.addmm_(dg.narrow(0, 1, T - 1).reshape({(T - 1) * B, GH}).t(),
              hs.narrow(0, 0, T - 1).reshape({(T - 1) * B, H}));
  }
  return dw;
}

// ================================================================ step loops

// Where a row slice of the batch ends for each of `chunks` threads. Dense
// input: equal slices of `width` rows. Packed input (`steps` = each row's
// number of steps, non-increasing): slices of equal work, so the thread with
// the long rows gets fewer of them.
std::vector<int64_t> slice_bounds(int64_t chunks, int64_t width, int64_t B, const int64_t* steps) {
  std::vector<int64_t> bounds(chunks + 1, B);
  bounds[0] = 0;
  if (steps == nullptr || chunks <= 1) {
    for (int64_t c = 1; c < chunks; ++c) bounds[c] = std::min(B, c * width);
    return bounds;
  }
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += steps[b];
  int64_t acc = 0, c = 1;
  for (int64_t b = 0; b < B && c < chunks; ++b) {
    acc += steps[b];
    if (acc * chunks >= total * c) bounds[c++] = b + 1;
  }
  for (; c < chunks; ++c) bounds[c] = B;
  return bounds;
}

// f(b0, b1) for every slice of `bounds`, in parallel (each with a single-threaded BLAS).
template <typename F>
void for_bounds(const std::vector<int64_t>& bounds, const F& f) {
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  if (chunks == 1) {
    f(bounds[0], bounds[1]);  // on the calling thread; the BLAS may use its own threads
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    BlasOneThread one_thread;
    for (int64_t c = c0; c < c1; ++c) {
      if (bounds[c + 1] > bounds[c]) f(bounds[c], bounds[c + 1]);
    }
  });
}

template <typename T_>
Tensor rows_view(const T_* p, int64_t rows, int64_t cols, const at::TensorOptions& opt) {
  return at::from_blob(const_cast<T_*>(p), {rows, cols}, opt);
}

// The forward step loop shared by the GRU and the LSTM (G gates per unit), for
// dense and packed input. For p = 0..T-1: at_step(s, p) points the step
// arguments at the p-th step run (s.h_prev at its previous states, s.step at
// its rows: see StepRows), the recurrent product gh = h_prev W_hh^T (no bias)
// fills the rows of the [B, G*H] scratch that s.gh points to, and
// rows(s, b0, b1, j0, j1) runs the fused pointwise pass on rows [b0, b1) and
// units [j0, j1) (gates, state update, lengths mask, saved gates). `steps`:
// each row's number of steps for packed input (balances the row split), or
// nullptr. Work split: see split_work.
template <typename T_, typename S, typename AtStep, typename Rows>
void forward_steps(S& a, int64_t T, int64_t B, int64_t H, int64_t G, const AtStep& at_step,
                   const Rows& rows, const Tensor& w, const int64_t* steps = nullptr) {
  const int64_t GH = G * H;
  const auto opt = at::TensorOptions().dtype(w.scalar_type());
  Tensor gh = at::empty({B, GH}, opt);
  const T_* w_p = w.data_ptr<T_>();
  T_* gh_p = gh.data_ptr<T_>();
  a.gh = gh_p;
  a.gh_ld = GH;
  a.gh_gs = H;
  if (!use_blas<T_>(B, G, H)) {
    const Tensor wt = w.t();
    for (int64_t p = 0; p < T; ++p) {
      at_step(a, p);
      const int64_t n = a.step.rows, split = std::min(n, a.step.n_prev);
      if (split > 0) {
        Tensor out = gh.narrow(0, 0, split);
        at::mm_out(out, rows_view(a.h_prev, split, H, opt), wt);
      }
      if (n > split) {
        Tensor out = gh.narrow(0, split, n - split);
        at::mm_out(out, rows_view(a.step.h_alt + split * H, n - split, H, opt), wt);
      }
      for_rows(n, GH, [&](int64_t b0, int64_t b1) { rows(a, b0, b1, 0, H); });
    }
    return;
  }
  const Split split = split_work(B, G, H);
  if (split.kind == SplitKind::kRows) {
    // Each thread, its rows, all steps.
    for_bounds(slice_bounds(split.chunks, split.width, B, steps), [&](int64_t b0, int64_t b1) {
      S s = a;
      // Few rows: our own product (gemm.h: W_hh read as it is, no repacking per call).
      const bool own = use_own_gemm<T_>(b1 - b0);
      auto product = [&](int64_t m, const T_* h, T_* out) {
#if FASTSEQ_X86_DISPATCH
        if constexpr (std::is_same_v<T_, float>) {
          if (own) return sgemm_nt_avx2(m, GH, H, h, H, w_p, H, out, GH);
        }
#endif
        gemm_nt<T_>(m, GH, H, h, H, w_p, H, T_(0), out, GH);
      };
      for (int64_t p = 0; p < T; ++p) {
        at_step(s, p);
        const int64_t e = std::min(b1, s.step.rows);
        if (e <= b0) continue;
        const int64_t m = std::max(b0, std::min(e, s.step.n_prev));  // [b0, m) from h_prev, [m, e) from h_alt
        if (m > b0) product(m - b0, s.h_prev + b0 * H, gh_p + b0 * GH);
        if (e > m) product(e - m, s.step.h_alt + m * H, gh_p + m * GH);
        rows(s, b0, e, 0, H);
      }
    });
    return;
  }
  // Each thread, every step: its rows of W_hh times h_prev, then the step on its units.
  UnitsProduct<T_> prod{G, B, H, w_p, nullptr, gh_p};
  prod.own = use_own_gemm<T_>(B);
  Tensor packed;
  if (!prod.own && B >= prod.kPackMinRows) {
    packed = at::empty({GH, H}, opt);
    prod.packed = packed.data_ptr<T_>();
    for_slices(split, H, [&](int64_t j0, int64_t j1) { prod.pack_slice(j0, j1); });
  }
  for_unit_steps(split, T, H, [&](int64_t p, int64_t j0, int64_t j1) {
    S s = a;
    at_step(s, p);
    rows(prod.run(s, s.h_prev, j0, j1), 0, s.step.rows, j0, j1);
  });
}

// The backward step loop shared by the GRU and the LSTM (G gates per unit), for
// dense and packed input. For p = T-1..0 (the steps in the reverse of the
// order they ran): at_step(s, p) points the step arguments at that step,
// rows(s, b0, b1, j0, j1) runs the fused pointwise pass on rows [b0, b1) and
// units [j0, j1) (writing the step's rows of dgate, at row s.step.off, and
// leaving the carry in dh), and dh[rows] += dgate[step rows] @ W_hh completes
// the gradient into the previous states. Work split as in the forward.
//
// last_product = false skips the product of the last step handled (p = 0),
// which only feeds the gradient of h0 (when nobody needs it: grad_h0=False).
template <typename T_, typename S, typename AtStep, typename Rows>
void backward_steps(S& a, int64_t T, int64_t B, int64_t H, int64_t G, const AtStep& at_step,
                    const Rows& rows, const Tensor& dgate, const Tensor& w, Tensor& dh,
                    const int64_t* steps = nullptr, bool last_product = true) {
  T_* dgate_p = dgate.data_ptr<T_>();
  const T_* w_p = w.data_ptr<T_>();
  T_* dh_p = dh.data_ptr<T_>();
  const int64_t GH = G * H;
  if (!use_blas<T_>(B, G, H)) {
    const Tensor dgate2 = dgate.view({-1, GH});
    for (int64_t p = T - 1; p >= 0; --p) {
      at_step(a, p);
      const int64_t n = a.step.rows;
      for_rows(n, GH, [&](int64_t b0, int64_t b1) { rows(a, b0, b1, 0, H); });
      if (p > 0 || last_product) dh.narrow(0, 0, n).addmm_(dgate2.narrow(0, a.step.off, n), w);
    }
    return;
  }
  const Split split = split_work(B, G, H);
  if (split.kind == SplitKind::kRows) {
    // Each thread, its rows, all steps.
    for_bounds(slice_bounds(split.chunks, split.width, B, steps), [&](int64_t b0, int64_t b1) {
      S s = a;
      for (int64_t p = T - 1; p >= 0; --p) {
        at_step(s, p);
        const int64_t e = std::min(b1, s.step.rows);
        if (e <= b0) continue;
        rows(s, b0, e, 0, H);
        if (p == 0 && !last_product) continue;
        gemm_nn<T_>(e - b0, H, GH, dgate_p + (s.step.off + b0) * GH, GH, w_p, H, T_(1), dh_p + b0 * H, H);
      }
    });
    return;
  }
  StepRows<T_> done;  // the step handled last (its product into dh still to add)
  for (int64_t p = T - 1; p >= 0; --p) {
    at_step(a, p);
    // Each thread: its columns of dh += dgate[previous step] @ W_hh, then this step on its units.
    for_slices(split, H, [&](int64_t j0, int64_t j1) {
      if (done.rows > 0) {
        gemm_nn<T_>(done.rows, j1 - j0, GH, dgate_p + done.off * GH, GH, w_p + j0, H, T_(1), dh_p + j0, H);
      }
      rows(a, 0, a.step.rows, j0, j1);
    });
    done = a.step;
  }
  if (done.rows > 0 && last_product) {
    dh.narrow(0, 0, done.rows).addmm_(dgate.view({-1, GH}).narrow(0, done.off, done.rows), w);
  }
}

// ======================================================================= GRU

std::tuple<Tensor, Tensor> gru_recurrence_forward(const Tensor& gi, const Tensor& h0, const Tensor& w_hh,
                                                  const std::optional<Tensor>& b_hh,
                                                  const std::optional<Tensor>& lengths, bool save_gates) {
  const Dims d = check_forward(3, gi, {{&h0, "h0"}}, w_hh, b_hh);
  const int64_t T = d.T, B = d.B, H = d.H;
  const auto cd = compute_dtype(gi.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor x = in_cd(gi, cd), h_init = in_cd(h0, cd), w = in_cd(w_hh, cd);
  const Tensor bias = bias_or_zeros(b_hh, 3 * H, cd);
  const Tensor lens = lengths_i64(lengths, B);
  Tensor hs = at::empty({T, B, H}, opt);
  Tensor gates = save_gates ? at::empty({T, B, 4 * H}, opt) : Tensor();

  AT_DISPATCH_FLOATING_TYPES(cd, "fastseq_cpp::gru_recurrence_forward", [&] {
    using T_ = scalar_t;
    GruFwd<T_> a;
    a.bias = bias.data_ptr<T_>();
    a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
    a.H = H;
    const T_* x_p = x.data_ptr<T_>();
    T_* hs_p = hs.data_ptr<T_>();
    T_* g_p = save_gates ? gates.data_ptr<T_>() : nullptr;
    a.step.rows = B;
    auto at_step = [&](GruFwd<T_>& s, int64_t t) {
      s.t = t;
      s.step.off = t * B;
      s.gi = x_p + t * B * 3 * H;
      s.h_prev = t == 0 ? h_init.data_ptr<T_>() : hs_p + (t - 1) * B * H;
      s.h_out = hs_p + t * B * H;
      s.gates = save_gates ? g_p + t * B * 4 * H : nullptr;
    };
    forward_steps<T_>(a, T, B, H, 3, at_step,
                      [save_gates](const GruFwd<T_>& s, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
                        gru_fwd_rows(s, b0, b1, j0, j1, save_gates);
                      },
                      w);
  });
  const auto out_dt = gi.scalar_type();
  return {finish(hs, out_dt), save_gates ? finish(gates, out_dt) : at::empty({0}, gi.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_recurrence_backward(
    const Tensor& grad_hs, const Tensor& h0, const Tensor& w_hh, const Tensor& hs, const Tensor& gates,
    const std::optional<Tensor>& lengths, bool has_bias, bool grad_h0) {
  TORCH_CHECK(hs.dim() == 3, "fastseq_cpp: hs: expected a 3-D tensor [T, B, H], got shape ", hs.sizes());
  const int64_t T = hs.size(0), B = hs.size(1), H = hs.size(2);
  check_float_cpu(hs, "hs");
  check_float_cpu(grad_hs, "grad_hs");
  check_shape(grad_hs, {T, B, H}, "grad_hs");
  check_float_cpu(h0, "h0");
  check_shape(h0, {B, H}, "h0");
  check_float_cpu(w_hh, "w_hh");
  check_shape(w_hh, {3 * H, H}, "w_hh");
  check_float_cpu(gates, "gates");
  check_shape(gates, {T, B, 4 * H}, "gates");
  const auto cd = compute_dtype(hs.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor gy = in_cd(grad_hs, cd), h_init = in_cd(h0, cd), w = in_cd(w_hh, cd);
  const Tensor hs_c = in_cd(hs, cd), g_c = in_cd(gates, cd);
  const Tensor lens = lengths_i64(lengths, B);
  Tensor dgi = at::empty({T, B, 3 * H}, opt);
  Tensor dgh = at::empty({T, B, 3 * H}, opt);
  Tensor dh = at::zeros({B, H}, opt);

  AT_DISPATCH_FLOATING_TYPES(cd, "fastseq_cpp::gru_recurrence_backward", [&] {
    using T_ = scalar_t;
    GruBwd<T_> a;
    a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
    a.dh = dh.data_ptr<T_>();
    a.H = H;
    const T_* gy_p = gy.data_ptr<T_>();
    const T_* g_p = g_c.data_ptr<T_>();
    const T_* hs_p = hs_c.data_ptr<T_>();
    const T_* h0_p = h_init.data_ptr<T_>();
    T_* dgi_p = dgi.data_ptr<T_>();
    T_* dgh_p = dgh.data_ptr<T_>();
    a.step.rows = B;
    auto at_step = [&](GruBwd<T_>& s, int64_t t) {
      s.t = t;
      s.step.off = t * B;
      s.grad_hs = gy_p + t * B * H;
      s.gates = g_p + t * B * 4 * H;
      s.h_prev = t == 0 ? h0_p : hs_p + (t - 1) * B * H;
      s.dgi = dgi_p + t * B * 3 * H;
      s.dgh = dgh_p + t * B * 3 * H;
    };
    backward_steps<T_>(a, T, B, H, 3, at_step,
                       [](const GruBwd<T_>& s, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
                         gru_bwd_rows(s, b0, b1, j0, j1, false);
                       },
                       dgh, w, dh, nullptr, grad_h0);
  });

  const Tensor dw = weight_grad(dgh, h_init, hs_c, 3 * H, H);
  const auto wdt = w_hh.scalar_type();
  Tensor db = has_bias ? finish(dgh.sum(at::IntArrayRef{0, 1}), wdt) : at::empty({0}, w_hh.options());
  return {finish(dgi, hs.scalar_type()), grad_h0 ? finish(dh, h0.scalar_type()) : at::empty({0}, h0.options()),
          finish(dw, wdt), db};
}

// ====================================================================== LSTM

std::tuple<Tensor, Tensor, Tensor> lstm_recurrence_forward(const Tensor& gi, const Tensor& h0, const Tensor& c0,
                                                           const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                                                           const std::optional<Tensor>& lengths,
                                                           bool save_gates) {
  const Dims d = check_forward(4, gi, {{&h0, "h0"}, {&c0, "c0"}}, w_hh, b_hh);
  const int64_t T = d.T, B = d.B, H = d.H;
  const auto cd = compute_dtype(gi.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor x = in_cd(gi, cd), h_init = in_cd(h0, cd), c_init = in_cd(c0, cd), w = in_cd(w_hh, cd);
  const Tensor bias = bias_or_zeros(b_hh, 4 * H, cd);
  const Tensor lens = lengths_i64(lengths, B);
  Tensor hs = at::empty({T, B, H}, opt);
  Tensor cs = at::empty({T, B, H}, opt);
  Tensor gates = save_gates ? at::empty({T, B, 4 * H}, opt) : Tensor();

  AT_DISPATCH_FLOATING_TYPES(cd, "fastseq_cpp::lstm_recurrence_forward", [&] {
    using T_ = scalar_t;
    LstmFwd<T_> a;
    a.bias = bias.data_ptr<T_>();
    a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
    a.H = H;
    const T_* x_p = x.data_ptr<T_>();
    T_* hs_p = hs.data_ptr<T_>();
    T_* cs_p = cs.data_ptr<T_>();
    const T_* c0_p = c_init.data_ptr<T_>();
    T_* g_p = save_gates ? gates.data_ptr<T_>() : nullptr;
    a.step.rows = B;
    auto at_step = [&](LstmFwd<T_>& s, int64_t t) {
      s.t = t;
      s.step.off = t * B;
      s.gi = x_p + t * B * 4 * H;
      s.h_prev = t == 0 ? h_init.data_ptr<T_>() : hs_p + (t - 1) * B * H;
      s.c_prev = t == 0 ? c0_p : cs_p + (t - 1) * B * H;
      s.h_out = hs_p + t * B * H;
      s.c_out = cs_p + t * B * H;
      s.gates = save_gates ? g_p + t * B * 4 * H : nullptr;
    };
    forward_steps<T_>(a, T, B, H, 4, at_step,
                      [save_gates](const LstmFwd<T_>& s, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
                        lstm_fwd_rows(s, b0, b1, j0, j1, save_gates);
                      },
                      w);
  });
  const auto out_dt = gi.scalar_type();
  return {finish(hs, out_dt), finish(cs, out_dt),
          save_gates ? finish(gates, out_dt) : at::empty({0}, gi.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_recurrence_backward(
    const Tensor& grad_hs, const Tensor& grad_cs, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const Tensor& hs, const Tensor& cs, const Tensor& gates, const std::optional<Tensor>& lengths,
    bool has_bias, bool grad_h0) {
  TORCH_CHECK(hs.dim() == 3, "fastseq_cpp: hs: expected a 3-D tensor [T, B, H], got shape ", hs.sizes());
  const int64_t T = hs.size(0), B = hs.size(1), H = hs.size(2);
  check_float_cpu(hs, "hs");
  for (const auto& p : {std::make_pair(&grad_hs, "grad_hs"), std::make_pair(&grad_cs, "grad_cs"),
                        std::make_pair(&cs, "cs")}) {
    check_float_cpu(*p.first, p.second);
    check_shape(*p.first, {T, B, H}, p.second);
  }
  check_float_cpu(h0, "h0");
  check_shape(h0, {B, H}, "h0");
  check_float_cpu(c0, "c0");
  check_shape(c0, {B, H}, "c0");
  check_float_cpu(w_hh, "w_hh");
  check_shape(w_hh, {4 * H, H}, "w_hh");
  check_float_cpu(gates, "gates");
  check_shape(gates, {T, B, 4 * H}, "gates");
  const auto cd = compute_dtype(hs.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor gy = in_cd(grad_hs, cd), gcy = in_cd(grad_cs, cd);
  const Tensor h_init = in_cd(h0, cd), c_init = in_cd(c0, cd), w = in_cd(w_hh, cd);
  const Tensor hs_c = in_cd(hs, cd), cs_c = in_cd(cs, cd), g_c = in_cd(gates, cd);
  const Tensor lens = lengths_i64(lengths, B);
  Tensor dg = at::empty({T, B, 4 * H}, opt);
  Tensor dh = at::zeros({B, H}, opt);
  Tensor dc = at::zeros({B, H}, opt);

  AT_DISPATCH_FLOATING_TYPES(cd, "fastseq_cpp::lstm_recurrence_backward", [&] {
    using T_ = scalar_t;
    LstmBwd<T_> a;
    a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
    a.dh = dh.data_ptr<T_>();
    a.dc = dc.data_ptr<T_>();
    a.H = H;
    const T_* gy_p = gy.data_ptr<T_>();
    const T_* gc_p = gcy.data_ptr<T_>();
    const T_* g_p = g_c.data_ptr<T_>();
    const T_* cs_p = cs_c.data_ptr<T_>();
    const T_* c0_p = c_init.data_ptr<T_>();
    T_* dg_p = dg.data_ptr<T_>();
    a.step.rows = B;
    auto at_step = [&](LstmBwd<T_>& s, int64_t t) {
      s.t = t;
      s.step.off = t * B;
      s.grad_hs = gy_p + t * B * H;
      s.grad_cs = gc_p + t * B * H;
      s.gates = g_p + t * B * 4 * H;
      s.c = cs_p + t * B * H;
      s.c_prev = t == 0 ? c0_p : cs_p + (t - 1) * B * H;
      s.dg = dg_p + t * B * 4 * H;
    };
    backward_steps<T_>(a, T, B, H, 4, at_step,
                       [](const LstmBwd<T_>& s, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
                         lstm_bwd_rows(s, b0, b1, j0, j1, false);
                       },
                       dg, w, dh, nullptr, grad_h0);
  });

  const Tensor dw = weight_grad(dg, h_init, hs_c, 4 * H, H);
  const auto wdt = w_hh.scalar_type();
  Tensor db = has_bias ? finish(dg.sum(at::IntArrayRef{0, 1}), wdt) : at::empty({0}, w_hh.options());
  if (!grad_h0) {
    return {finish(dg, hs.scalar_type()), at::empty({0}, h0.options()), at::empty({0}, c0.options()),
            finish(dw, wdt), db};
  }
  return {finish(dg, hs.scalar_type()), finish(dh, h0.scalar_type()), finish(dc, c0.scalar_type()),
          finish(dw, wdt), db};
}

// ============================================================ packed layout
//
// The recurrences on a PackedSequence's layout (fastseq/ops/recurrence/naive.py,
// "packed layout"): gi [N, G*H] with step t's batch_sizes[t] rows at row
// offsets[t], rows sorted by length. Each step runs only its rows (the
// products too); the reverse direction runs t = T-1..0 and its rows that
// start at step t read h0/c0 (StepRows::n_prev). Same step loops and
// pointwise kernels as the dense ops.

struct PackedLayout {
  std::vector<int64_t> bs, off, steps;  // batch_sizes, offsets, steps[b] = row b's number of steps
  int64_t T = 0;
  bool reverse = false;
  int64_t step(int64_t p) const { return reverse ? T - 1 - p : p; }  // the p-th step run
  int64_t prev(int64_t t) const {  // the step run before t, or -1
    const int64_t q = reverse ? t + 1 : t - 1;
    return (q < 0 || q >= T) ? -1 : q;
  }
  // Point `st` at step t's rows; returns the step whose states they read (-1: h0).
  template <typename T_>
  int64_t set(StepRows<T_>& st, int64_t t, const T_* h0, const T_* c0) const {
    const int64_t q = prev(t);
    st.rows = bs[t];
    st.off = off[t];
    st.n_prev = q < 0 ? 0 : std::min(bs[q], bs[t]);
    st.h_alt = h0;
    st.c_alt = c0;
    return q;
  }
};

PackedLayout packed_layout(const Tensor& batch_sizes, int64_t N, int64_t B, bool reverse) {
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong && batch_sizes.is_cpu(),
              "fastseq_cpp: batch_sizes: expected a 1-D int64 CPU tensor, got ", batch_sizes.dim(), "-D ",
              batch_sizes.scalar_type(), " on ", batch_sizes.device());
  const Tensor bs_c = batch_sizes.contiguous();
  const int64_t* v = bs_c.data_ptr<int64_t>();
  PackedLayout pk;
  pk.T = bs_c.size(0);
  pk.reverse = reverse;
  TORCH_CHECK(pk.T >= 1, "fastseq_cpp: batch_sizes: expected at least one step");
  pk.bs.assign(v, v + pk.T);
  pk.off.resize(pk.T);
  int64_t total = 0;
  for (int64_t t = 0; t < pk.T; ++t) {
    TORCH_CHECK(v[t] >= 1 && (t == 0 || v[t] <= v[t - 1]),
                "fastseq_cpp: batch_sizes: expected non-increasing values >= 1, got ", batch_sizes);
    pk.off[t] = total;
    total += v[t];
  }
  TORCH_CHECK(v[0] == B, "fastseq_cpp: batch_sizes: expected batch_sizes[0] == B = ", B, ", got ", v[0]);
  TORCH_CHECK(total == N, "fastseq_cpp: batch_sizes: expected a sum of N = ", N, ", got ", total);
  pk.steps.assign(B, 0);
  for (int64_t t = 0; t < pk.T; ++t) {
    for (int64_t b = 0; b < v[t]; ++b) ++pk.steps[b];
  }
  return pk;
}

Dims check_packed(int64_t G, const Tensor& gi, StateArgs states, const Tensor& w_hh,
                  const std::optional<Tensor>& b_hh) {
  TORCH_CHECK(gi.dim() == 2, "fastseq_cpp: gi: expected a 2-D tensor [N, ", G, "*H] (packed), got shape ",
              gi.sizes());
  check_float_cpu(gi, "gi");
  const Tensor& h0 = *states.begin()->first;
  TORCH_CHECK(h0.dim() == 2, "fastseq_cpp: h0: expected a 2-D tensor [B, H], got shape ", h0.sizes());
  const int64_t N = gi.size(0), B = h0.size(0), H = h0.size(1);
  TORCH_CHECK(gi.size(1) == G * H, "fastseq_cpp: gi: expected size(1) == ", G, "*H = ", G * H,
              " (H from h0), got shape ", gi.sizes());
  check_states_and_weights(G, B, H, states, w_hh, b_hh);
  return {N, B, H};  // (T holds N here)
}

// [N, H]: each (step, row)'s previous state, for dW_hh = dG^T h_prev.
template <typename T_>
Tensor packed_prev_states(const PackedLayout& pk, const Tensor& states, const Tensor& init) {
  const int64_t N = states.size(0), H = states.size(1);
  Tensor out = at::empty({N, H}, states.options());
  const T_* s = states.data_ptr<T_>();
  const T_* h0 = init.data_ptr<T_>();
  T_* o = out.data_ptr<T_>();
  for (int64_t t = 0; t < pk.T; ++t) {
    const int64_t q = pk.prev(t), n = pk.bs[t];
    const int64_t m = q < 0 ? 0 : std::min(pk.bs[q], n);
    if (m > 0) std::memcpy(o + pk.off[t] * H, s + pk.off[q] * H, sizeof(T_) * m * H);
    if (n > m) std::memcpy(o + (pk.off[t] + m) * H, h0 + m * H, sizeof(T_) * (n - m) * H);
  }
  return out;
}

std::tuple<Tensor, Tensor> gru_packed_recurrence_forward(const Tensor& gi, const Tensor& h0, const Tensor& w_hh,
                                                         const std::optional<Tensor>& b_hh,
                                                         const Tensor& batch_sizes, bool reverse,
                                                         bool save_gates) {
  const Dims d = check_packed(3, gi, {{&h0, "h0"}}, w_hh, b_hh);
  const int64_t N = d.T, B = d.B, H = d.H;
  const PackedLayout pk = packed_layout(batch_sizes, N, B, reverse);
  const auto cd = compute_dtype(gi.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor x = in_cd(gi, cd), h_init = in_cd(h0, cd), w = in_cd(w_hh, cd);
  const Tensor bias = bias_or_zeros(b_hh, 3 * H, cd);
  Tensor hs = at::empty({N, H}, opt);
  Tensor gates = save_gates ? at::empty({N, 4 * H}, opt) : Tensor();

  AT_DISPATCH_FLOATING_TYPES(cd, "fastseq_cpp::gru_packed_recurrence_forward", [&] {
    using T_ = scalar_t;
    GruFwd<T_> a;
    a.bias = bias.data_ptr<T_>();
    a.lengths = nullptr;
    a.H = H;
    const T_* x_p = x.data_ptr<T_>();
    const T_* h0_p = h_init.data_ptr<T_>();
    T_* hs_p = hs.data_ptr<T_>();
    T_* g_p = save_gates ? gates.data_ptr<T_>() : nullptr;
    auto at_step = [&](GruFwd<T_>& s, int64_t p) {
      const int64_t t = pk.step(p), q = pk.set(s.step, t, h0_p, static_cast<const T_*>(nullptr));
      const int64_t o = pk.off[t];
      s.t = t;
      s.gi = x_p + o * 3 * H;
      s.h_prev = q < 0 ? h0_p : hs_p + pk.off[q] * H;
      s.h_out = hs_p + o * H;
      s.gates = save_gates ? g_p + o * 4 * H : nullptr;
    };
    forward_steps<T_>(a, pk.T, B, H, 3, at_step,
                      [save_gates](const GruFwd<T_>& s, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
                        gru_fwd_rows(s, b0, b1, j0, j1, save_gates);
                      },
                      w, pk.steps.data());
  });
  const auto out_dt = gi.scalar_type();
  return {finish(hs, out_dt), save_gates ? finish(gates, out_dt) : at::empty({0}, gi.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_packed_recurrence_backward(
    const Tensor& grad_hs, const Tensor& h0, const Tensor& w_hh, const Tensor& hs, const Tensor& gates,
    const Tensor& batch_sizes, bool reverse, bool has_bias, bool grad_h0) {
  TORCH_CHECK(hs.dim() == 2, "fastseq_cpp: hs: expected a 2-D tensor [N, H], got shape ", hs.sizes());
  const int64_t N = hs.size(0), H = hs.size(1);
  check_float_cpu(hs, "hs");
  check_float_cpu(grad_hs, "grad_hs");
  check_shape(grad_hs, {N, H}, "grad_hs");
  check_float_cpu(h0, "h0");
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == H, "fastseq_cpp: h0: expected shape [B, ", H, "], got ", h0.sizes());
  const int64_t B = h0.size(0);
  check_float_cpu(w_hh, "w_hh");
  check_shape(w_hh, {3 * H, H}, "w_hh");
  check_float_cpu(gates, "gates");
  check_shape(gates, {N, 4 * H}, "gates");
  const PackedLayout pk = packed_layout(batch_sizes, N, B, reverse);
  const auto cd = compute_dtype(hs.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor gy = in_cd(grad_hs, cd), h_init = in_cd(h0, cd), w = in_cd(w_hh, cd);
  const Tensor hs_c = in_cd(hs, cd), g_c = in_cd(gates, cd);
  Tensor dgi = at::empty({N, 3 * H}, opt);
  Tensor dgh = at::empty({N, 3 * H}, opt);
  Tensor dh = at::zeros({B, H}, opt);
  Tensor h_prev_all;

  AT_DISPATCH_FLOATING_TYPES(cd, "fastseq_cpp::gru_packed_recurrence_backward", [&] {
    using T_ = scalar_t;
    GruBwd<T_> a;
    a.lengths = nullptr;
    a.dh = dh.data_ptr<T_>();
    a.H = H;
    const T_* gy_p = gy.data_ptr<T_>();
    const T_* g_p = g_c.data_ptr<T_>();
    const T_* hs_p = hs_c.data_ptr<T_>();
    const T_* h0_p = h_init.data_ptr<T_>();
    T_* dgi_p = dgi.data_ptr<T_>();
    T_* dgh_p = dgh.data_ptr<T_>();
    auto at_step = [&](GruBwd<T_>& s, int64_t p) {
      const int64_t t = pk.step(p), q = pk.set(s.step, t, h0_p, static_cast<const T_*>(nullptr));
      const int64_t o = pk.off[t];
      s.t = t;
      s.grad_hs = gy_p + o * H;
      s.gates = g_p + o * 4 * H;
      s.h_prev = q < 0 ? h0_p : hs_p + pk.off[q] * H;
      s.dgi = dgi_p + o * 3 * H;
      s.dgh = dgh_p + o * 3 * H;
    };
    backward_steps<T_>(a, pk.T, B, H, 3, at_step,
                       [](const GruBwd<T_>& s, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
                         gru_bwd_rows(s, b0, b1, j0, j1, false);
                       },
                       dgh, w, dh, pk.steps.data(), grad_h0);
    h_prev_all = packed_prev_states<T_>(pk, hs_c, h_init);
  });

  const Tensor dw = at::mm(dgh.t(), h_prev_all);
  const auto wdt = w_hh.scalar_type();
  Tensor db = has_bias ? finish(dgh.sum(0), wdt) : at::empty({0}, w_hh.options());
  return {finish(dgi, hs.scalar_type()), grad_h0 ? finish(dh, h0.scalar_type()) : at::empty({0}, h0.options()),
          finish(dw, wdt), db};
}

std::tuple<Tensor, Tensor, Tensor> lstm_packed_recurrence_forward(
    const Tensor& gi, const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
    const Tensor& batch_sizes, bool reverse, bool save_gates) {
  const Dims d = check_packed(4, gi, {{&h0, "h0"}, {&c0, "c0"}}, w_hh, b_hh);
  const int64_t N = d.T, B = d.B, H = d.H;
  const PackedLayout pk = packed_layout(batch_sizes, N, B, reverse);
  const auto cd = compute_dtype(gi.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor x = in_cd(gi, cd), h_init = in_cd(h0, cd), c_init = in_cd(c0, cd), w = in_cd(w_hh, cd);
  const Tensor bias = bias_or_zeros(b_hh, 4 * H, cd);
  Tensor hs = at::empty({N, H}, opt);
  Tensor cs = at::empty({N, H}, opt);
  Tensor gates = save_gates ? at::empty({N, 4 * H}, opt) : Tensor();

  AT_DISPATCH_FLOATING_TYPES(cd, "fastseq_cpp::lstm_packed_recurrence_forward", [&] {
    using T_ = scalar_t;
    LstmFwd<T_> a;
    a.bias = bias.data_ptr<T_>();
    a.lengths = nullptr;
    a.H = H;
    const T_* x_p = x.data_ptr<T_>();
    const T_* h0_p = h_init.data_ptr<T_>();
    const T_* c0_p = c_init.data_ptr<T_>();
    T_* hs_p = hs.data_ptr<T_>();
    T_* cs_p = cs.data_ptr<T_>();
    T_* g_p = save_gates ? gates.data_ptr<T_>() : nullptr;
    auto at_step = [&](LstmFwd<T_>& s, int64_t p) {
      const int64_t t = pk.step(p), q = pk.set(s.step, t, h0_p, c0_p);
      const int64_t o = pk.off[t];
      s.t = t;
      s.gi = x_p + o * 4 * H;
      s.h_prev = q < 0 ? h0_p : hs_p + pk.off[q] * H;
      s.c_prev = q < 0 ? c0_p : cs_p + pk.off[q] * H;
      s.h_out = hs_p + o * H;
      s.c_out = cs_p + o * H;
      s.gates = save_gates ? g_p + o * 4 * H : nullptr;
    };
    forward_steps<T_>(a, pk.T, B, H, 4, at_step,
                      [save_gates](const LstmFwd<T_>& s, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
                        lstm_fwd_rows(s, b0, b1, j0, j1, save_gates);
                      },
                      w, pk.steps.data());
  });
  const auto out_dt = gi.scalar_type();
  return {finish(hs, out_dt), finish(cs, out_dt),
          save_gates ? finish(gates, out_dt) : at::empty({0}, gi.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_packed_recurrence_backward(
    const Tensor& grad_hs, const Tensor& grad_cs, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const Tensor& hs, const Tensor& cs, const Tensor& gates, const Tensor& batch_sizes, bool reverse,
    bool has_bias, bool grad_h0) {
  TORCH_CHECK(hs.dim() == 2, "fastseq_cpp: hs: expected a 2-D tensor [N, H], got shape ", hs.sizes());
  const int64_t N = hs.size(0), H = hs.size(1);
  check_float_cpu(hs, "hs");
  for (const auto& p : {std::make_pair(&grad_hs, "grad_hs"), std::make_pair(&grad_cs, "grad_cs"),
                        std::make_pair(&cs, "cs")}) {
    check_float_cpu(*p.first, p.second);
    check_shape(*p.first, {N, H}, p.second);
  }
  check_float_cpu(h0, "h0");
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == H, "fastseq_cpp: h0: expected shape [B, ", H, "], got ", h0.sizes());
  const int64_t B = h0.size(0);
  check_float_cpu(c0, "c0");
  check_shape(c0, {B, H}, "c0");
  check_float_cpu(w_hh, "w_hh");
  check_shape(w_hh, {4 * H, H}, "w_hh");
  check_float_cpu(gates, "gates");
  check_shape(gates, {N, 4 * H}, "gates");
  const PackedLayout pk = packed_layout(batch_sizes, N, B, reverse);
  const auto cd = compute_dtype(hs.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor gy = in_cd(grad_hs, cd), gcy = in_cd(grad_cs, cd);
  const Tensor h_init = in_cd(h0, cd), c_init = in_cd(c0, cd), w = in_cd(w_hh, cd);
  const Tensor hs_c = in_cd(hs, cd), cs_c = in_cd(cs, cd), g_c = in_cd(gates, cd);
  Tensor dg = at::empty({N, 4 * H}, opt);
  Tensor dh = at::zeros({B, H}, opt);
  Tensor dc = at::zeros({B, H}, opt);
  Tensor h_prev_all;

  AT_DISPATCH_FLOATING_TYPES(cd, "fastseq_cpp::lstm_packed_recurrence_backward", [&] {
    using T_ = scalar_t;
    LstmBwd<T_> a;
    a.lengths = nullptr;
    a.dh = dh.data_ptr<T_>();
    a.dc = dc.data_ptr<T_>();
    a.H = H;
    const T_* gy_p = gy.data_ptr<T_>();
    const T_* gc_p = gcy.data_ptr<T_>();
    const T_* g_p = g_c.data_ptr<T_>();
    const T_* cs_p = cs_c.data_ptr<T_>();
    const T_* h0_p = h_init.data_ptr<T_>();
    const T_* c0_p = c_init.data_ptr<T_>();
    T_* dg_p = dg.data_ptr<T_>();
    auto at_step = [&](LstmBwd<T_>& s, int64_t p) {
      const int64_t t = pk.step(p), q = pk.set(s.step, t, h0_p, c0_p);
      const int64_t o = pk.off[t];
      s.t = t;
      s.grad_hs = gy_p + o * H;
      s.grad_cs = gc_p + o * H;
      s.gates = g_p + o * 4 * H;
      s.c = cs_p + o * H;
      s.c_prev = q < 0 ? c0_p : cs_p + pk.off[q] * H;
      s.dg = dg_p + o * 4 * H;
    };
    backward_steps<T_>(a, pk.T, B, H, 4, at_step,
                       [](const LstmBwd<T_>& s, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
                         lstm_bwd_rows(s, b0, b1, j0, j1, false);
                       },
                       dg, w, dh, pk.steps.data(), grad_h0);
    h_prev_all = packed_prev_states<T_>(pk, hs_c, h_init);
  });

  const Tensor dw = at::mm(dg.t(), h_prev_all);
  const auto wdt = w_hh.scalar_type();
  Tensor db = has_bias ? finish(dg.sum(0), wdt) : at::empty({0}, w_hh.options());
  if (!grad_h0) {
    return {finish(dg, hs.scalar_type()), at::empty({0}, h0.options()), at::empty({0}, c0.options()),
            finish(dw, wdt), db};
  }
  return {finish(dg, hs.scalar_type()), finish(dh, h0.scalar_type()), finish(dc, c0.scalar_type()),
          finish(dw, wdt), db};
}

}  // namespace
}  // namespace cpu
}  // namespace fastseq

// The library itself (schemas.h: the schemas of every group of ops).
TORCH_LIBRARY(fastseq_cpp, m) {
  fastseq::define_recurrence_ops(m);
  fastseq::define_probe_ops(m);
}

TORCH_LIBRARY_IMPL(fastseq_cpp, CPU, m) {
  m.impl("gru_recurrence_forward", &fastseq::cpu::gru_recurrence_forward);
  m.impl("gru_recurrence_backward", &fastseq::cpu::gru_recurrence_backward);
  m.impl("lstm_recurrence_forward", &fastseq::cpu::lstm_recurrence_forward);
  m.impl("lstm_recurrence_backward", &fastseq::cpu::lstm_recurrence_backward);
  m.impl("gru_packed_recurrence_forward", &fastseq::cpu::gru_packed_recurrence_forward);
  m.impl("gru_packed_recurrence_backward", &fastseq::cpu::gru_packed_recurrence_backward);
  m.impl("lstm_packed_recurrence_forward", &fastseq::cpu::lstm_packed_recurrence_forward);
  m.impl("lstm_packed_recurrence_backward", &fastseq::cpu::lstm_packed_recurrence_backward);
}
