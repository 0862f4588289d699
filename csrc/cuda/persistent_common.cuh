// What the persistent (whole-sequence, cooperative-launch) recurrence kernels
// share: the grid barrier, the emulated device they plan for under the host
// emulation, the forward's per-element step epilogue (the gate formulas of
// gates.cuh applied to one (row, unit) pair, the lengths mask and the writes
// of the step's outputs and state) and the backward's per-element gate
// gradients (phase 1 of a backward step). Used by persistent_kernels.cu (W_hh in
// shared memory, FMA products) and persistent_mma_kernels.cu (tensor-core
// products: the forward with W_hh in registers, the backward with W_hh^T in
// shared memory); kernels.h has their contracts.
#pragma once

#include "common.cuh"
#include "gates.cuh"

#if !(defined(FASTSEQ_CUDA_HOST_EMULATION) && !defined(__CUDACC__))
#include <cooperative_groups.h>
#define FASTSEQ_PERSISTENT_EMULATED 0
#else
#define FASTSEQ_PERSISTENT_EMULATED 1
#endif

namespace fastseq {
namespace cuda {
namespace detail {

#if FASTSEQ_PERSISTENT_EMULATED
// The emulated device: sm_90's opt-in shared memory per block (H100 / H200), 8 SMs.
constexpr int64_t kSm90SmemOptin = 227 * 1024;
constexpr int64_t kEmulatedSMs = 8;
#endif

// A cooperative launch needs all its blocks resident at once: whether `blocks` blocks of
// `kernel` (`threads` threads, `smem` bytes of dynamic shared memory, whose limit it
// raises first) fit on `sms` SMs. When they do not, *fits is false and plan->reason says
// why. The emulated device holds one block per SM (kernel and threads unused there).
inline cudaError_t co_resident(const void* kernel, int threads, int64_t smem, int64_t blocks, int64_t sms,
                               RecurrencePersistentPlan* plan, bool* fits) {
  *fits = false;
#if !FASTSEQ_PERSISTENT_EMULATED
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  int per_sm = 0;
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, static_cast<size_t>(smem));
  if (err != cudaSuccess) return err;
  const int64_t capacity = static_cast<int64_t>(per_sm) * sms;
#else
  (void)kernel;
  (void)threads;
  (void)smem;
  const int64_t capacity = sms;
#endif
  if (blocks > capacity) {
    plan->reason = "more blocks than the device holds at once (cooperative launch)";
    return cudaSuccess;
  }
  *fits = true;
  return cudaSuccess;
}

#if !FASTSEQ_PERSISTENT_EMULATED
// A launch of `grid` blocks of `threads` threads in clusters of `cluster` blocks (attrs[0]),
// cooperative when `cooperative` (attrs[1]); `attrs` must outlive the returned configuration.
inline cudaLaunchConfig_t cluster_config(int64_t grid, int64_t cluster, int threads, int64_t smem, cudaStream_t stream,
                                         bool cooperative, cudaLaunchAttribute* attrs) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned int>(grid));
  cfg.blockDim = dim3(static_cast<unsigned int>(threads));
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = static_cast<unsigned int>(cluster);
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  attrs[1].id = cudaLaunchAttributeCooperative;
  attrs[1].val.cooperative = 1;
  cfg.attrs = attrs;
  cfg.numAttrs = cooperative ? 2 : 1;
  return cfg;
}
#endif

