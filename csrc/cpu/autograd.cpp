// Autograd for the C++ recurrences, in C++: fastseq_cpp::gru_recurrence,
// lstm_recurrence, gru_packed_recurrence and lstm_packed_recurrence run the
// forward op (rnn.cpp on the CPU, ../cuda on CUDA: the dispatcher picks by
// device) and record a torch::autograd::Function whose backward calls the
// backward op. A training step through the C++ backend thus spends no Python
// in the backward (the torch.library custom ops' Python autograd formula and
// wrappers cost ~100 us per call, most of a one-step decoder call).
//
// The backward asks for the gradient of h0/c0 only when an input needs it
// (grad_h0=False skips the product that feeds only it: a sixth of a one-step
// call's products when h0 is None, as in most models' first call).
//
// Device-agnostic: the ops are reached through the dispatcher, so this file
// holds no kernel. Registered as CompositeImplicitAutograd (the Function
// records the graph; inference tensors run the same code without it).
// fastseq/ops/recurrence/op.py calls these when the C++ backend is chosen and
// no torch.compile trace is running (traces use the custom ops, which have
// fake implementations).
#include "schemas.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastseq {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<Tensor> opt(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

// The saved tensors; an error (not a crash) if the forward saved none (it ran
// with nothing requiring a gradient, then a gradient was asked for anyway).
variable_list saved(AutogradContext* ctx) {
  auto s = ctx->get_saved_variables();
  TORCH_CHECK(!s.empty(), "fastseq_cpp: this recurrence ran without saving what its backward needs "
              "(no input required a gradient when it ran)");
  return s;
}

Tensor or_zeros(const Tensor& grad, const Tensor& like) {
  return grad.defined() ? grad.contiguous() : at::zeros_like(like);
}

bool wants_grad(std::initializer_list<const Tensor*> ts, const std::optional<Tensor>& bias) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return bias.has_value() && bias->defined() && bias->requires_grad();
}

#define FASTSEQ_STR_(x) #x
#define FASTSEQ_STR(x) FASTSEQ_STR_(x)

// An op of this library ("<library>::<name>") with signature Sig.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  const std::string full = std::string(FASTSEQ_STR(FASTSEQ_CPP_LIBRARY)) + "::" + name;
  return c10::Dispatcher::singleton().findSchemaOrThrow(full.c_str(), "").typed<Sig>();
}

// -------------------------------------------------------------------- dense

using GruFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                             const std::optional<Tensor>&, const std::optional<Tensor>&, bool);
using GruBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const Tensor&, const Tensor&,
                                                             const std::optional<Tensor>&, bool, bool);
using LstmFwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const std::optional<Tensor>&, const std::optional<Tensor>&,
                                                      bool);
using LstmBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const std::optional<Tensor>&, bool, bool);

struct GruFn : public torch::autograd::Function<GruFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gi, const Tensor& h0, const Tensor& w_hh,
                               const std::optional<Tensor>& b_hh,
                               const std::optional<Tensor>& lengths, bool save) {
    static const auto op = find_op<GruFwdSig>("gru_recurrence_forward");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [hs, gates] = op.call(gi, h0, w_hh, b_hh, lengths, save);
    ctx->saved_data["has_bias"] = b_hh.has_value() && b_hh->defined();
    if (save) ctx->save_for_backward({h0, w_hh, hs, gates, lengths.value_or(Tensor())});
    return {hs};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<GruBwdSig>("gru_recurrence_backward");
    const auto s = saved(ctx);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool grad_h0 = ctx->needs_input_grad(1);
    auto [dgi, dh0, dw, db] =
        op.call(or_zeros(grads[0], s[2]), s[0], s[1], s[2], s[3], opt(s[4]), has_bias, grad_h0);
    return {dgi, grad_h0 ? dh0 : Tensor(), dw, has_bias ? db : Tensor(), Tensor(), Tensor()};
  }
};

struct LstmFn : public torch::autograd::Function<LstmFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gi, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                               const std::optional<Tensor>& lengths, bool save) {
    static const auto op = find_op<LstmFwdSig>("lstm_recurrence_forward");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [hs, cs, gates] = op.call(gi, h0, c0, w_hh, b_hh, lengths, save);
    ctx->saved_data["has_bias"] = b_hh.has_value() && b_hh->defined();
    if (save) ctx->save_for_backward({h0, c0, w_hh, hs, cs, gates, lengths.value_or(Tensor())});
    return {hs, cs};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<LstmBwdSig>("lstm_recurrence_backward");
    const auto s = saved(ctx);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool grad_h0 = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    auto [dgi, dh0, dc0, dw, db] = op.call(or_zeros(grads[0], s[3]), or_zeros(grads[1], s[4]), s[0], s[1],
                                           s[2], s[3], s[4], s[5], opt(s[6]), has_bias, grad_h0);
    return {dgi, grad_h0 ? dh0 : Tensor(), grad_h0 ? dc0 : Tensor(), dw, has_bias ? db : Tensor(), Tensor(),
            Tensor()};
  }
};

