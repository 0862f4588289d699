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
//
// Cooperative launches (launch_cooperative, the stand-in of
// cudaLaunchCooperativeKernel): ALL blocks run at once, every thread of every
// block a std::thread (gridDim.x * blockDim.x of them), each block with its
// own block barrier, warps and dynamic shared memory; grid_sync() (the
// stand-in of cooperative_groups::this_grid().sync()) is a real barrier of all
// gridDim.x * blockDim.x threads, and every completed grid barrier adds one
// to grid_sync_count(). So a kernel that reads, after a grid barrier, what
// other blocks wrote before it sees their writes, and one that omits the
// barrier races, as on the GPU. Kernels launched this way must keep their
// shared memory in the dynamic allocation (FASTSEQ_DYNAMIC_SMEM): a static
// __shared__ variable (a function-local static here) would be shared by the
// concurrently running blocks.
//
// Thread-block clusters (launch_cooperative_cluster, the stand-in of
// cudaLaunchKernelEx with a cluster dimension and the cooperative attribute):
// the cooperative launch above, its blocks grouped in clusters of `cluster`
// consecutive blocks. cluster_rank() is the block's rank in its cluster;
// cluster_sync() (cooperative_groups::this_cluster().sync()) is a real barrier
// of the cluster's threads, and every completed one adds one to
// cluster_sync_count() (once per cluster); map_shared_rank(p, r)
// (this_cluster().map_shared_rank) maps a pointer into the caller's dynamic
// shared memory to the same offset in the dynamic shared memory of the
// cluster's block of rank r (distributed shared memory), and aborts on a
// pointer outside it.
//
// FASTSEQ_CUDA_EMU_GRID_SYNC=off (read at each cooperative launch; tests
// only): the blocks of a cooperative launch run one after the other and
// grid_sync() and cluster_sync() do nothing, i.e. the launch behaves as if the
// kernel had no barriers, deterministically: a block runs all its steps
// before the next block starts. The tests use it to show that they detect a
// missing barrier.
#pragma once

#if defined(__CUDACC__)
#error "host_emulation.h is for host compilers only"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <chrono>
#include <thread>
#include <type_traits>
#include <utility>
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
inline thread_local unsigned char* t_dynamic_smem = nullptr;
inline thread_local size_t t_smem_bytes = 0;  // its size

inline unsigned char* dynamic_smem() { return t_dynamic_smem; }

// The grid of a cooperative launch: a barrier of all its threads (none when
// the barrier is switched off, see the header comment).
struct Grid {
  explicit Grid(std::ptrdiff_t threads, bool sync) : bar(threads), sync(sync) {}
  Barrier bar;
  const bool sync;
};

inline thread_local Grid* t_grid = nullptr;
inline std::atomic<long long> g_grid_syncs{0};

// The clusters of a cooperative launch: each cluster's barrier, every block's shared memory.
struct Clusters {
  Clusters(unsigned int size, unsigned int count, std::ptrdiff_t threads_per_block) : size(size) {
    for (unsigned int c = 0; c < count; ++c) bars.emplace_back(std::make_unique<Barrier>(threads_per_block * size));
  }
  const unsigned int size;
  std::vector<std::unique_ptr<Barrier>> bars;
  std::vector<unsigned char*> smem;  // block b's dynamic shared memory
  size_t smem_bytes = 0;
};

inline thread_local Clusters* t_clusters = nullptr;
inline std::atomic<long long> g_cluster_syncs{0};

// Completed grid barriers since the library was loaded (all launches).
inline long long grid_sync_count() { return g_grid_syncs.load(); }

inline void grid_sync() {
  if (t_grid == nullptr) {  // on the GPU: undefined behaviour outside a cooperative launch
    std::fprintf(stderr, "fastseq_emu: grid_sync() outside a cooperative launch\n");
    std::abort();
  }
  if (!t_grid->sync) return;
  t_grid->bar.arrive_and_wait();
  if (t_threadIdx.x == 0 && t_blockIdx.x == 0) ++g_grid_syncs;
}

inline void syncthreads() { t_block->bar.arrive_and_wait(); }
// __syncwarp(): a barrier of the calling thread's warp (all its lanes take part).
inline void syncwarp() { t_block->warps[t_threadIdx.x / 32]->bar.arrive_and_wait(); }

// Completed cluster barriers since the library was loaded (once per cluster; all launches).
inline long long cluster_sync_count() { return g_cluster_syncs.load(); }

inline Clusters& clusters() {
  if (t_clusters == nullptr) {  // on the GPU: a launch without a cluster dimension is a cluster of one block
    std::fprintf(stderr, "fastseq_emu: cluster function outside a clustered cooperative launch\n");
    std::abort();
  }
  return *t_clusters;
}

