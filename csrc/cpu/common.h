// Shared helpers for the fastseq CPU (ATen) kernels: vectorisable activations,
// argument checks, dtype handling and a per-step GEMM helper.
//
// No CUDA header is included anywhere under csrc/cpu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

namespace fastseq {
namespace cpu {

#if defined(__GNUC__)
#define FASTSEQ_INLINE inline __attribute__((always_inline))
#define FASTSEQ_RESTRICT __restrict__
#else
#define FASTSEQ_INLINE inline
#define FASTSEQ_RESTRICT
#endif

// x86-64 builds compile the pointwise kernels twice: once for the baseline ISA
// and once with AVX2+FMA (chosen at run time), so no -march flag is needed.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define FASTSEQ_X86_DISPATCH 1
#define FASTSEQ_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTSEQ_X86_DISPATCH 0
#define FASTSEQ_TARGET_AVX2
#endif

inline bool cpu_has_avx2_fma() {
#if FASTSEQ_X86_DISPATCH
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// ----------------------------------------------------------------- activations
//
// float: branch-free polynomial exp (Cephes expf, ~1 ulp) so the gate loops
// vectorise without -ffast-math; double: libm (the reference's accuracy).

FASTSEQ_INLINE float exp_f(float x_in) {
  // Clamp so that 2^n stays a normal float; NaN passes through (comparisons false).
  // Past the clamp the result is set to what expf gives (0 below, +inf above,
  // up to the denormal range), so sigmoid(-inf) is exactly 0 as in torch.
  float x = x_in > 88.3762626647949f ? 88.3762626647949f : x_in;
  x = x < -87.3365447504f ? -87.3365447504f : x;
  // n = round(x / ln 2) with the 1.5 * 2^23 trick (vectorises on SSE2 too).
  const float magic = 12582912.0f;
  float fn = (x * 1.44269504088896341f + magic) - magic;
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  int32_t n = static_cast<int32_t>(fn);
  int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float out = p * scale;
  out = x_in > 88.7228391117f ? std::numeric_limits<float>::infinity() : out;
  return x_in < -87.3365447504f ? 0.0f : out;
}

FASTSEQ_INLINE float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

FASTSEQ_INLINE float tanh_f(float x) {
  // Cephes tanhf: odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above.
  float ax = x < 0.0f ? -x : x;
  float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  float small = p * z * x + x;
  float e = exp_f(2.0f * ax);
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}

FASTSEQ_INLINE double sigmoid_f(double x) { return 1.0 / (1.0 + std::exp(-x)); }
FASTSEQ_INLINE double tanh_f(double x) { return std::tanh(x); }

// ------------------------------------------------------------------ arguments

// Half-precision inputs are computed in float32 (like the reference).
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastseq_cpp: ", name, ": expected a CPU tensor, got ", t.device());
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "fastseq_cpp: ", name, ": expected float32/float64/float16/bfloat16, got ", s);
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* name) {
  TORCH_CHECK(t.sizes() == want, "fastseq_cpp: ", name, ": expected shape ", want, ", got ", t.sizes());
}

// t in the compute dtype, contiguous (no copy when it already is).
inline at::Tensor in_cd(const at::Tensor& t, at::ScalarType cd) {
  return t.to(cd).contiguous();
}

// lengths as contiguous int64 on the CPU, or an undefined tensor.
inline at::Tensor lengths_i64(const std::optional<at::Tensor>& lengths, int64_t B) {
  if (!lengths.has_value() || !lengths->defined()) return at::Tensor();
  const auto& l = *lengths;
  TORCH_CHECK(l.dim() == 1 && l.size(0) == B, "fastseq_cpp: lengths: expected shape [", B, "], got ",
              l.sizes());
  TORCH_CHECK(l.scalar_type() == at::kLong || l.scalar_type() == at::kInt,
              "fastseq_cpp: lengths: expected an int32/int64 tensor, got ", l.scalar_type());
  return l.to(at::kCPU, at::kLong).contiguous();
}

// ---------------------------------------------------------------------- BLAS
//
// The per-step products on the fast path call the BLAS that ATen itself uses
// (MKL in the x86-64 wheels exports the Fortran sgemm_/dgemm_ symbols from
// libtorch_cpu). They are weak references: a torch build without them leaves
// them null, and the ops fall back to at::mm_out. FASTSEQ_CPP_GEMM=aten forces
// the fallback (tests use it to cover both paths).

}  // namespace cpu
}  // namespace fastseq