// Whether `blocks` blocks of `kernel` (`threads` threads) in clusters of `cluster` are
// resident at once (a cooperative launch needs it): the device's count of co-resident
// clusters of that shape (clusters sit inside one GPC), raising the kernel's shared-memory
// limit first; *fits is false, with plan->reason, when they are not or the device refuses
// the queries. The emulated device holds one block per SM.
inline cudaError_t cluster_co_resident(const void* kernel, int threads, int64_t smem, int64_t blocks, int64_t cluster,
                                       int64_t sms, RecurrencePersistentPlan* plan, bool* fits) {
  *fits = false;
#if FASTSEQ_PERSISTENT_EMULATED
  (void)kernel;
  (void)threads;
  (void)smem;
  (void)cluster;
  const int64_t capacity = sms;
#else
  (void)sms;
  // A refused query is a refusal of the plan (with its reason), not an error: the caller then
  // tries the block kernel.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  int clusters = 0;
  if (err == cudaSuccess) {
    cudaLaunchAttribute attrs[2];
    const cudaLaunchConfig_t cfg = cluster_config(blocks, cluster, threads, smem, nullptr, false, attrs);
    err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    plan->reason = "the device refused the cluster occupancy query (cudaOccupancyMaxActiveClusters)";
    return cudaSuccess;
  }
  const int64_t capacity = static_cast<int64_t>(clusters) * cluster;
#endif
  if (blocks > capacity) {
    plan->reason = "more blocks than the device holds at once in clusters of this size (cooperative launch)";
    return cudaSuccess;
  }
  *fits = true;
  return cudaSuccess;
}

// The barrier of all blocks of a cooperative launch (emulated: a real barrier of
// all the launch's threads, emu/host_emulation.h).
FASTSEQ_DEVICE void grid_sync() {
#if FASTSEQ_PERSISTENT_EMULATED
  ::fastseq_emu::grid_sync();
#else
  cooperative_groups::this_grid().sync();
#endif
}

// Relaxed gpu-scope 32-bit global accesses (single-copy atomic: a reader sees a word whole,
// old or new) and the gpu-scope fence; with a fence before a relaxed store and after a
// relaxed load they form release / acquire, the pattern of cooperative_groups' grid barrier.
// spin_pause / spinning_allowed: what a polling loop does between polls and whether it may
// go on (always, on a GPU; emu/host_emulation.h says why not always there). Used by the
// alternatives to grid_sync in persistent_sync_probe.cu.
FASTSEQ_DEVICE void store_relaxed(unsigned int* p, unsigned int v) {
#if FASTSEQ_PERSISTENT_EMULATED
  ::fastseq_emu::store_relaxed(p, v);
#else
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
#endif
}

FASTSEQ_DEVICE unsigned int load_relaxed(const unsigned int* p) {
#if FASTSEQ_PERSISTENT_EMULATED
  return ::fastseq_emu::load_relaxed(p);
#else
  unsigned int v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
#endif
}

// Four consecutive words (16-byte aligned), each read relaxed; the four are not one atomic read.
FASTSEQ_DEVICE void load_relaxed4(const unsigned int* p, unsigned int* v) {
#if FASTSEQ_PERSISTENT_EMULATED
  for (int i = 0; i < 4; ++i) v[i] = ::fastseq_emu::load_relaxed(p + i);
#else
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
               : "l"(p)
               : "memory");
#endif
}

// fence.acq_rel, not __threadfence's fence.sc: release / acquire is all the pattern needs.
FASTSEQ_DEVICE void fence_gpu() {
#if FASTSEQ_PERSISTENT_EMULATED
  ::fastseq_emu::fence();
#else
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
#endif
}

FASTSEQ_DEVICE void spin_pause() {
#if FASTSEQ_PERSISTENT_EMULATED
  ::fastseq_emu::spin_pause();
#endif
}

FASTSEQ_DEVICE bool spinning_allowed() {
#if FASTSEQ_PERSISTENT_EMULATED
  return ::fastseq_emu::spinning_allowed();
#else
  return true;
#endif
}

// A barrier of all blocks of a cooperative launch from per-block arrival flags, instead of
// cooperative_groups' shared counter: block k stores `step` into flags[k] (release), then its
// threads poll all `blocks` flags until each holds at least `step` (acquire). No two blocks
// write one word, so the arrivals are not serialised at one L2 address; the cost is every
// block reading `blocks` words per barrier. `flags`: zero before the launch; `step`: 1, 2, ...
// (increasing by one per barrier).
FASTSEQ_DEVICE void flag_barrier(unsigned int* flags, int blocks, unsigned int step) {
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_gpu();
    store_relaxed(flags + blockIdx.x, step);
  }
  for (int i = static_cast<int>(threadIdx.x); i < blocks; i += static_cast<int>(blockDim.x))
    while (load_relaxed(flags + i) < step && spinning_allowed()) spin_pause();
  fence_gpu();
  __syncthreads();
}

