// A small-batch float product for the forward recurrences: row-major
// C[M, N] = A[M, K] @ W[N, K]^T with W in its own layout (rows are output
// units, K contiguous), so it needs no packing at all.
//
// Why: for M <= 32 rows MKL's sgemm repacks W on every call (about a quarter
// of a small-batch LSTM forward). Here each register tile is 3 rows of A x 4
// rows of W, dot products along K with 8-wide FMAs (12 accumulators, 7 loads
// per 12 FMAs: bound by the FMA units, not the loads), reduced horizontally
// once per tile. Columns are the outer loop: a group of 4 rows of W (4*K
// floats) is read once from L2/L3 per call and then reused from L1 by every
// row block of A (A itself stays in L1/L2).
//
// Only built for x86-64 with GCC (FASTSEQ_X86_DISPATCH); callers check
// cpu_has_avx2_fma() at run time and otherwise use the BLAS.
#pragma once

#include "common.h"

#if FASTSEQ_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fastseq {
namespace cpu {

#if FASTSEQ_X86_DISPATCH

namespace gemm_detail {

// Mask for the last K % 8 elements of a row (lanes < rem are loaded).
FASTSEQ_TARGET_AVX2 FASTSEQ_INLINE __m256i tail_mask(int64_t rem) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), lanes);
}

// Sum of each of 4 vectors: {sum(a), sum(b), sum(c), sum(d)}.
FASTSEQ_TARGET_AVX2 FASTSEQ_INLINE __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);   // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(c, d);   // c01 c23 d01 d23 | ...
  const __m256 s = _mm256_hadd_ps(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

FASTSEQ_TARGET_AVX2 FASTSEQ_INLINE float hsum1(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One R x C tile: C[r, c] = dot(A[r, :], W[c, :]) for r < R, c < C.
template <int R, int C>
FASTSEQ_TARGET_AVX2 FASTSEQ_INLINE void tile(int64_t K, const float* FASTSEQ_RESTRICT a, int64_t lda,
                                             const float* FASTSEQ_RESTRICT w, int64_t ldw,
                                             float* FASTSEQ_RESTRICT c, int64_t ldc) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < C; ++q) acc[r][q] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 av[R];
    for (int r = 0; r < R; ++r) av[r] = _mm256_loadu_ps(a + r * lda + k);
    for (int q = 0; q < C; ++q) {
      const __m256 wv = _mm256_loadu_ps(w + q * ldw + k);
      for (int r = 0; r < R; ++r) acc[r][q] = _mm256_fmadd_ps(av[r], wv, acc[r][q]);
    }
  }
  if (K8 < K) {
    const __m256i m = tail_mask(K - K8);
    __m256 av[R];
    for (int r = 0; r < R; ++r) av[r] = _mm256_maskload_ps(a + r * lda + K8, m);
    for (int q = 0; q < C; ++q) {
      const __m256 wv = _mm256_maskload_ps(w + q * ldw + K8, m);
      for (int r = 0; r < R; ++r) acc[r][q] = _mm256_fmadd_ps(av[r], wv, acc[r][q]);
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (C == 4) {
      _mm_storeu_ps(c + r * ldc, hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    } else {
      for (int q = 0; q < C; ++q) c[r * ldc + q] = hsum1(acc[r][q]);
    }
  }
}

// All row blocks (RB rows each, then the remainder) of A for one group of C rows of W.
template <int RB, int C>
FASTSEQ_TARGET_AVX2 FASTSEQ_INLINE void column_group(int64_t M, int64_t K, const float* a, int64_t lda,
                                                     const float* w, int64_t ldw, float* c, int64_t ldc) {
  int64_t m = 0;
  for (; m + RB <= M; m += RB) tile<RB, C>(K, a + m * lda, lda, w, ldw, c + m * ldc, ldc);
  switch (M - m) {
    case 3: tile<3, C>(K, a + m * lda, lda, w, ldw, c + m * ldc, ldc); break;
    case 2: tile<2, C>(K, a + m * lda, lda, w, ldw, c + m * ldc, ldc); break;
    case 1: tile<1, C>(K, a + m * lda, lda, w, ldw, c + m * ldc, ldc); break;
    default: break;
  }
}

// Tiles of RB rows x CB columns (RB * CB = 12), then the column remainder.
template <int RB, int CB>
FASTSEQ_TARGET_AVX2 FASTSEQ_INLINE void gemm_tiles(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                                                   const float* w, int64_t ldw, float* c, int64_t ldc) {
  int64_t n = 0;
  for (; n + CB <= N; n += CB) column_group<RB, CB>(M, K, a, lda, w + n * ldw, ldw, c + n, ldc);
  switch (N - n) {
    case 3: column_group<RB, 3>(M, K, a, lda, w + n * ldw, ldw, c + n, ldc); break;
    case 2: column_group<RB, 2>(M, K, a, lda, w + n * ldw, ldw, c + n, ldc); break;
    case 1: column_group<RB, 1>(M, K, a, lda, w + n * ldw, ldw, c + n, ldc); break;
    default: break;
  }
}

}  // namespace gemm_detail

// Row-major C[M, N] = A[M, K] @ W[N, K]^T (C is overwritten). Needs AVX2+FMA.
// Rows in blocks of 4 (x 3 columns) when M is 4 or 8 (measured: a few %
// faster there; from 16 rows on the 4 loads of A per 12 FMAs cost more than
// a ragged last block), else blocks of 3 (x 4 columns).
FASTSEQ_TARGET_AVX2 inline void sgemm_nt_avx2(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                                              const float* w, int64_t ldw, float* c, int64_t ldc) {
  using namespace gemm_detail;
  if ((M == 4 || M == 8)) {
    gemm_tiles<4, 3>(M, N, K, a, lda, w, ldw, c, ldc);
  } else {
    gemm_tiles<3, 4>(M, N, K, a, lda, w, ldw, c, ldc);
  }
}

#endif  // FASTSEQ_X86_DISPATCH

}  // namespace cpu
}  // namespace fastseq
