// Helpers shared by the CPU (ATen) attention op (attention.cpp) and the decoder
// GRU context cell (cell.cpp): an ISA dispatch for the float kernels, argument
// checks and dtype handling.
//
// The activations, the ISA macros and compute_dtype come from common.h (shared
// with the recurrence ops); this header adds the attention/cell helpers in
// fastseq::cpu_attn. (The sources also include gates.h, the gate formulas, and
// schemas.h, the library name FASTSEQ_CPP_LIBRARY and the op schemas.) No
// CUDA header is included.
#pragma once

#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

// NAME(const ARGS<T>& p, int64_t begin, int64_t end) running NAME##_impl<T>:
// for float, the AVX2+FMA build when the CPU has it, else the baseline build.
// NAME##_impl and everything it calls must be FASTSEQ_INLINE, so that it
// is compiled inside (hence for the ISA of) each wrapper.
#define FASTSEQ_ATTN_DISPATCHED(NAME, ARGS)                                              \
  template <typename T>                                                                  \
  void NAME##_base(const ARGS<T>& p, int64_t begin, int64_t end) {                       \
    NAME##_impl<T>(p, begin, end);                                                       \
  }                                                                                      \
  FASTSEQ_TARGET_AVX2 void NAME##_avx2(const ARGS<float>& p, int64_t begin, int64_t end) { \
    NAME##_impl<float>(p, begin, end);                                                   \
  }                                                                                      \
  template <typename T>                                                                  \
  void NAME(const ARGS<T>& p, int64_t begin, int64_t end) {                              \
    if constexpr (std::is_same_v<T, float>) {                                            \
      if (FASTSEQ_X86_DISPATCH && ::fastseq::cpu::cpu_has_avx2_fma()) {            \
        NAME##_avx2(p, begin, end);                                                      \
        return;                                                                          \
      }                                                                                  \
    }                                                                                    \
    NAME##_base<T>(p, begin, end);                                                       \
  }

namespace fastseq {
namespace cpu_attn {

using ::fastseq::cpu::compute_dtype;
using ::fastseq::cpu::tanh_f;

// Sum of x[0..n) with 8 independent partial sums (a plain `s += x[i]` loop does
// not vectorise without -fassociative-math). The order depends on n only.
template <typename T>
FASTSEQ_INLINE T sum_lanes(const T* FASTSEQ_RESTRICT x, int64_t n) {
  constexpr int L = 8;
  T acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) acc[l] += x[i + l];
  }
  T s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += x[i];
  return s;
}

// ------------------------------------------------------------------ arguments

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, ": expected a tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got ", t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ",
              name, ": expected float32/float64/float16/bfloat16, got ", s);
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, ": expected shape ", want, ", got ", t.sizes());
}

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// t in the compute dtype, contiguous (no copy when it already is).
inline at::Tensor in_cd(const at::Tensor& t, at::ScalarType cd) { return t.to(cd).contiguous(); }

// t in the compute dtype with a unit stride along its last dimension (row
// slices of a wider tensor are read in place through their row stride).
inline at::Tensor rows_cd(const at::Tensor& t, at::ScalarType cd) {
  at::Tensor x = t.to(cd);
  return (x.dim() == 2 && x.stride(1) == 1) ? x : x.contiguous();
}

// t cast to dtype (no copy when it already has it).
inline at::Tensor finish(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// Run f(begin, end) over [0, n): on this thread when the work (n * cost_per_item
// elementary steps) is too small to pay for a fork/join, else at::parallel_for.
template <typename F>
inline void parallel_items(int64_t n, int64_t cost_per_item, const F& f) {
  constexpr int64_t kMinWorkPerTask = 16384;
  if (n <= 0) return;
  const int64_t c = cost_per_item > 0 ? cost_per_item : 1;
  int64_t grain = kMinWorkPerTask / c;
  grain = grain > 1 ? grain : 1;
  if (n <= grain) {
    f(int64_t(0), n);
  } else {
    at::parallel_for(0, n, grain, f);
  }
}

}  // namespace cpu_attn
}  // namespace fastseq