inline unsigned int cluster_rank() { return t_blockIdx.x % clusters().size; }

inline void cluster_sync() {
  Clusters& c = clusters();
  if (!t_grid->sync) return;
  c.bars[t_blockIdx.x / c.size]->arrive_and_wait();
  if (t_threadIdx.x == 0 && t_blockIdx.x % c.size == 0) ++g_cluster_syncs;
}

template <typename T>
T* map_shared_rank(T* p, unsigned int rank) {
  Clusters& c = clusters();
  const unsigned char* q = reinterpret_cast<const unsigned char*>(p);
  if (rank >= c.size || q < t_dynamic_smem || q >= t_dynamic_smem + c.smem_bytes) {
    std::fprintf(stderr, "fastseq_emu: map_shared_rank(%p, %u): not in this block's shared memory or no such rank\n",
                 static_cast<const void*>(p), rank);
    std::abort();
  }
  const unsigned int target = t_blockIdx.x - t_blockIdx.x % c.size + rank;
  return reinterpret_cast<T*>(c.smem[target] + (q - t_dynamic_smem));
}

// Relaxed 32-bit accesses and a fence (the stand-ins of st/ld.relaxed.gpu and __threadfence):
// the arrival flags and tagged words of persistent_sync_probe.cu. A polling loop calls
// spin_pause() (the emulated threads are OS threads: sleep briefly) and stops polling when
// spinning_allowed() is false: under FASTSEQ_CUDA_EMU_GRID_SYNC=off the blocks run one after the
// other, so a wait for another block would never end; the wait then returns at once, as if there
// were no barrier (the tests' check that a missing barrier is detected).
inline void store_relaxed(unsigned int* p, unsigned int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
inline unsigned int load_relaxed(const unsigned int* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
inline void fence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void spin_pause() {  // sleep, not yield: a yield storm of spinning threads starves the producers
  std::this_thread::sleep_for(std::chrono::microseconds(250));
}
inline bool spinning_allowed() { return t_grid == nullptr || t_grid->sync; }

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

// One block's shared memory: `bytes` of 16-byte aligned storage.
inline std::vector<std::max_align_t> smem_buffer(size_t bytes) {
  return std::vector<std::max_align_t>((bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t) + 1);
}

template <typename... P, typename... A>
void launch(unsigned int grid, int block, size_t smem_bytes, void (*kernel)(P...), A&&... args) {
  if (grid == 0 || block <= 0) return;
  std::vector<std::max_align_t> smem = smem_buffer(smem_bytes);
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
        t_dynamic_smem = reinterpret_cast<unsigned char*>(smem.data());
        t_smem_bytes = smem_bytes;
        t_grid = nullptr;
        kernel(args...);
      });
    }
    for (auto& th : threads) th.join();
  }
}

// The stand-in of cudaLaunchKernelEx with the cooperative attribute and a cluster
// dimension of `cluster` blocks (see the header comment); grid must be a multiple of it.
template <typename... P, typename... A>
void launch_cooperative_cluster(unsigned int grid, unsigned int cluster, int block, size_t smem_bytes,
                                void (*kernel)(P...), A&&... args) {
  if (grid == 0 || block <= 0) return;
  if (cluster == 0 || grid % cluster != 0) {  // cudaErrorInvalidClusterSize on the GPU
    std::fprintf(stderr, "fastseq_emu: grid %u is not a multiple of the cluster size %u\n", grid, cluster);
    std::abort();
  }
  const char* env = std::getenv("FASTSEQ_CUDA_EMU_GRID_SYNC");
  const bool sync = env == nullptr || std::strcmp(env, "off") != 0;
  const unsigned int nthreads = static_cast<unsigned int>(block);
  Grid grd(static_cast<std::ptrdiff_t>(grid) * nthreads, sync);
  Clusters clu(cluster, grid / cluster, nthreads);
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<std::vector<std::max_align_t>> smem;
  for (unsigned int b = 0; b < grid; ++b) {
    blocks.emplace_back(std::make_unique<Block>(nthreads));
    smem.emplace_back(smem_buffer(smem_bytes));
  }
  for (auto& m : smem) clu.smem.push_back(reinterpret_cast<unsigned char*>(m.data()));
  clu.smem_bytes = smem_bytes;
  std::vector<std::thread> threads;
  const auto join = [&]() {
    for (auto& th : threads) th.join();
    threads.clear();
  };
  for (unsigned int b = 0; b < grid; ++b) {
    for (unsigned int t = 0; t < nthreads; ++t) {
      threads.emplace_back([&, t, b]() {
        t_threadIdx.x = t;
        t_blockIdx.x = b;
        t_blockDim.x = nthreads;
        t_gridDim.x = grid;
        t_block = blocks[b].get();
        t_dynamic_smem = reinterpret_cast<unsigned char*>(smem[b].data());
        t_smem_bytes = smem_bytes;
        t_grid = &grd;
        t_clusters = &clu;
        kernel(args...);
      });
    }
    if (!sync) join();  // no grid barrier: the blocks in turn
  }
  join();
}