// Thread-block clusters (sm_90; the cluster backward of persistent_mma_kernels.cu): the
// block's rank in its cluster, the barrier of the cluster's threads (release / acquire:
// shared-memory writes before it are seen by the cluster's blocks after it), and a
// pointer into this block's shared memory mapped to the same place in the shared memory
// of the cluster's block of rank `rank` (distributed shared memory). Emulated:
// emu/host_emulation.h's stand-ins. Compiled only where the kernel that calls them is
// (FASTSEQ_DEVICE code for sm_90 or the host emulation).
#if FASTSEQ_PERSISTENT_EMULATED || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
FASTSEQ_DEVICE unsigned int cluster_rank() {
#if FASTSEQ_PERSISTENT_EMULATED
  return ::fastseq_emu::cluster_rank();
#else
  return cooperative_groups::this_cluster().block_rank();
#endif
}

FASTSEQ_DEVICE void cluster_sync() {
#if FASTSEQ_PERSISTENT_EMULATED
  ::fastseq_emu::cluster_sync();
#else
  cooperative_groups::this_cluster().sync();
#endif
}

template <typename T>
FASTSEQ_DEVICE T* cluster_map(T* p, unsigned int rank) {
#if FASTSEQ_PERSISTENT_EMULATED
  return ::fastseq_emu::map_shared_rank(p, rank);
#else
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#endif
}
#endif

// What forward element (t, b, j) reads besides its recurrent products and h_{t-1}[b, j]:
// gi[t][b, g*H + j], b_hh[g*H + j] (0 without a bias), whether row b is still running
// (lengths), and the LSTM's c_{t-1}[b, j] (c_state, written by the same thread at step t-1).
// None of it depends on step t's product, so a kernel may load it before the product and
// the step's barrier (the tensor-core forward does: persistent_mma_kernels.cu), taking the
// loads' round trip to L2 / HBM off the step's critical path.
template <typename C, int G>
struct ForwardElementInputs {
  C x[G];
  C bias[G];
  C c;
  bool valid;
};

template <typename S, int G>
FASTSEQ_DEVICE void load_forward_inputs(const RecurrencePersistentFwd& a, int64_t t, int64_t b, int64_t j,
                                        ForwardElementInputs<acc_t<S>, G>* in) {
  using C = acc_t<S>;
  const int64_t H = a.H;
  const C* bias = static_cast<const C*>(a.bias);
  const S* x = static_cast<const S*>(a.gi) + t * a.ld_t + b * a.ld_b;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    in->x[g] = ld(x + g * H + j);
    in->bias[g] = bias != nullptr ? bias[g * H + j] : C(0);
  }
  in->c = G == 4 ? static_cast<const C*>(a.c_state)[b * H + j] : C(0);
  in->valid = a.lengths == nullptr || a.lengths[b] > t;
}

