// The schemas of the fastseq_cpp ops: the only copy, used by the library's
// definition in the CPU sources (rnn.cpp: TORCH_LIBRARY(fastseq_cpp);
// attention.cpp, cell.cpp: TORCH_LIBRARY_FRAGMENT(FASTSEQ_CPP_LIBRARY)) and by
// the test-only CUDA host emulation library (../cuda/bindings.cpp,
// fastseq_cuda_emu). Semantics: fastseq/ops/<op>/naive.py; absent outputs are
// empty [0] tensors.
//
// Each source that implements a group of ops defines that group's schemas
// (the tests build attention.cpp and cell.cpp on their own, under another
// library name), so there is one function per group. Included with a path
// relative to this file's folder (from csrc/cuda: "../cpu/schemas.h"), which
// needs no include flag.
#pragma once

#include <torch/library.h>

// The torch.library namespace the ops are registered in. The tests build
// sources on their own under another name (-DFASTSEQ_CPP_LIBRARY=...), so that
// they never clash with the full fastseq_cpp library when both are loaded in
// one process. TORCH_LIBRARY does not expand a macro argument, so the full
// library's TORCH_LIBRARY (rnn.cpp) names fastseq_cpp itself.
#ifndef FASTSEQ_CPP_LIBRARY
#define FASTSEQ_CPP_LIBRARY fastseq_cpp
#endif

namespace fastseq {

// gru_recurrence_{forward,backward}, lstm_recurrence_{forward,backward} (cpu/rnn.cpp).
// The backward ops' grad_h0=False: the gradient of h0 (and c0) is not needed;
// it comes back as an empty [0] tensor, and the C++ CPU kernels skip the
// product that only feeds it (the last step's dG W_hh).
inline void define_recurrence_ops(torch::Library& m) {
  m.def(
      "gru_recurrence_forward(Tensor gi, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? lengths, "
      "bool save_gates=True) -> (Tensor, Tensor)");
  m.def(
      "gru_recurrence_backward(Tensor grad_hs, Tensor h0, Tensor w_hh, Tensor hs, Tensor gates, "
      "Tensor? lengths, bool has_bias, bool grad_h0=True) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_recurrence_forward(Tensor gi, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, "
      "Tensor? lengths, bool save_gates=True) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lstm_recurrence_backward(Tensor grad_hs, Tensor grad_cs, Tensor h0, Tensor c0, Tensor w_hh, "
      "Tensor hs, Tensor cs, Tensor gates, Tensor? lengths, bool has_bias, bool grad_h0=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The packed layout (naive.py, "packed layout"): gi [N, G*H], batch_sizes int64 [T] on the CPU.
  m.def(
      "gru_packed_recurrence_forward(Tensor gi, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor batch_sizes, "
      "bool reverse, bool save_gates=True) -> (Tensor, Tensor)");
  m.def(
      "gru_packed_recurrence_backward(Tensor grad_hs, Tensor h0, Tensor w_hh, Tensor hs, Tensor gates, "
      "Tensor batch_sizes, bool reverse, bool has_bias, bool grad_h0=True) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_packed_recurrence_forward(Tensor gi, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, "
      "Tensor batch_sizes, bool reverse, bool save_gates=True) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lstm_packed_recurrence_backward(Tensor grad_hs, Tensor grad_cs, Tensor h0, Tensor c0, Tensor w_hh, "
      "Tensor hs, Tensor cs, Tensor gates, Tensor batch_sizes, bool reverse, bool has_bias, bool grad_h0=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// The recurrences with their autograd in C++ (cpu/autograd.cpp): each runs the
// forward op above and records a backward that calls the backward op.
inline void define_autograd_ops(torch::Library& m) {
  m.def("gru_recurrence(Tensor gi, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? lengths) -> Tensor");
  m.def(
      "lstm_recurrence(Tensor gi, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, Tensor? lengths) "
      "-> (Tensor, Tensor)");
  m.def(
      "gru_packed_recurrence(Tensor gi, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor batch_sizes, "
      "bool reverse) -> Tensor");
  m.def(
      "lstm_packed_recurrence(Tensor gi, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, "
      "Tensor batch_sizes, bool reverse) -> (Tensor, Tensor)");
}

// additive_attention_{forward,backward} (cpu/attention.cpp).
inline void define_attention_ops(torch::Library& m) {
  m.def(
      "additive_attention_forward(Tensor query, Tensor proj_keys, Tensor values, Tensor energy, "
      "Tensor? mask=None, Tensor? lengths=None, Tensor? out_bias=None) -> (Tensor, Tensor)");
  m.def(
      "additive_attention_backward(Tensor grad_context, Tensor? grad_weights, Tensor query, "
      "Tensor proj_keys, Tensor values, Tensor energy, Tensor weights) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

// gru_context_cell_{forward,backward} (cpu/cell.cpp).
inline void define_cell_ops(torch::Library& m) {
  m.def(
      "gru_context_cell_forward(Tensor gi, Tensor context, Tensor w_ic, Tensor gh, Tensor? b_hh, "
      "Tensor h, bool save_gates=True) -> (Tensor, Tensor)");
  m.def(
      "gru_context_cell_backward(Tensor grad_h, Tensor gates, Tensor h, Tensor context, Tensor w_ic, "
      "bool has_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// The teacher-forced decoder loops (cpu/decode.cpp, any device: each step calls
// the step ops above through the dispatcher). Semantics: the Python loops in
// fastseq/ops/decoder_step/decode.py and luong.py (T >= 1 here).
inline void define_decode_ops(torch::Library& m) {
  m.def(
      "attention_gru_decode_forward(Tensor gi_emb, Tensor h0, Tensor proj_keys, Tensor values, Tensor w_cat, "
      "Tensor? b_hh, Tensor energy, Tensor w_ic, Tensor? mask, Tensor? lengths, bool save) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_gru_decode_backward(Tensor? grad_states, Tensor? grad_contexts, Tensor? grad_weights, "
      "Tensor gi_emb, Tensor h0, Tensor proj_keys, Tensor values, Tensor w_cat, Tensor energy, Tensor w_ic, "
      "Tensor states, Tensor contexts, Tensor weights, Tensor gates, Tensor queries, bool has_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "luong_gru_decode_forward(Tensor gi_emb, Tensor h0, Tensor proj_keys, Tensor proj_values, Tensor w_cat, "
      "Tensor? b_att, Tensor? b_hh, Tensor energy, Tensor w_ia, Tensor? mask, Tensor? lengths, bool save) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "luong_gru_decode_backward(Tensor? grad_states, Tensor? grad_weights, Tensor h0, Tensor proj_keys, "
      "Tensor proj_values, Tensor w_cat, Tensor energy, Tensor w_ia, Tensor states, Tensor weights, "
      "Tensor gates, Tensor queries, bool has_att_bias, bool has_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// persistent_sync_probe (CUDA only: csrc/cuda/persistent_sync_probe.cu; defined with the
// recurrence ops in rnn.cpp): a benchmark kernel, the persistent kernels' per-step exchange
// and barrier alone. buffer: int32 [2, blocks * words] (overwritten); mode: grid, flags or
// tagged; returns each thread's checksum, int64 [blocks, 256].
inline void define_probe_ops(torch::Library& m) {
  m.def("persistent_sync_probe(Tensor(a!) buffer, int blocks, int steps, str mode, int cluster=1) -> Tensor");
}

// Every step op (the CUDA host emulation library defines them all in one place).
inline void define_all_ops(torch::Library& m) {
  define_recurrence_ops(m);
  define_probe_ops(m);
  define_attention_ops(m);
  define_cell_ops(m);
}

}  // namespace fastseq