// The stand-in of cudaLaunchCooperativeKernel (see the header comment): clusters of one block.
template <typename... P, typename... A>
void launch_cooperative(unsigned int grid, int block, size_t smem_bytes, void (*kernel)(P...), A&&... args) {
  launch_cooperative_cluster(grid, 1, block, smem_bytes, kernel, std::forward<A>(args)...);
}

// ------------------------------------------------------ shared-memory banks
//
// A model of the bank conflicts of the wmma calls that touch shared memory (the
// emulation runs them on plain memory; this only measures their addresses).
// Shared memory has 32 banks of 4 bytes; the accesses of one phase that fall in
// one bank at different 4-byte words are serialised: the phase takes as many
// passes ("ways") as the most-loaded bank has distinct words. The phases, as the
// compiled kernels issue them on sm_80 / sm_90:
//   * a 16-bit A or B fragment (LDSM.16.M88.4 for float16; for bfloat16 the
//     compiler issues 32-bit loads in the fragment's own layout, the same
//     addresses): four phases, each 8 rows (of the matrix as stored: rows for
//     row major, columns for column major) x 16 bytes;
//   * a float accumulator stored row major (STS.64: lane l holds row l / 4
//     (+ 8) and columns 2 (l % 4) (+ 8), 8 bytes each): eight phases, one per
//     half-warp and 8-row x 8-column quarter.
// Accesses outside the calling block's dynamic shared memory (global memory,
// L2) are not counted. take_smem_conflict_ways() returns the worst ways seen
// since its last call (1: conflict-free; 0: no shared-memory fragment access)
// and starts over.
inline std::atomic<int> g_smem_ways{0};

inline bool in_dynamic_smem(const void* p) {
  const unsigned char* q = static_cast<const unsigned char*>(p);
  return t_dynamic_smem != nullptr && q >= t_dynamic_smem && q < t_dynamic_smem + t_smem_bytes;
}

// The ways of one phase whose accesses cover the 4-byte words `words` (addresses / 4).
inline int phase_ways(const std::vector<std::uintptr_t>& words) {
  int worst = 0;
  for (unsigned int bank = 0; bank < 32; ++bank) {
    std::vector<std::uintptr_t> distinct;
    for (std::uintptr_t w : words) {
      if (w % 32 == bank && std::find(distinct.begin(), distinct.end(), w) == distinct.end()) distinct.push_back(w);
    }
    worst = static_cast<int>(distinct.size()) > worst ? static_cast<int>(distinct.size()) : worst;
  }
  return worst;
}

inline void note_ways(int ways) {
  int seen = g_smem_ways.load();
  while (ways > seen && !g_smem_ways.compare_exchange_weak(seen, ways)) {
  }
}

// A 16-bit fragment of 16 x 16 at p whose stored rows start ldm elements apart.
inline void note_fragment_16bit(const void* p, unsigned ldm) {
  if (!in_dynamic_smem(p)) return;
  const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(p);
  for (int half = 0; half < 2; ++half) {
    for (int rows = 0; rows < 16; rows += 8) {
      std::vector<std::uintptr_t> words;
      for (int r = rows; r < rows + 8; ++r)
        for (int w = 0; w < 4; ++w) words.push_back((base + (r * ldm + half * 8) * 2) / 4 + w);
      note_ways(phase_ways(words));
    }
  }
}

// A float accumulator of 16 x 16 stored row major at p, rows ldm floats apart.
inline void note_accumulator_store(const float* p, unsigned ldm) {
  if (!in_dynamic_smem(p)) return;
  const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(p) / 4;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      for (int hw = 0; hw < 2; ++hw) {
        std::vector<std::uintptr_t> words;
        for (int lane = 16 * hw; lane < 16 * hw + 16; ++lane) {
          const std::uintptr_t w = base + (8 * i + lane / 4) * ldm + 8 * j + 2 * (lane % 4);
          words.push_back(w);
          words.push_back(w + 1);
        }
        note_ways(phase_ways(words));
      }
    }
  }
}

inline int take_smem_conflict_ways() { return g_smem_ways.exchange(0); }

