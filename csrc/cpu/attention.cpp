// Fused additive (Bahdanau) attention on the CPU (ATen), with the exact
// semantics of fastseq/ops/attention/naive.py (additive_attention_forward /
// additive_attention_backward):
//
//     energy[b, t, j] = v^T tanh(q[b, t] + K[b, j])
//     weights[b, t]   = softmax_j(energy[b, t, j])   over the valid positions j
//     context[b, t]   = sum_j weights[b, t, j] V[b, j]
//
// Forward: at::parallel_for over the (b, t) query rows. Per row the scores are
// one pass over the valid source positions, each a vectorised loop over A
// (tanh, times v, into a scratch row, then an 8-lane sum), written straight
// into the weights row; then the softmax in place and context = weights @ V as
// a vectorised axpy over D per valid position. The [B, T, S, A] tensor of tanh
// arguments is never formed (the reference materialises it).
//
// Backward: dw = grad_context V^T and grad_values = weights^T grad_context are
// two ATen bmm (as reference.attention_score_grad); one pointwise pass turns dw
// into the score gradient de = w * (dw + grad_weights - sum_j w_j dw_j); the
// energy part is one fused pass over (b, source chunk) work items that
// recomputes u = tanh(q_t + K_j) and accumulates grad_q, grad_K and grad_v.
// Each item owns its grad_K rows and writes its own partial grad_q and grad_v
// row, which are summed afterwards in a fixed order: no atomics, and the result
// does not depend on the number of threads.
//
// float64 stays float64; float16/bfloat16 inputs are computed in float32 and
// the results cast back (like the reference).
#include "attention_common.h"
#include "schemas.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastseq {
namespace cpu_attn {
namespace {

using at::Tensor;

constexpr const char* kFwd = "fastseq_cpp::additive_attention_forward";
constexpr const char* kBwd = "fastseq_cpp::additive_attention_backward";

// ==================================================================== forward

template <typename T>
struct AttnFwd {
  const T* q;              // [B, Tq, A]
  const T* k;              // [B, S, A]
  const T* v;              // [B, S, D]
  const T* e;              // [A]
  const bool* mask;        // [B, S] or nullptr
  const int64_t* lengths;  // [B] or nullptr (ignored when mask is given)
  const T* ob;             // [B, Tq, D] strides (sob_b, sob_t, 1), or nullptr: ctx = tanh(ob + context)
  int64_t sob_b, sob_t;
  T* ctx;                  // [B, Tq, D]
  T* w;                    // [B, Tq, S]
  int64_t Tq, S, A, D;
};

// v^T tanh(q + k) over A; buf: A elements of scratch.
template <typename T>
FASTSEQ_INLINE T energy_score(const T* FASTSEQ_RESTRICT q, const T* FASTSEQ_RESTRICT k,
                                   const T* FASTSEQ_RESTRICT e, T* FASTSEQ_RESTRICT buf,
                                   int64_t A) {
  for (int64_t a = 0; a < A; ++a) buf[a] = tanh_f(q[a] + k[a]) * e[a];
  return sum_lanes(buf, A);
}

template <typename T>
FASTSEQ_INLINE void axpy(T alpha, const T* FASTSEQ_RESTRICT x, T* FASTSEQ_RESTRICT y,
                              int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T>
FASTSEQ_INLINE void attn_fwd_rows_impl(const AttnFwd<T>& p, int64_t i0, int64_t i1) {
  const int64_t S = p.S, A = p.A, D = p.D;
  const T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> scratch(static_cast<size_t>(A > 0 ? A : 1));
  T* buf = scratch.data();
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / p.Tq;
    const T* q = p.q + i * A;
    const T* kb = p.k + b * S * A;
    const T* vb = p.v + b * S * D;
    const bool* mrow = p.mask != nullptr ? p.mask + b * S : nullptr;
    int64_t limit = S;
    if (p.lengths != nullptr) limit = std::min<int64_t>(std::max<int64_t>(p.lengths[b], 0), S);
    T* w = p.w + i * S;
    T* c = p.ctx + i * D;

    // Scores of the valid positions (-inf elsewhere) and their maximum.
    T m = -inf;
    int64_t n_valid = 0;
    for (int64_t j = 0; j < S; ++j) {
      if (j >= limit || (mrow != nullptr && !mrow[j])) {
        w[j] = -inf;
        continue;
      }
      const T s = energy_score(q, kb + j * A, p.e, buf, A);
      w[j] = s;
      m = s > m ? s : m;
      ++n_valid;
    }
    for (int64_t d = 0; d < D; ++d) c[d] = T(0);
    if (S == 0) continue;  // softmax over nothing: empty weights, zero context
    if (n_valid == 0) {
      // The reference's softmax of an all -inf row: NaN weights and context.
      for (int64_t j = 0; j < S; ++j) w[j] = nan;
      for (int64_t d = 0; d < D; ++d) c[d] = nan;
      continue;
    }
    // Softmax in place (exp(-inf - m) = 0 at the invalid positions).
    T l = T(0);
    for (int64_t j = 0; j < S; ++j) {
      const T x = std::exp(w[j] - m);
      w[j] = x;
      l += x;
    }
    const T inv = T(1) / l;
    for (int64_t j = 0; j < S; ++j) w[j] *= inv;
    // context = weights @ V (the zero weights of invalid positions skipped).
    for (int64_t j = 0; j < S; ++j) {
      const T wj = w[j];
      if (wj != T(0)) axpy(wj, vb + j * D, c, D);
    }
    if (p.ob != nullptr) {  // the attention vector: tanh(out_bias + context)
      const T* ob = p.ob + b * p.sob_b + (i - b * p.Tq) * p.sob_t;
      for (int64_t d = 0; d < D; ++d) c[d] = tanh_f(ob[d] + c[d]);
    }
  }
}

// ============================================================ backward kernels

// de = w * (dw - sum_j w_j dw_j) with dw = grad_context V^T (+ grad_weights), in
// place over the rows [i0, i1) of the [B * Tq, S] buffer holding dw.
template <typename T>
struct ScoreGrad {
  T* dw;         // [B * Tq, S] in: grad_context V^T; out: de
  const T* gw;   // [B * Tq, S] or nullptr
  const T* w;    // [B * Tq, S]
  int64_t S;
};

template <typename T>
FASTSEQ_INLINE void score_grad_rows_impl(const ScoreGrad<T>& p, int64_t i0, int64_t i1) {
  const int64_t S = p.S;
  for (int64_t i = i0; i < i1; ++i) {
    T* FASTSEQ_RESTRICT x = p.dw + i * S;
    const T* FASTSEQ_RESTRICT w = p.w + i * S;
    if (p.gw != nullptr) {
      const T* FASTSEQ_RESTRICT g = p.gw + i * S;
      for (int64_t j = 0; j < S; ++j) x[j] += g[j];
    }
    T s = T(0);
    for (int64_t j = 0; j < S; ++j) s += w[j] * x[j];
    for (int64_t j = 0; j < S; ++j) x[j] = w[j] * (x[j] - s);
  }
}

// The energy part: work item (b, c) covers source positions [c * chunk,
// (c + 1) * chunk) of row b and all its queries.
template <typename T>
struct EnergyBwd {
  const T* q;   // [B, Tq, A]
  const T* k;   // [B, S, A]
  const T* e;   // [A]
  const T* de;  // [B, Tq, S] score gradient
  T* dk;        // [B, S, A] out (rows owned by the item)
  T* dq;        // [n_chunks, B, Tq, A] out: partial grad_q per chunk
  T* dv;        // [B * n_chunks, A] out: partial grad of v per item
  int64_t B, Tq, S, A, chunk, n_chunks;
};

template <typename T>
FASTSEQ_INLINE void energy_bwd_pair(const T* FASTSEQ_RESTRICT q, const T* FASTSEQ_RESTRICT k,
                                         const T* FASTSEQ_RESTRICT e, T d, T* FASTSEQ_RESTRICT dq,
                                         T* FASTSEQ_RESTRICT dk, T* FASTSEQ_RESTRICT dv,
                                         int64_t A) {
  for (int64_t a = 0; a < A; ++a) {
    const T u = tanh_f(q[a] + k[a]);
    const T g = d * (T(1) - u * u) * e[a];
    dq[a] += g;
    dk[a] += g;
    dv[a] += d * u;
  }
}

template <typename T>
FASTSEQ_INLINE void energy_bwd_items_impl(const EnergyBwd<T>& p, int64_t i0, int64_t i1) {
  const int64_t Tq = p.Tq, S = p.S, A = p.A;
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t b = item / p.n_chunks, c = item % p.n_chunks;
    const int64_t j0 = c * p.chunk, j1 = std::min(S, j0 + p.chunk);
    T* dq = p.dq + (c * p.B + b) * Tq * A;
    T* dv = p.dv + item * A;
    std::fill(dq, dq + Tq * A, T(0));
    std::fill(dv, dv + A, T(0));
    const T* qb = p.q + b * Tq * A;
    const T* deb = p.de + b * Tq * S;
    for (int64_t j = j0; j < j1; ++j) {
      const T* kj = p.k + (b * S + j) * A;
      T* dk = p.dk + (b * S + j) * A;
      std::fill(dk, dk + A, T(0));
      for (int64_t t = 0; t < Tq; ++t) {
        const T d = deb[t * S + j];
        if (d == T(0)) continue;  // invalid positions (weight 0) add nothing
        energy_bwd_pair(qb + t * A, kj, p.e, d, dq + t * A, dk, dv, A);
      }
    }
  }
}

// out[m] = sum_r part[r * M + m] for r = 0..n-1 in order, over m in [m0, m1).
template <typename T>
struct RowSum {
  const T* part;
  T* out;
  int64_t n, M;
};

template <typename T>
FASTSEQ_INLINE void row_sum_impl(const RowSum<T>& p, int64_t m0, int64_t m1) {
  T* FASTSEQ_RESTRICT out = p.out;
  const T* FASTSEQ_RESTRICT first = p.part;
  for (int64_t m = m0; m < m1; ++m) out[m] = first[m];
  for (int64_t r = 1; r < p.n; ++r) {
    const T* FASTSEQ_RESTRICT x = p.part + r * p.M;
    for (int64_t m = m0; m < m1; ++m) out[m] += x[m];
  }
}

FASTSEQ_ATTN_DISPATCHED(attn_fwd_rows, AttnFwd)
FASTSEQ_ATTN_DISPATCHED(score_grad_rows, ScoreGrad)
FASTSEQ_ATTN_DISPATCHED(energy_bwd_items, EnergyBwd)
FASTSEQ_ATTN_DISPATCHED(row_sum, RowSum)

// ======================================================================== ops

struct Dims {
  int64_t B, Tq, S, A, D;
};

Dims check_inputs(const char* op, const Tensor& query, const Tensor& proj_keys, const Tensor& values,
                  const Tensor& energy) {
  check_float(query, op, "query");
  check_float(proj_keys, op, "proj_keys");
  check_float(values, op, "values");
  check_float(energy, op, "energy");
  TORCH_CHECK(query.dim() == 3, op, ": query: expected [B, T, A], got shape ", query.sizes());
  TORCH_CHECK(proj_keys.dim() == 3, op, ": proj_keys: expected [B, S, A], got shape ", proj_keys.sizes());
  TORCH_CHECK(values.dim() == 3, op, ": values: expected [B, S, D], got shape ", values.sizes());
  const int64_t B = query.size(0), Tq = query.size(1), A = query.size(2);
  const int64_t S = proj_keys.size(1), D = values.size(2);
  check_shape(proj_keys, {B, S, A}, op, "proj_keys");
  check_shape(values, {B, S, D}, op, "values");
  check_shape(energy, {A}, op, "energy");
  return {B, Tq, S, A, D};
}

std::tuple<Tensor, Tensor> additive_attention_forward(const Tensor& query, const Tensor& proj_keys,
                                                      const Tensor& values, const Tensor& energy,
                                                      const std::optional<Tensor>& mask,
                                                      const std::optional<Tensor>& lengths,
                                                      const std::optional<Tensor>& out_bias) {
  const Dims d = check_inputs(kFwd, query, proj_keys, values, energy);
  const int64_t B = d.B, Tq = d.Tq, S = d.S, A = d.A, D = d.D;
  Tensor m, lens;
  if (given(mask)) {  // the reference uses the mask when both are given
    TORCH_CHECK(mask->scalar_type() == at::kBool, kFwd, ": mask: expected a bool tensor, got ",
                mask->scalar_type());
    check_shape(*mask, {B, S}, kFwd, "mask");
    m = mask->to(at::kCPU).contiguous();
  } else if (given(lengths)) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong || lengths->scalar_type() == at::kInt, kFwd,
                ": lengths: expected an int32/int64 tensor, got ", lengths->scalar_type());
    check_shape(*lengths, {B}, kFwd, "lengths");
    lens = lengths->to(at::kCPU, at::kLong).contiguous();
  }
  const auto cd = compute_dtype(values.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor q = in_cd(query, cd), k = in_cd(proj_keys, cd), v = in_cd(values, cd), e = in_cd(energy, cd);
  Tensor ob;  // read in place through its (b, t) strides when its last dimension is unit-stride
  if (given(out_bias)) {
    check_float(*out_bias, kFwd, "out_bias");
    check_shape(*out_bias, {B, Tq, D}, kFwd, "out_bias");
    ob = out_bias->to(at::kCPU, cd);
    if (ob.stride(2) != 1) ob = ob.contiguous();
  }
  Tensor ctx = at::empty({B, Tq, D}, opt);
  Tensor w = at::empty({B, Tq, S}, opt);

  AT_DISPATCH_FLOATING_TYPES(cd, kFwd, [&] {
    AttnFwd<scalar_t> p;
    p.q = q.data_ptr<scalar_t>();
    p.k = k.data_ptr<scalar_t>();
    p.v = v.data_ptr<scalar_t>();
    p.e = e.data_ptr<scalar_t>();
    p.mask = m.defined() ? m.data_ptr<bool>() : nullptr;
    p.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
    p.ob = ob.defined() ? ob.data_ptr<scalar_t>() : nullptr;
    p.sob_b = ob.defined() ? ob.stride(0) : 0;
    p.sob_t = ob.defined() ? ob.stride(1) : 0;
    p.ctx = ctx.data_ptr<scalar_t>();
    p.w = w.data_ptr<scalar_t>();
    p.Tq = Tq;
    p.S = S;
    p.A = A;
    p.D = D;
    // ~ 16 flops per tanh element, 1 per context element.
    parallel_items(B * Tq, S * (16 * A + D) + D + 1,
                   [&](int64_t i0, int64_t i1) { attn_fwd_rows(p, i0, i1); });
  });
  const auto out_dt = values.scalar_type();
  return {finish(ctx, out_dt), finish(w, out_dt)};
}

