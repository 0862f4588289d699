// Helpers shared by the CPU (ATen) attention op (attention.cpp) and the decoder
// GRU context cell (cell.cpp): vectorisable activations, an ISA dispatch for
// the float kernels, argument checks and dtype handling.
//
// Everything lives in fastseq::cpu_attn (and the macros carry a FASTSEQ_ATTN_
// prefix) so this header never collides with csrc/cpu/common.h, which the
// recurrence ops use, when all csrc/cpu/*.cpp are linked into one library.
// No CUDA header is included.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

// The torch.library namespace the ops are registered in. The tests build these
// sources on their own under another name, so that they never clash with the
// full fastseq_cpp library when both are loaded in one process.
#ifndef FASTSEQ_CPP_LIBRARY
#define FASTSEQ_CPP_LIBRARY fastseq_cpp
#endif

#if defined(__GNUC__)
#define FASTSEQ_ATTN_INLINE inline __attribute__((always_inline))
#define FASTSEQ_ATTN_RESTRICT __restrict__
#else
#define FASTSEQ_ATTN_INLINE inline
#define FASTSEQ_ATTN_RESTRICT
#endif

// x86-64 (GCC): the float kernels are compiled twice, for the baseline ISA and
// with AVX2+FMA, and picked at run time, so no -march flag is needed.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define FASTSEQ_ATTN_X86_DISPATCH 1
#define FASTSEQ_ATTN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTSEQ_ATTN_X86_DISPATCH 0
#define FASTSEQ_ATTN_TARGET_AVX2
#endif

// NAME(const ARGS<T>& p, int64_t begin, int64_t end) running NAME##_impl<T>:
// for float, the AVX2+FMA build when the CPU has it, else the baseline build.
// NAME##_impl and everything it calls must be FASTSEQ_ATTN_INLINE, so that it
// is compiled inside (hence for the ISA of) each wrapper.
#define FASTSEQ_ATTN_DISPATCHED(NAME, ARGS)                                              \
  template <typename T>                                                                  \
  void NAME##_base(const ARGS<T>& p, int64_t begin, int64_t end) {                       \
    NAME##_impl<T>(p, begin, end);                                                       \
  }                                                                                      \
  FASTSEQ_ATTN_TARGET_AVX2 void NAME##_avx2(const ARGS<float>& p, int64_t begin, int64_t end) { \
    NAME##_impl<float>(p, begin, end);                                                   \
  }                                                                                      \
  template <typename T>                                                                  \
  void NAME(const ARGS<T>& p, int64_t begin, int64_t end) {                              \
    if constexpr (std::is_same_v<T, float>) {                                            \
      if (FASTSEQ_ATTN_X86_DISPATCH && ::fastseq::cpu_attn::has_avx2_fma()) {            \
        NAME##_avx2(p, begin, end);                                                      \
        return;                                                                          \
      }                                                                                  \
    }                                                                                    \
    NAME##_base<T>(p, begin, end);                                                       \
  }

namespace fastseq {
namespace cpu_attn {

inline bool has_avx2_fma() {
#if FASTSEQ_ATTN_X86_DISPATCH
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// ----------------------------------------------------------------- activations
//
// float: branch-free polynomials (Cephes expf / tanhf, a few ulp) so that the
// loops over A or H vectorise without -ffast-math; double: libm, the
// reference's accuracy.

FASTSEQ_ATTN_INLINE float exp_f(float x) {
  // Clamp so that 2^n stays a normal float; NaN passes through (comparisons false).
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365447504f ? -87.3365447504f : x;
  // n = round(x / ln 2) with the 1.5 * 2^23 trick.
  const float magic = 12582912.0f;
  const float fn = (x * 1.44269504088896341f + magic) - magic;
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fn);
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

FASTSEQ_ATTN_INLINE float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

FASTSEQ_ATTN_INLINE float tanh_f(float x) {
  // Odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above.
  const float ax = x < 0.0f ? -x : x;
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float e = exp_f(2.0f * ax);
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}

FASTSEQ_ATTN_INLINE double sigmoid_f(double x) { return 1.0 / (1.0 + std::exp(-x)); }
FASTSEQ_ATTN_INLINE double tanh_f(double x) { return std::tanh(x); }

// Sum of x[0..n) with 8 independent partial sums (a plain `s += x[i]` loop does
// not vectorise without -fassociative-math). The order depends on n only.
template <typename T>
FASTSEQ_ATTN_INLINE T sum_lanes(const T* FASTSEQ_ATTN_RESTRICT x, int64_t n) {
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

// Half-precision inputs are computed in float32 (like the reference).
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

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