// One (row b, unit j) element of forward step t, after its recurrent products
// acc[g] = (h_{t-1} W_hh^T)[b, g*H + j] (no bias yet) and with its other inputs `in`
// (load_forward_inputs): adds b_hh, applies the gates, masks by lengths (a finished row
// keeps its state hp), writes hs[t] (cs[t]), the saved gates, the float state (h_next; the
// LSTM's c_state in place) and, when h_op_next is not null, the state in the storage dtype
// at h_op_next[b * ld_op + j] (the tensor-core kernel's product operand). Returns h_t[b, j].
template <typename S, int G>
FASTSEQ_DEVICE acc_t<S> persistent_forward_element(const RecurrencePersistentFwd& a, int64_t t, int64_t b, int64_t j,
                                                   const ForwardElementInputs<acc_t<S>, G>& in, acc_t<S>* acc,
                                                   acc_t<S> hp, acc_t<S>* h_next, S* h_op_next) {
  using C = acc_t<S>;
  const int64_t B = a.B, H = a.H;
#pragma unroll
  for (int g = 0; g < G; ++g) acc[g] += in.bias[g];
  const bool valid = in.valid;
  const int64_t o = (t * B + b) * H + j;  // element (t, b, j) of hs / cs
  S* gg = a.gates != nullptr ? static_cast<S*>(a.gates) + (t * B + b) * 4 * H : nullptr;
  C h_new;
  if constexpr (G == 3) {
    const GruGates<C> y = gru_gate_forward(in.x[0], in.x[1], in.x[2], acc[0], acc[1], acc[2], hp);
    h_new = valid ? y.h : hp;
    if (gg != nullptr) {
      gg[j] = from_acc<S>(y.r);
      gg[H + j] = from_acc<S>(y.z);
      gg[2 * H + j] = from_acc<S>(y.n);
      gg[3 * H + j] = from_acc<S>(acc[2]);
    }
  } else {
    C* c_state = static_cast<C*>(a.c_state);
    const C cp = in.c;
    const LstmGates<C> y = lstm_gate_forward(in.x[0], in.x[1], in.x[2], in.x[3], acc[0], acc[1], acc[2], acc[3], cp);
    h_new = valid ? y.h : hp;
    const C c_new = valid ? y.c : cp;
    c_state[b * H + j] = c_new;
    static_cast<S*>(a.cs)[o] = from_acc<S>(c_new);
    if (gg != nullptr) {
      gg[j] = from_acc<S>(y.i);
      gg[H + j] = from_acc<S>(y.f);
      gg[2 * H + j] = from_acc<S>(y.g);
      gg[3 * H + j] = from_acc<S>(y.o);
    }
  }
  h_next[b * H + j] = h_new;
  static_cast<S*>(a.hs)[o] = from_acc<S>(h_new);
  if (h_op_next != nullptr) h_op_next[b * a.ld_op + j] = from_acc<S>(h_new);
  return h_new;
}

// What backward element (t, b, j) reads besides the carried dh: the step's output gradients
// grad_hs[t] (grad_cs[t]), the saved gates of step t, the GRU's h_{t-1} (hs[t-1] or h0), the
// LSTM's c_t and c_{t-1} (cs, or c0), its carried dc (written by the same thread at step t+1),
// and whether row b ran step t (lengths). None of it depends on step t+1's product, so a kernel
// may load it during that product (the tensor-core backward does: persistent_mma_kernels.cu).
template <typename C, int G>
struct BackwardElementInputs {
  C d_out;   // grad_hs[t][b, j]
  C dc_out;  // grad_cs[t][b, j] (LSTM)
  C dc;      // the carried dc (LSTM)
  C gate[4];  // the saved gates: GRU r, z, n, the n gate's recurrent product; LSTM i, f, g, o
  C hp;      // GRU: h_{t-1}[b, j]
  C ct, cp;  // LSTM: c_t[b, j], c_{t-1}[b, j]
  bool valid;
};

template <typename S, int G>
FASTSEQ_DEVICE void load_backward_inputs(const RecurrencePersistentBwd& a, int64_t t, int64_t b, int64_t j,
                                         BackwardElementInputs<acc_t<S>, G>* in) {
  using C = acc_t<S>;
  const int64_t B = a.B, H = a.H;
  const int64_t idx = b * H + j, o = t * B * H + idx;
  const S* g = static_cast<const S*>(a.gates) + (t * B + b) * 4 * H;
  in->valid = a.lengths == nullptr || a.lengths[b] > t;
  in->d_out = ld(static_cast<const S*>(a.grad_hs) + o);
#pragma unroll
  for (int k = 0; k < 4; ++k) in->gate[k] = ld(g + k * H + j);
  if constexpr (G == 3) {
    in->hp = t > 0 ? ld(static_cast<const S*>(a.hs) + o - B * H) : static_cast<const C*>(a.h0)[idx];
    in->dc_out = in->dc = in->ct = in->cp = C(0);
  } else {
    const S* cs = static_cast<const S*>(a.cs);
    in->dc_out = ld(static_cast<const S*>(a.grad_cs) + o);
    in->dc = static_cast<const C*>(a.dc)[idx];
    in->ct = ld(cs + o);
    in->cp = t > 0 ? ld(cs + o - B * H) : static_cast<const C*>(a.c0)[idx];
    in->hp = C(0);
  }
}