// Source positions per backward work item: the whole row when there are enough
// batch rows to keep the threads busy, else chunks of at least 8 positions so
// that there are about 32 items. Depends on the shapes only (not on the thread
// count), so the summation order, hence the result, is fixed.
int64_t source_chunk(int64_t B, int64_t S) {
  constexpr int64_t kTargetItems = 32, kMinChunk = 8;
  if (S <= kMinChunk || B >= kTargetItems) return std::max<int64_t>(S, 1);
  const int64_t per_row = (kTargetItems + B - 1) / B;
  const int64_t chunk = (S + per_row - 1) / per_row;
  return std::max(chunk, kMinChunk);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_backward(
    const Tensor& grad_context, const std::optional<Tensor>& grad_weights, const Tensor& query,
    const Tensor& proj_keys, const Tensor& values, const Tensor& energy, const Tensor& weights) {
  const Dims d = check_inputs(kBwd, query, proj_keys, values, energy);
  const int64_t B = d.B, Tq = d.Tq, S = d.S, A = d.A, D = d.D;
  check_float(grad_context, kBwd, "grad_context");
  check_shape(grad_context, {B, Tq, D}, kBwd, "grad_context");
  check_float(weights, kBwd, "weights");
  check_shape(weights, {B, Tq, S}, kBwd, "weights");
  const bool has_gw = given(grad_weights);
  if (has_gw) {
    check_float(*grad_weights, kBwd, "grad_weights");
    check_shape(*grad_weights, {B, Tq, S}, kBwd, "grad_weights");
  }
  const auto cd = compute_dtype(values.scalar_type());
  const auto opt = at::TensorOptions().dtype(cd);
  const Tensor w = in_cd(weights, cd), dc = in_cd(grad_context, cd), v = in_cd(values, cd);
  const Tensor gw = has_gw ? in_cd(*grad_weights, cd) : Tensor();

  // Softmax and weighted sum (ATen products, as reference.attention_score_grad).
  Tensor de = at::bmm(dc, v.transpose(1, 2)).contiguous();  // dw, then de in place
  Tensor dvalues = at::bmm(w.transpose(1, 2), dc);

  Tensor dq = at::empty({B, Tq, A}, opt);
  Tensor dk = at::empty({B, S, A}, opt);
  Tensor dvec = at::empty({A}, opt);
  if (B * Tq == 0 || S == 0 || A == 0) {
    dq.zero_();
    dk.zero_();
    dvec.zero_();
  } else {
    const Tensor q = in_cd(query, cd), k = in_cd(proj_keys, cd), e = in_cd(energy, cd);
    const int64_t chunk = source_chunk(B, S);
    const int64_t n_chunks = (S + chunk - 1) / chunk;
    Tensor dq_part = n_chunks == 1 ? dq : at::empty({n_chunks, B, Tq, A}, opt);
    Tensor dv_part = at::empty({B * n_chunks, A}, opt);

    AT_DISPATCH_FLOATING_TYPES(cd, kBwd, [&] {
      ScoreGrad<scalar_t> sg;
      sg.dw = de.data_ptr<scalar_t>();
      sg.gw = has_gw ? gw.data_ptr<scalar_t>() : nullptr;
      sg.w = w.data_ptr<scalar_t>();
      sg.S = S;
      parallel_items(B * Tq, 4 * S, [&](int64_t i0, int64_t i1) { score_grad_rows(sg, i0, i1); });

      EnergyBwd<scalar_t> p;
      p.q = q.data_ptr<scalar_t>();
      p.k = k.data_ptr<scalar_t>();
      p.e = e.data_ptr<scalar_t>();
      p.de = de.data_ptr<scalar_t>();
      p.dk = dk.data_ptr<scalar_t>();
      p.dq = dq_part.data_ptr<scalar_t>();
      p.dv = dv_part.data_ptr<scalar_t>();
      p.B = B;
      p.Tq = Tq;
      p.S = S;
      p.A = A;
      p.chunk = chunk;
      p.n_chunks = n_chunks;
      parallel_items(B * n_chunks, 20 * chunk * Tq * A,
                     [&](int64_t i0, int64_t i1) { energy_bwd_items(p, i0, i1); });

      if (n_chunks > 1) {
        RowSum<scalar_t> rs{dq_part.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), n_chunks, B * Tq * A};
        parallel_items(B * Tq * A, n_chunks, [&](int64_t m0, int64_t m1) { row_sum(rs, m0, m1); });
      }
      RowSum<scalar_t> rv{dv_part.data_ptr<scalar_t>(), dvec.data_ptr<scalar_t>(), B * n_chunks, A};
      parallel_items(A, B * n_chunks, [&](int64_t m0, int64_t m1) { row_sum(rv, m0, m1); });
    });
  }
  return {finish(dq, query.scalar_type()), finish(dk, proj_keys.scalar_type()),
          finish(dvalues, values.scalar_type()), finish(dvec, energy.scalar_type())};
}

}  // namespace
}  // namespace cpu_attn
}  // namespace fastseq

TORCH_LIBRARY_FRAGMENT(FASTSEQ_CPP_LIBRARY, m) {
  fastseq::define_attention_ops(m);
}

TORCH_LIBRARY_IMPL(FASTSEQ_CPP_LIBRARY, CPU, m) {
  m.impl("additive_attention_forward", &fastseq::cpu_attn::additive_attention_forward);
  m.impl("additive_attention_backward", &fastseq::cpu_attn::additive_attention_backward);
}