// ------------------------------------------------------------------- packed

using GruPackedFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                   const std::optional<Tensor>&, const Tensor&, bool, bool);
using GruPackedBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const Tensor&, const Tensor&, const Tensor&,
                                                                   bool, bool, bool);
using LstmPackedFwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const std::optional<Tensor>&,
                                                            const Tensor&, bool, bool);
using LstmPackedBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, bool, bool, bool);

struct GruPackedFn : public torch::autograd::Function<GruPackedFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gi, const Tensor& h0, const Tensor& w_hh,
                               const std::optional<Tensor>& b_hh,
                               const Tensor& batch_sizes, bool reverse, bool save) {
    static const auto op = find_op<GruPackedFwdSig>("gru_packed_recurrence_forward");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [hs, gates] = op.call(gi, h0, w_hh, b_hh, batch_sizes, reverse, save);
    ctx->saved_data["has_bias"] = b_hh.has_value() && b_hh->defined();
    ctx->saved_data["reverse"] = reverse;
    if (save) ctx->save_for_backward({h0, w_hh, hs, gates, batch_sizes});
    return {hs};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<GruPackedBwdSig>("gru_packed_recurrence_backward");
    const auto s = saved(ctx);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool grad_h0 = ctx->needs_input_grad(1);
    auto [dgi, dh0, dw, db] = op.call(or_zeros(grads[0], s[2]), s[0], s[1], s[2], s[3], s[4],
                                      ctx->saved_data["reverse"].toBool(), has_bias, grad_h0);
    return {dgi, grad_h0 ? dh0 : Tensor(), dw, has_bias ? db : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct LstmPackedFn : public torch::autograd::Function<LstmPackedFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gi, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                               const Tensor& batch_sizes, bool reverse, bool save) {
    static const auto op = find_op<LstmPackedFwdSig>("lstm_packed_recurrence_forward");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [hs, cs, gates] = op.call(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse, save);
    ctx->saved_data["has_bias"] = b_hh.has_value() && b_hh->defined();
    ctx->saved_data["reverse"] = reverse;
    if (save) ctx->save_for_backward({h0, c0, w_hh, hs, cs, gates, batch_sizes});
    return {hs, cs};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<LstmPackedBwdSig>("lstm_packed_recurrence_backward");
    const auto s = saved(ctx);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool grad_h0 = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    auto [dgi, dh0, dc0, dw, db] =
        op.call(or_zeros(grads[0], s[3]), or_zeros(grads[1], s[4]), s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                ctx->saved_data["reverse"].toBool(), has_bias, grad_h0);
    return {dgi, grad_h0 ? dh0 : Tensor(), grad_h0 ? dc0 : Tensor(), dw, has_bias ? db : Tensor(), Tensor(),
            Tensor(), Tensor()};
  }
};

Tensor gru_recurrence(const Tensor& gi, const Tensor& h0, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                      const std::optional<Tensor>& lengths) {
  return GruFn::apply(gi, h0, w_hh, b_hh, lengths, wants_grad({&gi, &h0, &w_hh}, b_hh))[0];
}

std::tuple<Tensor, Tensor> lstm_recurrence(const Tensor& gi, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                                           const std::optional<Tensor>& b_hh, const std::optional<Tensor>& lengths) {
  auto out = LstmFn::apply(gi, h0, c0, w_hh, b_hh, lengths, wants_grad({&gi, &h0, &c0, &w_hh}, b_hh));
  return {out[0], out[1]};
}

Tensor gru_packed_recurrence(const Tensor& gi, const Tensor& h0, const Tensor& w_hh,
                             const std::optional<Tensor>& b_hh, const Tensor& batch_sizes, bool reverse) {
  return GruPackedFn::apply(gi, h0, w_hh, b_hh, batch_sizes, reverse, wants_grad({&gi, &h0, &w_hh}, b_hh))[0];
}

std::tuple<Tensor, Tensor> lstm_packed_recurrence(const Tensor& gi, const Tensor& h0, const Tensor& c0,
                                                  const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                                                  const Tensor& batch_sizes, bool reverse) {
  auto out = LstmPackedFn::apply(gi, h0, c0, w_hh, b_hh, batch_sizes, reverse,
                                  wants_grad({&gi, &h0, &c0, &w_hh}, b_hh));
  return {out[0], out[1]};
}

}  // namespace
}  // namespace fastseq

TORCH_LIBRARY_FRAGMENT(FASTSEQ_CPP_LIBRARY, m) {
  fastseq::define_autograd_ops(m);
}

TORCH_LIBRARY_IMPL(FASTSEQ_CPP_LIBRARY, CompositeImplicitAutograd, m) {
  m.impl("gru_recurrence", &fastseq::gru_recurrence);
  m.impl("lstm_recurrence", &fastseq::lstm_recurrence);
  m.impl("gru_packed_recurrence", &fastseq::gru_packed_recurrence);
  m.impl("lstm_packed_recurrence", &fastseq::lstm_packed_recurrence);
}
