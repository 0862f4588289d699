// The GRU and LSTM gate formulas of the CUDA kernels, forward and backward,
// one element at a time: the only copy, used by the recurrence kernels
// (rnn_kernels.cu) and by the attention decoder's GRU cell kernels
// (cell_kernels.cu). They mirror the CPU copy (csrc/cpu/gates.h): the same
// functions, the same order of operations, with the device activations of
// common.cuh (full-precision libdevice sigmoid / tanh).
//
// Gate order GRU (r, z, n), LSTM (i, f, g, o). A gate's pre-activation comes
// in two parts: x, the input part (gi, plus context W_ic^T in the cell), and
// h, the recurrent part (h W_hh^T plus b_hh); they are added as x + h, so each
// kernel forms its parts exactly as the reference sums them. C is the compute
// type (float, or double for float64 inputs).
//
// Only CUDA toolkit headers (through common.cuh): no ATen / c10 / torch
// header. Under FASTSEQ_CUDA_HOST_EMULATION (tests) these are plain inline
// functions compiled by the host compiler.
#pragma once

#include "common.cuh"

namespace fastseq {
namespace cuda {
namespace detail {

// ----------------------------------------------------------- gate activations

// A sigmoid gate (GRU r, z; LSTM i, f, o): sigmoid(x + h).
template <typename C>
FASTSEQ_DEVICE C sigmoid_gate(C x, C h) {
  return sigmoid_(x + h);
}

// A tanh gate (LSTM g): tanh(x + h).
template <typename C>
FASTSEQ_DEVICE C tanh_gate(C x, C h) {
  return tanh_(x + h);
}

// ---------------------------------------------------------------- GRU forward
//
//   r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r * h_n),
//   h' = (1 - z) * n + z * h.   The saved gates are (r, z, n, h_n).

// n = tanh(x_n + r * h_n), h_n = (h W_hh^T)_n + b_n.
template <typename C>
FASTSEQ_DEVICE C gru_candidate(C x_n, C r, C h_n) {
  return tanh_(x_n + r * h_n);
}

// h' = (1 - z) * n + z * h
template <typename C>
FASTSEQ_DEVICE C gru_state(C z, C n, C h) {
  return (C(1) - z) * n + z * h;
}

template <typename C>
struct GruGates {
  C r, z, n;  // the activated gates
  C h;        // h', the new state
};

// The whole GRU forward of one element, from the two parts of each gate's
// pre-activation and the previous state h.
template <typename C>
FASTSEQ_DEVICE GruGates<C> gru_gate_forward(C x_r, C x_z, C x_n, C h_r, C h_z, C h_n, C h) {
  GruGates<C> y;
  y.r = sigmoid_gate(x_r, h_r);
  y.z = sigmoid_gate(x_z, h_z);
  y.n = gru_candidate(x_n, y.r, h_n);
  y.h = gru_state(y.z, y.n, h);
  return y;
}

// --------------------------------------------------------------- GRU backward

template <typename C>
struct GruGateGrads {
  C dr, dz, dn;  // gradients of the pre-activations: grad_gi = (dr, dz, dn)
  C dhn;         // dn * r: the n part of the gradient of h W_hh^T (grad_gh = (dr, dz, dhn))
  C dh;          // d * z: the direct part of the gradient of the previous state
};

// d: the gradient of h'; (r, z, n, h_n): the saved gates; h: the previous state.
//   dn = d (1 - z) (1 - n^2), dz = d (h - n) z (1 - z), dr = dn h_n r (1 - r)
template <typename C>
FASTSEQ_DEVICE GruGateGrads<C> gru_gate_backward(C d, C r, C z, C n, C h_n, C h) {
  GruGateGrads<C> g;
  const C dn = d * (C(1) - z);
  const C dz = d * (h - n);
  g.dn = dn * (C(1) - n * n);
  g.dz = dz * z * (C(1) - z);
  g.dr = g.dn * h_n * r * (C(1) - r);
  g.dhn = g.dn * r;
  g.dh = d * z;
  return g;
}

// --------------------------------------------------------------- LSTM forward
//
//   i, f, o = sigmoid(x + h), g = tanh(x + h), c' = f * c + i * g,
//   h' = o * tanh(c').   The saved gates are the activated (i, f, g, o).

// c' = f * c + i * g
template <typename C>
FASTSEQ_DEVICE C lstm_cell_state(C i, C f, C g, C c) {
  return f * c + i * g;
}

// h' = o * tanh(c')
template <typename C>
FASTSEQ_DEVICE C lstm_hidden(C o, C c_new) {
  return o * tanh_(c_new);
}

template <typename C>
struct LstmGates {
  C i, f, g, o;  // the activated gates
  C c, h;        // c', h': the new states
};

// The whole LSTM forward of one element, from the two parts of each gate's
// pre-activation and the previous cell state c.
template <typename C>
FASTSEQ_DEVICE LstmGates<C> lstm_gate_forward(C x_i, C x_f, C x_g, C x_o, C h_i, C h_f, C h_g, C h_o, C c) {
  LstmGates<C> y;
  y.i = sigmoid_gate(x_i, h_i);
  y.f = sigmoid_gate(x_f, h_f);
  y.g = tanh_gate(x_g, h_g);
  y.o = sigmoid_gate(x_o, h_o);
  y.c = lstm_cell_state(y.i, y.f, y.g, c);
  y.h = lstm_hidden(y.o, y.c);
  return y;
}

// -------------------------------------------------------------- LSTM backward

template <typename C>
struct LstmGateGrads {
  C di, df, dg, d_o;  // gradients of the pre-activations (i, f, g, o)
  C dc;               // the gradient of the previous cell state
};

// d: the gradient of h'; dc_in: the gradient of c' from outside the step
// (step t+1 and grad_cs[t]); (i, f, g, o): the saved gates; tc = tanh(c');
// c: the previous cell state.
//   dc_tot = dc_in + d o (1 - tc^2)
//   di = dc_tot g i (1 - i), df = dc_tot c f (1 - f), dg = dc_tot i (1 - g^2),
//   do = d tc o (1 - o), dc = dc_tot f
template <typename C>
FASTSEQ_DEVICE LstmGateGrads<C> lstm_gate_backward(C d, C dc_in, C i, C f, C g, C o, C tc, C c) {
  LstmGateGrads<C> y;
  const C dc_tot = dc_in + d * o * (C(1) - tc * tc);
  y.di = dc_tot * g * i * (C(1) - i);
  y.df = dc_tot * c * f * (C(1) - f);
  y.dg = dc_tot * i * (C(1) - g * g);
  y.d_o = d * tc * o * (C(1) - o);
  y.dc = dc_tot * f;
  return y;
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastseq
