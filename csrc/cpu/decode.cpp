// The teacher-forced decoder loops in C++: one extension call per sequence.
//
// attention_gru_decode_{forward,backward} and luong_gru_decode_{forward,backward}
// run the per-step loops of fastseq/ops/decoder_step/decode.py and luong.py
// (their module docstrings give the math; the Python loops are the reference
// these equal bit for bit, tests/test_decoder_cpp_loop.py). Every step calls
// the extension's own step ops, additive_attention_{forward,backward} and
// gru_context_cell_{forward,backward}, through typed dispatcher handles looked
// up once, so the same loop runs the CPU kernels (attention.cpp, cell.cpp) on
// CPU tensors and the CUDA kernels (../cuda/bindings.cpp) on CUDA tensors: the
// loops are registered for the CompositeExplicitAutograd key, below autograd
// (the Python custom ops fastseq::attention_gru_decode / luong_gru_decode own
// the autograd; these are their "cpp" implementations).
//
// What this removes per step, against the Python loop: the interpreter, the
// Python-to-C++ crossing of each step op (~10 us each), and the torch.library
// wrappers; what is left is ATen's per-op cost (a few small ops per step:
// slices, one product, the accumulations) and the step kernels themselves.
// T = 0 is handled by the Python callers; these require T >= 1.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "schemas.h"

#define FASTSEQ_DECODE_STR2(x) #x
#define FASTSEQ_DECODE_STR(x) FASTSEQ_DECODE_STR2(x)

namespace fastseq {
namespace decode {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using AttentionForward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    const OptTensor&, const OptTensor&, const OptTensor&);
using AttentionBackward = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                                     const Tensor&, const Tensor&, const Tensor&,
                                                                     const Tensor&, const Tensor&);
using CellForward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                               const OptTensor&, const Tensor&, bool);
using CellBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                                const Tensor&, const Tensor&,
                                                                                const Tensor&, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> step_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string(FASTSEQ_DECODE_STR(FASTSEQ_CPP_LIBRARY)) + "::" + name).c_str(), "")
      .typed<Sig>();
}

// The four step ops, looked up on first use (function-local statics: thread-safe).
const c10::TypedOperatorHandle<AttentionForward>& attention_forward() {
  static const auto op = step_op<AttentionForward>("additive_attention_forward");
  return op;
}
const c10::TypedOperatorHandle<AttentionBackward>& attention_backward() {
  static const auto op = step_op<AttentionBackward>("additive_attention_backward");
  return op;
}
const c10::TypedOperatorHandle<CellForward>& cell_forward() {
  static const auto op = step_op<CellForward>("gru_context_cell_forward");
  return op;
}
const c10::TypedOperatorHandle<CellBackward>& cell_backward() {
  static const auto op = step_op<CellBackward>("gru_context_cell_backward");
  return op;
}

void check_steps(const Tensor& gi_emb, const char* op) {
  TORCH_CHECK(gi_emb.dim() == 3 && gi_emb.size(1) >= 1, "fastseq_cpp::", op,
              ": gi_emb: expected [B, T, 3H] with T >= 1 (T = 0 is the Python caller's), got shape ",
              gi_emb.sizes());
}