#if defined(__GNUC__) && defined(__linux__)
#define FASTSEQ_WEAK_BLAS 1
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));
}
#else
#define FASTSEQ_WEAK_BLAS 0
#endif

namespace fastseq {
namespace cpu {

// Inside our own parallel regions each thread's product must run on that
// thread alone. MKL does so by itself under OpenMP (it does not nest); this
// guard also makes sure of it when ATen's thread pool is not OpenMP.
class BlasOneThread {
 public:
  BlasOneThread() {
#if FASTSEQ_WEAK_BLAS
    if (&MKL_Set_Num_Threads_Local != nullptr) {
      old_ = MKL_Set_Num_Threads_Local(1);
      set_ = true;
    }
#endif
  }
  ~BlasOneThread() {
#if FASTSEQ_WEAK_BLAS
    if (set_) MKL_Set_Num_Threads_Local(old_);
#endif
  }
  BlasOneThread(const BlasOneThread&) = delete;
  BlasOneThread& operator=(const BlasOneThread&) = delete;

 private:
  int old_ = 0;
  bool set_ = false;
};

inline bool gemm_forced_aten() {
  const char* v = std::getenv("FASTSEQ_CPP_GEMM");
  return v != nullptr && std::strcmp(v, "aten") == 0;
}

template <typename T>
inline bool blas_available() {
#if FASTSEQ_WEAK_BLAS
  if constexpr (std::is_same_v<T, float>) return &sgemm_ != nullptr;
  if constexpr (std::is_same_v<T, double>) return &dgemm_ != nullptr;
#endif
  return false;
}

template <typename T>
inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                      const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
#if FASTSEQ_WEAK_BLAS
  const int m_ = static_cast<int>(m), n_ = static_cast<int>(n), k_ = static_cast<int>(k);
  const int lda_ = static_cast<int>(lda), ldb_ = static_cast<int>(ldb), ldc_ = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
  } else {
    dgemm_(&ta, &tb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
  }
#else
  TORCH_CHECK(false, "fastseq_cpp: no BLAS symbols in this build");
#endif
}

// Row-major C[M, N] = beta * C + A[M, K] @ W[N, K]^T   (W rows are output units).
template <typename T>
inline void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W, int64_t ldw, T beta,
                    T* C, int64_t ldc) {
  // Column-major view: C^T[N, M] = W[N, K] @ A^T[K, M].
  blas_gemm<T>('T', 'N', N, M, K, T(1), W, ldw, A, lda, beta, C, ldc);
}

// Row-major C[M, N] = beta * C + A[M, K] @ W[K, N].
template <typename T>
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W, int64_t ldw, T beta,
                    T* C, int64_t ldc) {
  // Column-major view: C^T[N, M] = W^T[N, K] @ A^T[K, M].
  blas_gemm<T>('N', 'N', N, M, K, T(1), W, ldw, A, lda, beta, C, ldc);
}

// Rows per at::parallel_for task for a pointwise pass touching `cols` elements
// per row: small passes stay on one thread (a fork/join costs a few us).
inline int64_t row_grain(int64_t cols) {
  constexpr int64_t kMinElemsPerTask = 8192;
  int64_t g = kMinElemsPerTask / (cols > 0 ? cols : 1);
  return g > 1 ? g : 1;
}

}  // namespace cpu
}  // namespace fastseq