// wmma's load/store pointers must be 256-bit (32-byte) aligned. Shared memory: the offset
// from the block's dynamic shared memory (128-byte aligned on the GPU: common.cuh);
// elsewhere the address itself (torch's CPU allocations are 64-byte aligned, the GPU's 256).
inline void check_fragment_alignment(const void* p) {
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t off = in_dynamic_smem(p) ? a - reinterpret_cast<std::uintptr_t>(t_dynamic_smem) : a;
  if (off % 32 != 0) {
    std::fprintf(stderr, "fastseq_emu: wmma pointer %p is not 32-byte aligned (offset %zu)\n", p,
                 static_cast<size_t>(off));
    std::abort();
  }
}

// The model on its own (tests): the ways of one 16-bit fragment load (accumulator false) or
// one float accumulator store (true) at the start of a shared-memory buffer whose rows are
// `pitch` elements apart. Forgets what take_smem_conflict_ways() would have returned.
inline int smem_ways_at_pitch(unsigned pitch, bool accumulator) {
  std::vector<std::max_align_t> buffer((16 * (pitch + 16) * 4) / sizeof(std::max_align_t) + 2);
  unsigned char* const saved = t_dynamic_smem;
  const size_t saved_bytes = t_smem_bytes;
  t_dynamic_smem = reinterpret_cast<unsigned char*>(buffer.data());
  t_smem_bytes = buffer.size() * sizeof(std::max_align_t);
  take_smem_conflict_ways();
  if (accumulator) {
    note_accumulator_store(reinterpret_cast<const float*>(t_dynamic_smem), pitch);
  } else {
    note_fragment_16bit(t_dynamic_smem, pitch);
  }
  t_dynamic_smem = saved;
  t_smem_bytes = saved_bytes;
  return take_smem_conflict_ways();
}

// ------------------------------------------------------------------- wmma
//
// The stand-in of the subset of nvcuda::wmma (<mma.h>) that
// persistent_mma_kernels.cu uses: 16 x 16 x 16 tiles, half / bfloat16 A (row
// major) and B (column major), float accumulators. On the GPU a fragment is
// spread over the 32 lanes of a warp in a layout the API does not specify, and
// every wmma call is warp-collective; the kernels only move fragments between
// these calls (never read their elements), so here a fragment holds the whole
// 16 x 16 tile in logical (row, column) order and lane 0 of the warp does the
// work: loads, products and stores by other lanes do nothing (their fragments
// stay unused), as if the warp's lanes had done their part of it. A store is
// seen by the other threads after the next __syncthreads(), as on the GPU.
// Every mma_sync of lane 0 adds one to mma_count() (tests: the tensor-core path ran).
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "fastseq_emu::wmma: 16 x 16 x 16 tiles only");
  T x[16 * 16];  // logical (row, column), row major
};

inline bool lane0() { return t_threadIdx.x % 32 == 0; }
inline std::atomic<long long> g_mma_count{0};

template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return static_cast<float>(v);
  }
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T v) {
  if (!lane0()) return;
  for (T& e : f.x) e = v;
}

// A (16 x 16, row major): element (m, k) at p[m * ldm + k].
template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  if (!lane0()) return;
  check_fragment_alignment(p);
  note_fragment_16bit(p, ldm);
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) f.x[m * 16 + k] = p[m * ldm + k];
}

// B (16 x 16, column major): element (k, n) at p[k + n * ldm].
template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  if (!lane0()) return;
  check_fragment_alignment(p);
  note_fragment_16bit(p, ldm);
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.x[k * 16 + n] = p[k + n * ldm];
}

// d = a b + c, the products and sums in float (the tensor cores' fp32 accumulation).
template <typename T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!lane0()) return;
  float out[16 * 16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[m * 16 + n];
      for (int k = 0; k < 16; ++k) s += to_float(a.x[m * 16 + k]) * to_float(b.x[k * 16 + n]);
      out[m * 16 + n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
  ++g_mma_count;
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (!lane0()) return;
  check_fragment_alignment(p);
  if (layout == mem_row_major) note_accumulator_store(p, ldm);
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      if (layout == mem_row_major) {
        p[m * ldm + n] = f.x[m * 16 + n];
      } else {
        p[m + n * ldm] = f.x[m * 16 + n];
      }
    }
}

inline long long mma_count() { return g_mma_count.load(); }

}  // namespace wmma

}  // namespace fastseq_emu

// CUDA built-ins the kernels use.
#define threadIdx (::fastseq_emu::t_threadIdx)
#define blockIdx (::fastseq_emu::t_blockIdx)
#define blockDim (::fastseq_emu::t_blockDim)
#define gridDim (::fastseq_emu::t_gridDim)
#define __syncthreads() ::fastseq_emu::syncthreads()
#define __syncwarp(...) ::fastseq_emu::syncwarp()
#define __shfl_xor_sync(mask, x, off) ::fastseq_emu::shfl_xor((x), (off))
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
