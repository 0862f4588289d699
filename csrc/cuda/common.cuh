// Device-side helpers shared by the fastseq CUDA kernels: storage <-> compute
// conversions, activations, warp / block reductions and the dtype dispatch.
//
// Only CUDA toolkit and standard headers: no ATen / c10 / torch header here,
// so the .cu files build with the CPU-only torch wheel's headers absent. The
// conversions are explicit intrinsics, so the kernels also build under
// torch.utils.cpp_extension's -D__CUDA_NO_HALF_CONVERSIONS__ (and friends).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

// FASTSEQ_LAUNCH(kernel, grid, block, smem_bytes, stream, args...) launches
// `kernel`; FASTSEQ_DYNAMIC_SMEM(name) declares the dynamic shared memory as
// `unsigned char name[]` (128-byte aligned: the wmma fragment pointers into it must be
// 32-byte aligned, and the persistent kernels lay their rows out from it).
//
// FASTSEQ_CUDA_HOST_EMULATION (tests only, never set by the extension build):
// the sources are compiled by the host compiler and every launch runs the
// kernel on CPU threads (emu/host_emulation.h), so that
// tests/test_cuda_compile.py can check the kernels' arithmetic against
// fastseq/ops/<op>/naive.py on a machine without a GPU.
#if defined(FASTSEQ_CUDA_HOST_EMULATION) && !defined(__CUDACC__)
#include "emu/host_emulation.h"
#define FASTSEQ_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fastseq_emu::launch((grid), (block), (smem), kernel, __VA_ARGS__)
#define FASTSEQ_DYNAMIC_SMEM(name) unsigned char* name = ::fastseq_emu::dynamic_smem()
#else
#define FASTSEQ_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define FASTSEQ_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace fastseq {
namespace cuda {
namespace detail {

#define FASTSEQ_DEVICE __device__ __forceinline__

// Compute type of a storage type: float for every storage dtype but double.
template <typename S>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename S>
using acc_t = typename Acc<S>::type;

// ----------------------------------------------------------- conversions

FASTSEQ_DEVICE float to_acc(float x) { return x; }
FASTSEQ_DEVICE double to_acc(double x) { return x; }
FASTSEQ_DEVICE float to_acc(__half x) { return __half2float(x); }
FASTSEQ_DEVICE float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename S>
FASTSEQ_DEVICE S from_acc(acc_t<S> x);
template <>
FASTSEQ_DEVICE float from_acc<float>(float x) {
  return x;
}
template <>
FASTSEQ_DEVICE double from_acc<double>(double x) {
  return x;
}
template <>
FASTSEQ_DEVICE __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
FASTSEQ_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Load one element and convert it to the compute type.
template <typename S>
FASTSEQ_DEVICE acc_t<S> ld(const S* p) {
  return to_acc(*p);
}

// ----------------------------------------------------------- activations
//
// Full-precision libdevice functions (no fast-math intrinsics): the reference
// is torch.sigmoid / torch.tanh.

FASTSEQ_DEVICE float sigmoid_(float x) { return 1.0f / (1.0f + expf(-x)); }
FASTSEQ_DEVICE double sigmoid_(double x) { return 1.0 / (1.0 + exp(-x)); }
FASTSEQ_DEVICE float tanh_(float x) { return tanhf(x); }
FASTSEQ_DEVICE double tanh_(double x) { return tanh(x); }
FASTSEQ_DEVICE float exp_(float x) { return expf(x); }
FASTSEQ_DEVICE double exp_(double x) { return exp(x); }

template <typename C>
FASTSEQ_DEVICE C neg_inf() {
  return static_cast<C>(-INFINITY);
}

// ------------------------------------------------------------ reductions

constexpr int kWarp = 32;

template <typename C>
FASTSEQ_DEVICE C warp_sum(C x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// max that propagates NaN, like torch.max (the softmax of a NaN row is NaN).
template <typename C>
FASTSEQ_DEVICE C nan_max(C a, C b) {
  return (a != a || a > b) ? a : b;
}

template <typename C>
FASTSEQ_DEVICE C warp_max(C x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// Block-wide sum / max; every thread gets the result. `red` holds >= 32
// elements of shared memory; blockDim.x is a multiple of 32. Contains
// __syncthreads(): every thread of the block must call it.
template <typename C>
FASTSEQ_DEVICE C block_sum(C x, C* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  x = warp_sum(x);
  __syncthreads();  // `red` may still be read by a previous reduction
  if (lane == 0) red[warp] = x;
  __syncthreads();
  x = lane < nwarps ? red[lane] : C(0);
  return warp_sum(x);
}

template <typename C>
FASTSEQ_DEVICE C block_max(C x, C* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) red[warp] = x;
  __syncthreads();
  x = lane < nwarps ? red[lane] : neg_inf<C>();
  return warp_max(x);
}

// ------------------------------------------------------------- launching

constexpr int kPointwiseThreads = 256;

inline unsigned int blocks_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  const int64_t cap = 65535LL * 32;  // grid-stride loops cover the rest
  return static_cast<unsigned int>(b < cap ? b : cap);
}

#if defined(FASTSEQ_CUDA_HOST_EMULATION) && !defined(__CUDACC__)
inline cudaError_t launch_status() { return cudaSuccess; }
#else
inline cudaError_t launch_status() { return cudaGetLastError(); }
#endif

}  // namespace detail

// `return FN<S>(args...);` for the storage type S named by `dtype` (a DType);
// an unknown tag returns cudaErrorInvalidValue.
#define FASTSEQ_DISPATCH_DTYPE(dtype, FN, ...)                 \
  do {                                                         \
    switch (dtype) {                                           \
      case ::fastseq::cuda::DType::Float32:                    \
        return FN<float>(__VA_ARGS__);                         \
      case ::fastseq::cuda::DType::Float64:                    \
        return FN<double>(__VA_ARGS__);                        \
      case ::fastseq::cuda::DType::Float16:                    \
        return FN<__half>(__VA_ARGS__);                        \
      case ::fastseq::cuda::DType::BFloat16:                   \
        return FN<__nv_bfloat16>(__VA_ARGS__);                 \
    }                                                          \
    return cudaErrorInvalidValue;                              \
  } while (0)

}  // namespace cuda
}  // namespace fastseq
