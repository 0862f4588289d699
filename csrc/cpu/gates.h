// The GRU and LSTM gate formulas of the CPU kernels, forward and backward,
// one element at a time: the only copy, used by the recurrences (rnn.cpp) and
// by the attention decoder's GRU context cell (cell.cpp). The CUDA kernels
// have their own copy of the same formulas, in the same order of operations
// (csrc/cuda/gates.cuh).
//
// Gate order GRU (r, z, n), LSTM (i, f, g, o). A gate's pre-activation comes
// in two parts: x, the input part (gi, plus context W_ic^T in the cell), and
// h, the recurrent part (h W_hh^T plus b_hh); they are added as x + h, so each
// caller forms its parts exactly as the reference sums them.
//
// Every function is FASTSEQ_INLINE and branch-free: it is compiled inside the
// calling kernel's loop, hence for that kernel's ISA (baseline or AVX2+FMA,
// see common.h), and the loop vectorises as if the formula were written out
// there. The order of the floating-point operations is part of the contract
// (the results are bit-for-bit those of the formulas as written here).
//
// The recurrences run the forward formulas as separate passes over a block of
// units (one per activation, see rnn.cpp), so the GRU and LSTM forward come as
// one function per step of the formula; gru_gate_forward composes the GRU
// steps for kernels that run them all in one loop (the cell).
#pragma once

#include "common.h"

namespace fastseq {
namespace cpu {

// ----------------------------------------------------------- gate activations

// A sigmoid gate (GRU r, z; LSTM i, f, o): sigmoid(x + h).
template <typename T>
FASTSEQ_INLINE T sigmoid_gate(T x, T h) {
  return sigmoid_f(x + h);
}

// A tanh gate (LSTM g): tanh(x + h).
template <typename T>
FASTSEQ_INLINE T tanh_gate(T x, T h) {
  return tanh_f(x + h);
}

// ---------------------------------------------------------------- GRU forward
//
//   r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z)      (sigmoid_gate)
//   n = tanh(x_n + r * h_n)                              (gru_candidate)
//   h' = (1 - z) * n + z * h                             (gru_state)
// The saved gates are (r, z, n, h_n).

// n = tanh(x_n + r * h_n), h_n = (h W_hh^T)_n + b_n.
template <typename T>
FASTSEQ_INLINE T gru_candidate(T x_n, T r, T h_n) {
  return tanh_f(x_n + r * h_n);
}

// h' = (1 - z) * n + z * h
template <typename T>
FASTSEQ_INLINE T gru_state(T z, T n, T h) {
  return (T(1) - z) * n + z * h;
}

template <typename T>
struct GruGates {
  T r, z, n;  // the activated gates
  T h;        // h', the new state
};

// The whole GRU forward of one element, from the two parts of each gate's
// pre-activation and the previous state h.
template <typename T>
FASTSEQ_INLINE GruGates<T> gru_gate_forward(T x_r, T x_z, T x_n, T h_r, T h_z, T h_n, T h) {
  GruGates<T> y;
  y.r = sigmoid_gate(x_r, h_r);
  y.z = sigmoid_gate(x_z, h_z);
  y.n = gru_candidate(x_n, y.r, h_n);
  y.h = gru_state(y.z, y.n, h);
  return y;
}

// --------------------------------------------------------------- GRU backward

template <typename T>
struct GruGateGrads {
  T dr, dz, dn;  // gradients of the pre-activations: grad_gi = (dr, dz, dn)
  T dhn;         // dn * r: the n part of the gradient of h W_hh^T (grad_gh = (dr, dz, dhn))
  T dh;          // d * z: the direct part of the gradient of the previous state
};

// d: the gradient of h'; (r, z, n, h_n): the saved gates; h: the previous state.
//   dn = d (1 - z) (1 - n^2), dz = d (h - n) z (1 - z), dr = dn h_n r (1 - r)
template <typename T>
FASTSEQ_INLINE GruGateGrads<T> gru_gate_backward(T d, T r, T z, T n, T h_n, T h) {
  GruGateGrads<T> g;
  const T dn = d * (T(1) - z);
  const T dz = d * (h - n);
  g.dn = dn * (T(1) - n * n);
  g.dz = dz * z * (T(1) - z);
  g.dr = g.dn * h_n * r * (T(1) - r);
  g.dhn = g.dn * r;
  g.dh = d * z;
  return g;
}

// --------------------------------------------------------------- LSTM forward
//
//   i, f, o = sigmoid(x + h) (sigmoid_gate), g = tanh(x + h) (tanh_gate)
//   c' = f * c + i * g                                   (lstm_cell_state)
//   h' = o * tanh(c')                                    (lstm_hidden)
// The saved gates are the activated (i, f, g, o).

// c' = f * c + i * g
template <typename T>
FASTSEQ_INLINE T lstm_cell_state(T i, T f, T g, T c) {
  return f * c + i * g;
}

// h' = o * tanh(c')
template <typename T>
FASTSEQ_INLINE T lstm_hidden(T o, T c_new) {
  return o * tanh_f(c_new);
}

// -------------------------------------------------------------- LSTM backward

template <typename T>
struct LstmGateGrads {
  T di, df, dg, d_o;  // gradients of the pre-activations (i, f, g, o)
  T dc;               // the gradient of the previous cell state
};

// d: the gradient of h'; dc_in: the gradient of c' from outside the step
// (step t+1 and grad_cs[t]); (i, f, g, o): the saved gates; tc = tanh(c');
// c: the previous cell state.
//   dc_tot = dc_in + d o (1 - tc^2)
//   di = dc_tot g i (1 - i), df = dc_tot c f (1 - f), dg = dc_tot i (1 - g^2),
//   do = d tc o (1 - o), dc = dc_tot f
template <typename T>
FASTSEQ_INLINE LstmGateGrads<T> lstm_gate_backward(T d, T dc_in, T i, T f, T g, T o, T tc, T c) {
  LstmGateGrads<T> y;
  const T dc_tot = dc_in + d * o * (T(1) - tc * tc);
  y.di = dc_tot * g * i * (T(1) - i);
  y.df = dc_tot * c * f * (T(1) - f);
  y.dg = dc_tot * i * (T(1) - g * g);
  y.d_o = d * tc * o * (T(1) - o);
  y.dc = dc_tot * f;
  return y;
}

}  // namespace cpu
}  // namespace fastseq