// ---------------------------------------------------------------------------
// Bahdanau flow (decode.py): q, gh from s_{i-1}; attention; the context cell.

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_gru_decode_forward(
    const Tensor& gi_emb, const Tensor& h0, const Tensor& proj_keys, const Tensor& values, const Tensor& w_cat,
    const OptTensor& b_hh, const Tensor& energy, const Tensor& w_ic, const OptTensor& mask,
    const OptTensor& lengths, bool save) {
  check_steps(gi_emb, "attention_gru_decode_forward");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto& attention = attention_forward();
  const auto& cell = cell_forward();
  const int64_t T = gi_emb.size(1), A = energy.size(0), H = h0.size(1);
  const Tensor w_t = w_cat.t();
  const OptTensor no_bias;
  Tensor h = h0;
  std::vector<Tensor> states, contexts, alphas, gates, queries;
  states.reserve(T);
  contexts.reserve(T);
  alphas.reserve(T);
  if (save) {
    gates.reserve(T);
    queries.reserve(T);
  }
  for (int64_t t = 0; t < T; ++t) {
    const Tensor gi = gi_emb.select(1, t);
    const Tensor p = at::mm(h, w_t);
    const Tensor q = p.narrow(1, 0, A);
    auto [c3, alpha] = attention.call(q.unsqueeze(1), proj_keys, values, energy, mask, lengths, no_bias);
    const Tensor c = c3.squeeze(1);
    auto [h_next, g] = cell.call(gi, c, w_ic, p.narrow(1, A, 3 * H), b_hh, h, save);
    h = h_next;
    states.push_back(h);
    contexts.push_back(c);
    alphas.push_back(alpha);
    if (save) {
      gates.push_back(g);
      queries.push_back(q);
    }
  }
  Tensor out_states = at::stack(states, 1), out_contexts = at::stack(contexts, 1), out_weights = at::cat(alphas, 1);
  if (!save) {
    const Tensor empty = gi_emb.new_empty({0});
    return {out_states, out_contexts, out_weights, empty, empty.clone()};
  }
  return {out_states, out_contexts, out_weights, at::stack(gates), at::stack(queries)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_gru_decode_backward(
    const OptTensor& grad_states, const OptTensor& grad_contexts, const OptTensor& grad_weights,
    const Tensor& gi_emb, const Tensor& h0, const Tensor& proj_keys, const Tensor& values, const Tensor& w_cat,
    const Tensor& energy, const Tensor& w_ic, const Tensor& states, const Tensor& contexts, const Tensor& weights,
    const Tensor& gates, const Tensor& queries, bool has_bias) {
  check_steps(gi_emb, "attention_gru_decode_backward");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto& attention = attention_backward();
  const auto& cell = cell_backward();
  const int64_t B = states.size(0), T = states.size(1), H = states.size(2);
  Tensor d_keys = at::zeros_like(proj_keys), d_values = at::zeros_like(values);
  Tensor d_energy = at::zeros_like(energy), d_w_ic = at::zeros_like(w_ic);
  Tensor d_b = has_bias ? w_ic.new_zeros({3 * H}) : w_ic.new_empty({0});
  // Step-major copies, so that every step's slice is contiguous.
  const Tensor hs = states.transpose(0, 1).contiguous();  // [T, B, H]: s_1 .. s_T
  const Tensor cs = contexts.transpose(0, 1).contiguous();
  const Tensor ws = weights.transpose(0, 1).contiguous();
  const OptTensor gs = grad_states ? OptTensor(grad_states->transpose(0, 1).contiguous()) : std::nullopt;
  const OptTensor gc = grad_contexts ? OptTensor(grad_contexts->transpose(0, 1).contiguous()) : std::nullopt;
  const OptTensor gw = grad_weights ? OptTensor(grad_weights->transpose(0, 1).contiguous()) : std::nullopt;
  std::vector<Tensor> d_gi(T), d_p(T);
  Tensor dh;
  for (int64_t t = T - 1; t >= 0; --t) {
    const Tensor h_prev = t == 0 ? h0 : hs.select(0, t - 1);
    if (!dh.defined()) {
      dh = gs ? gs->select(0, t) : at::zeros_like(h0);
    } else if (gs) {
      dh = dh + gs->select(0, t);
    }
    const Tensor c = cs.select(0, t);
    auto [dgi, dctx, dw, dgh, db, dh_direct] = cell.call(dh, gates.select(0, t), h_prev, c, w_ic, has_bias);
    if (gc) dctx = dctx + gc->select(0, t);
    const Tensor q = queries.select(0, t).unsqueeze(1);
    const OptTensor gw_t = gw ? OptTensor(gw->select(0, t).unsqueeze(1)) : std::nullopt;
    auto [dq, dk, dv, de] =
        attention.call(dctx.unsqueeze(1), gw_t, q, proj_keys, values, energy, ws.select(0, t).unsqueeze(1));
    const Tensor dp = at::cat({dq.squeeze(1), dgh}, 1);
    dh = dh_direct.addmm(dp, w_cat);
    d_gi[t] = dgi;
    d_p[t] = dp;
    d_keys.add_(dk);
    d_values.add_(dv);
    d_energy.add_(de);
    d_w_ic.add_(dw);
    if (has_bias) d_b.add_(db);
  }
  // grad w_cat = sum_t dp_t^T s_{t-1}: one product over all steps.
  const Tensor prev = at::cat({h0.unsqueeze(0), hs.narrow(0, 0, T - 1)}).reshape({T * B, H});
  const Tensor d_w_cat = at::stack(d_p).reshape({T * B, -1}).t().mm(prev).to(w_cat.scalar_type());
  return {at::stack(d_gi, 1), dh, d_keys, d_values, d_w_cat, d_b, d_energy, d_w_ic};
}

// ---------------------------------------------------------------------------
// Luong flow (luong.py): the cell first (input feeding), then one product for
// [q; u; gh_next], then the attention with out_bias = u (a = tanh(u + W_cc c)).

std::tuple<Tensor, Tensor, Tensor, Tensor> luong_gru_decode_forward(
    const Tensor& gi_emb, const Tensor& h0, const Tensor& proj_keys, const Tensor& proj_values,
    const Tensor& w_cat, const OptTensor& b_att, const OptTensor& b_hh, const Tensor& energy, const Tensor& w_ia,
    const OptTensor& mask, const OptTensor& lengths, bool save) {
  check_steps(gi_emb, "luong_gru_decode_forward");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto& attention = attention_forward();
  const auto& cell = cell_forward();
  const int64_t T = gi_emb.size(1), H = w_cat.size(1), A = energy.size(0);
  const Tensor w_t = w_cat.t();
  OptTensor bias;  // [0_A; b_att; 0_3H]
  if (b_att) bias = at::cat({b_att->new_zeros({A}), *b_att, b_att->new_zeros({3 * H})});
  Tensor s = h0.narrow(1, 0, H).contiguous(), a = h0.narrow(1, H, H).contiguous();
  Tensor gh = s.mm(w_cat.narrow(0, A + H, 3 * H).t());
  std::vector<Tensor> ss, aa, alphas, gates, queries;
  ss.reserve(T);
  aa.reserve(T);
  alphas.reserve(T);
  if (save) {
    gates.reserve(T);
    queries.reserve(T);
  }
  for (int64_t t = 0; t < T; ++t) {
    auto [s_next, g] = cell.call(gi_emb.select(1, t), a, w_ia, gh, b_hh, s, save);
    s = s_next;
    const Tensor p = bias ? at::addmm(*bias, s, w_t) : s.mm(w_t);
    const Tensor q = p.narrow(1, 0, A);
    auto [a3, alpha] =
        attention.call(q.unsqueeze(1), proj_keys, proj_values, energy, mask, lengths, p.narrow(1, A, H).unsqueeze(1));
    a = a3.squeeze(1);
    gh = p.narrow(1, A + H, 3 * H);
    ss.push_back(s);
    aa.push_back(a);
    alphas.push_back(alpha);
    if (save) {
      gates.push_back(g);
      queries.push_back(q);
    }
  }
  Tensor states = at::cat({at::stack(ss, 1), at::stack(aa, 1)}, 2), weights = at::cat(alphas, 1);
  if (!save) {
    const Tensor empty = gi_emb.new_empty({0});
    return {states, weights, empty, empty.clone()};
  }
  return {states, weights, at::stack(gates), at::stack(queries)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> luong_gru_decode_backward(
    const OptTensor& grad_states, const OptTensor& grad_weights, const Tensor& h0, const Tensor& proj_keys,
    const Tensor& proj_values, const Tensor& w_cat, const Tensor& energy, const Tensor& w_ia, const Tensor& states,
    const Tensor& weights, const Tensor& gates, const Tensor& queries, bool has_att_bias, bool has_bias) {
  check_steps(states, "luong_gru_decode_backward");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto& attention = attention_backward();
  const auto& cell = cell_backward();
  const int64_t B = states.size(0), T = states.size(1), H = states.size(2) / 2, A = energy.size(0);
  Tensor d_keys = at::zeros_like(proj_keys), d_values = at::zeros_like(proj_values);
  Tensor d_energy = at::zeros_like(energy), d_w_ia = at::zeros_like(w_ia);
  Tensor d_batt = has_att_bias ? w_cat.new_zeros({H}) : w_cat.new_empty({0});
  Tensor d_bhh = has_bias ? w_ia.new_zeros({3 * H}) : w_ia.new_empty({0});
  // Step-major copies, so that every step's slice is contiguous.
  const Tensor st = states.transpose(0, 1).contiguous();  // [T, B, 2H]: [s_i; a_i], i = 1..T
  const Tensor ss = st.narrow(2, 0, H), aa = st.narrow(2, H, H);
  const Tensor ws = weights.transpose(0, 1).contiguous();
  const OptTensor gs = grad_states ? OptTensor(grad_states->transpose(0, 1).contiguous()) : std::nullopt;
  const OptTensor gw = grad_weights ? OptTensor(grad_weights->transpose(0, 1).contiguous()) : std::nullopt;
  const Tensor s0 = h0.narrow(1, 0, H).contiguous(), a0 = h0.narrow(1, H, H).contiguous();
  std::vector<Tensor> d_gi(T), d_p(T);
  Tensor ds, da;
  Tensor dgh = w_cat.new_zeros({B, 3 * H});  // grad of gh_{T+1}: not used by any step
  for (int64_t t = T - 1; t >= 0; --t) {
    // grads of s_{t+1} and a_{t+1}: from the next step (carried) and from the outputs
    if (gs) {
      const Tensor g = gs->select(0, t);
      ds = ds.defined() ? ds + g.narrow(1, 0, H) : g.narrow(1, 0, H);
      da = da.defined() ? da + g.narrow(1, H, H) : g.narrow(1, H, H);
    }
    if (!ds.defined()) ds = at::zeros_like(s0);
    const Tensor dx = da.defined() ? at::tanh_backward(da, aa.select(0, t)) : at::zeros_like(s0);
    const Tensor q = queries.select(0, t).unsqueeze(1);
    const OptTensor gw_t = gw ? OptTensor(gw->select(0, t).unsqueeze(1)) : std::nullopt;
    auto [dq, dk, dv, de] = attention.call(dx.unsqueeze(1), gw_t, q, proj_keys, proj_values, energy,
                                           ws.select(0, t).unsqueeze(1));
    const Tensor dp = at::cat({dq.squeeze(1), dx, dgh}, 1);
    ds = ds.addmm(dp, w_cat);  // + grad through [q; u; gh] = s w_cat^T
    d_p[t] = dp;
    d_keys.add_(dk);
    d_values.add_(dv);
    d_energy.add_(de);
    if (has_att_bias) d_batt.add_(dx.sum(0));
    const Tensor s_prev = t == 0 ? s0 : ss.select(0, t - 1);
    const Tensor a_prev = t == 0 ? a0 : aa.select(0, t - 1);
    auto [dgi, da_prev, dw, dgh_t, db, ds_prev] = cell.call(ds, gates.select(0, t), s_prev, a_prev, w_ia, has_bias);
    d_gi[t] = dgi;
    da = da_prev;
    dgh = dgh_t;
    ds = ds_prev;
    d_w_ia.add_(dw);
    if (has_bias) d_bhh.add_(db);
  }
  // gh_1 = s_0 W_hh^T, the product before the loop.
  const Tensor w_hh = w_cat.narrow(0, A + H, 3 * H);
  const Tensor d_s0 = ds.addmm(dgh, w_hh);
  // grad w_cat = sum_t dp_t^T s_{t+1} (one product over all steps) + the W_hh rows' dgh_1^T s_0.
  Tensor d_w_cat = at::stack(d_p).reshape({T * B, -1}).t().mm(ss.reshape({T * B, H}));
  d_w_cat.narrow(0, A + H, 3 * H).addmm_(dgh.t(), s0);
  const Tensor d_h0 = at::cat({d_s0, da}, 1);
  return {at::stack(d_gi, 1), d_h0,  d_keys, d_values, d_w_cat.to(w_cat.scalar_type()),
          d_batt,             d_bhh, d_energy, d_w_ia};
}

}  // namespace decode
}  // namespace fastseq

TORCH_LIBRARY_FRAGMENT(FASTSEQ_CPP_LIBRARY, m) {
  fastseq::define_decode_ops(m);
}

TORCH_LIBRARY_IMPL(FASTSEQ_CPP_LIBRARY, CompositeExplicitAutograd, m) {
  m.impl("attention_gru_decode_forward", &fastseq::decode::attention_gru_decode_forward);
  m.impl("attention_gru_decode_backward", &fastseq::decode::attention_gru_decode_backward);
  m.impl("luong_gru_decode_forward", &fastseq::decode::luong_gru_decode_forward);
  m.impl("luong_gru_decode_backward", &fastseq::decode::luong_gru_decode_backward);
}
