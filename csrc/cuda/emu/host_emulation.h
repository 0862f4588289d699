// TEST ONLY: runs the fastseq CUDA kernels on CPU threads.
//
// Included by ../common.cuh when FASTSEQ_CUDA_HOST_EMULATION is defined and
// the compiler is not nvcc; tests/test_cuda_compile.py builds the kernels and
// bindings.cpp that way to check their arithmetic and the ATen glue against
// fastseq/ops/<op>/naive.py on a machine without a GPU. The extension build
// never defines the macro, and nothing here is compiled into it.
//
// Model: the blocks of a launch run one after the other; the threads of a
// block run concurrently as std::threads (blockDim.x of them), so
// __syncthreads() is a block barrier and __shfl_xor_sync an exchange through a
// per-warp barrier (all 32 lanes of a warp must take part, as on the GPU with
// a full mask). __shared__ variables become function-local statics: shared by
// the threads of a block and, as blocks do not overlap, private to it in
// effect. Only what the fastseq kernels use is provided (1-D grids and
// blocks, blockDim.x a multiple of 32 when shuffles are used). It says
// nothing about timing, occupancy, register use or memory coalescing, and it
// does not detect races that a real GPU would expose.
#pragma once

#if defined(__CUDACC__)
#error "host_emulation.h is for host compilers only"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace fastseq_emu {

// A reusable thread barrier. Not std::barrier: that is C++20, and torch's
// extension builder compiles as C++17 before torch 2.13 (e.g. 2.11).
class Barrier {
 public:
  explicit Barrier(std::ptrdiff_t count) : count_(count) {}

  // Returns once all count threads have arrived; what each wrote before is visible
  // to all after (the mutex orders it).
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::size_t phase = phase_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++phase_;
      all_arrived_.notify_all();
    } else {
      all_arrived_.wait(lock, [&] { return phase_ != phase; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  const std::ptrdiff_t count_;
  std::ptrdiff_t arrived_ = 0;
  std::size_t phase_ = 0;
};

struct Dim {
  unsigned int x = 0, y = 1, z = 1;
};

struct Warp {
  explicit Warp(std::ptrdiff_t lanes) : bar(lanes) {}
  Barrier bar;
  alignas(16) unsigned char slots[32][16];
};

struct Block {
  explicit Block(unsigned int threads) : bar(threads) {
    for (unsigned int w = 0; w < (threads + 31) / 32; ++w) {
      const unsigned int lanes = threads - 32 * w < 32 ? threads - 32 * w : 32;
      warps.emplace_back(std::make_unique<Warp>(lanes));
    }
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Dim t_threadIdx, t_blockIdx, t_blockDim, t_gridDim;
inline thread_local Block* t_block = nullptr;
inline unsigned char* g_dynamic_smem = nullptr;

inline unsigned char* dynamic_smem() { return g_dynamic_smem; }

inline void syncthreads() { t_block->bar.arrive_and_wait(); }

template <typename T>
T shfl_xor(T x, int off) {
  static_assert(sizeof(T) <= 16, "shfl_xor: type too large");
  Warp& w = *t_block->warps[t_threadIdx.x / 32];
  const unsigned int lane = t_threadIdx.x % 32;
  std::memcpy(w.slots[lane], &x, sizeof(T));
  w.bar.arrive_and_wait();
  T y;
  std::memcpy(&y, w.slots[lane ^ static_cast<unsigned int>(off)], sizeof(T));
  w.bar.arrive_and_wait();  // no lane overwrites its slot before all have read
  return y;
}

template <typename... P, typename... A>
void launch(unsigned int grid, int block, size_t smem_bytes, void (*kernel)(P...), A&&... args) {
  if (grid == 0 || block <= 0) return;
  std::vector<std::max_align_t> smem((smem_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t) + 1);
  g_dynamic_smem = reinterpret_cast<unsigned char*>(smem.data());
  const unsigned int nthreads = static_cast<unsigned int>(block);
  for (unsigned int b = 0; b < grid; ++b) {
    Block blk(nthreads);
    std::vector<std::thread> threads;
    threads.reserve(nthreads);
    for (unsigned int t = 0; t < nthreads; ++t) {
      threads.emplace_back([&, t, b]() {
        t_threadIdx.x = t;
        t_blockIdx.x = b;
        t_blockDim.x = nthreads;
        t_gridDim.x = grid;
        t_block = &blk;
        kernel(args...);
      });
    }
    for (auto& th : threads) th.join();
  }
  g_dynamic_smem = nullptr;
}

}  // namespace fastseq_emu

// CUDA built-ins the kernels use.
#define threadIdx (::fastseq_emu::t_threadIdx)
#define blockIdx (::fastseq_emu::t_blockIdx)
#define blockDim (::fastseq_emu::t_blockDim)
#define gridDim (::fastseq_emu::t_gridDim)
#define __syncthreads() ::fastseq_emu::syncthreads()
#define __shfl_xor_sync(mask, x, off) ::fastseq_emu::shfl_xor((x), (off))
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