// One (row b, unit j) element of backward step t, phase 1: the gate gradients dG[t][b, g*H + j]
// from the carried dh (*dh_at, read and written) and dc of this unit and the step's other
// inputs `in` (load_backward_inputs; the lengths mask: a finished row passes dh, dc through and
// has zero gate gradients). Writes dg (compute dtype: the gradient of h W_hh^T), dg_s (grad_gi in
// the storage dtype; the LSTM's may be null), *dh_at (the GRU's direct part z * dh, the LSTM's 0:
// phase 2 adds dG[t] W_hh), dc[b, j] and, when dg_op_row is not null, dG[t][b, :] in the storage
// dtype at dg_op_row[g*H + j] (the tensor-core kernel's product operand).
template <typename S, int G>
FASTSEQ_DEVICE void persistent_backward_element(const RecurrencePersistentBwd& a, int64_t t, int64_t b, int64_t j,
                                                const BackwardElementInputs<acc_t<S>, G>& in, acc_t<S>* dh_at,
                                                S* dg_op_row) {
  using C = acc_t<S>;
  const int64_t H = a.H, GH = G * H;
  const int64_t idx = b * H + j;
  const bool valid = in.valid;
  const C d = *dh_at + in.d_out;
  C* gd = static_cast<C*>(a.dg) + (t * a.B + b) * GH;
  S* gs = a.dg_s != nullptr ? static_cast<S*>(a.dg_s) + (t * a.B + b) * GH : nullptr;
  C grads[G];
  if constexpr (G == 3) {
    if (!valid) {
      grads[0] = grads[1] = grads[2] = C(0);
      gs[j] = gs[H + j] = gs[2 * H + j] = from_acc<S>(C(0));
      *dh_at = d;
    } else {
      const GruGateGrads<C> y = gru_gate_backward(d, in.gate[0], in.gate[1], in.gate[2], in.gate[3], in.hp);
      gs[j] = from_acc<S>(y.dr);  // grad_gi
      gs[H + j] = from_acc<S>(y.dz);
      gs[2 * H + j] = from_acc<S>(y.dn);
      grads[0] = y.dr;  // grad of h W_hh^T
      grads[1] = y.dz;
      grads[2] = y.dhn;
      *dh_at = y.dh;
    }
  } else {
    C* dc = static_cast<C*>(a.dc);
    const C dc_in = in.dc + in.dc_out;
    if (!valid) {
      grads[0] = grads[1] = grads[2] = grads[3] = C(0);
      *dh_at = d;
      dc[idx] = dc_in;
    } else {
      const LstmGateGrads<C> y =
          lstm_gate_backward(d, dc_in, in.gate[0], in.gate[1], in.gate[2], in.gate[3], tanh_(in.ct), in.cp);
      grads[0] = y.di;
      grads[1] = y.df;
      grads[2] = y.dg;
      grads[3] = y.d_o;
      *dh_at = C(0);
      dc[idx] = y.dc;
    }
    if (gs != nullptr) {
#pragma unroll
      for (int k = 0; k < 4; ++k) gs[k * H + j] = from_acc<S>(grads[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < G; ++k) gd[k * H + j] = grads[k];
  if (dg_op_row != nullptr) {
#pragma unroll
    for (int k = 0; k < G; ++k) dg_op_row[k * H + j] = from_acc<S>(grads[k]);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastseq
