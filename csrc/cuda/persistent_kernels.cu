// Persistent whole-sequence forward and backward of the GRU and LSTM
// recurrences: one cooperative launch runs all T steps of one layer and
// direction, with W_hh resident in shared memory across the steps (kernels.h,
// "persistent recurrences", for the contract and the size limit). The
// backward's model is at recurrence_persistent_bwd_kernel.
//
// Forward work model, per block and step (block k owns `units` hidden units j, all G
// gates of each):
//   * W_hh slice: G * units rows of H elements in the storage dtype, loaded
//     once before step 0 (row g*units + jj holds W_hh row g*H + j0 + jj);
//   * h_{t-1} [B, H] (compute dtype, global, written by all blocks in the
//     previous step) staged batch_tile rows at a time in shared memory, rows
//     padded to H + 1 elements (lanes walk rows at the same k: no bank
//     conflicts for 4-byte elements);
//   * one thread per (row b, unit jj) pair of the tile (lanes over b, so the
//     W_hh reads of a warp are mostly broadcasts), G dot products of length H
//     accumulated in the compute dtype, then the gate formulas of gates.cuh,
//     the lengths mask and the writes of hs[t] (cs[t]), gates[t] and the new
//     state, exactly as the per-step kernels of rnn_kernels.cu;
//   * a grid barrier, then the next step.
//
// The barrier: cooperative_groups::this_grid().sync(), under a cooperative
// launch (cudaLaunchCooperativeKernel). Chosen over a hand-written
// atomic-counter barrier because (1) the cooperative launch guarantees that
// all blocks are co-resident or fails with
// cudaErrorCooperativeLaunchTooLarge, where a hand-written barrier in an
// ordinary launch would hang when they are not, and (2) its memory ordering
// (the state written before the barrier is visible to every block after it)
// is the library's contract, not ours to get right with __threadfence and
// volatile flags. It does not need -rdc (CUDA >= 11).
//
// Why one barrier per step is enough: step t reads h_state[(t-1) & 1] and
// writes h_state[t & 1]; step t+1 writes h_state[(t+1) & 1], the buffer that
// step t read, only after the barrier that ends step t. The cell state of the
// LSTM is read and written only by the block that owns its unit (in place).
// No barrier after the last step: the end of the kernel orders it.
//
// Under FASTSEQ_CUDA_HOST_EMULATION (tests) the launch is
// fastseq_emu::launch_cooperative and the barrier fastseq_emu::grid_sync():
// every block runs concurrently as threads and the barrier is real
// (emu/host_emulation.h).
#include "persistent_common.cuh"

namespace fastseq {
namespace cuda {
namespace {

using detail::acc_t;
using detail::from_acc;
using detail::grid_sync;
using detail::ld;
#if FASTSEQ_PERSISTENT_EMULATED
using detail::kEmulatedSMs;
using detail::kSm90SmemOptin;
#endif

constexpr int kThreads = 256;

__host__ __device__ inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Bytes of the W_hh slice in shared memory (the h tile starts after them).
__host__ __device__ inline int64_t w_slice_bytes(int64_t G, int64_t units, int64_t H, int64_t elem) {
  return align16(G * units * H * elem);
}

template <typename S, int G>
__global__ void __launch_bounds__(kThreads) recurrence_persistent_fwd_kernel(RecurrencePersistentFwd a) {
  using C = acc_t<S>;
  const int64_t T = a.T, B = a.B, H = a.H;
  const int64_t J = a.plan.units, Bt = a.plan.batch_tile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * J;
  const int64_t nj = j0 < H ? (H - j0 < J ? H - j0 : J) : 0;  // units of this block
  const int64_t hld = H + 1;                                    // row stride of the staged h tile
  const int tid = threadIdx.x, nthr = blockDim.x;

  FASTSEQ_DYNAMIC_SMEM(smem);
  S* w_s = reinterpret_cast<S*>(smem);  // [G * J, H]
  C* h_s = reinterpret_cast<C*>(smem + w_slice_bytes(G, J, H, sizeof(S)));  // [Bt, H + 1]

  const S* w = static_cast<const S*>(a.w_hh);
  for (int64_t idx = tid; idx < G * nj * H; idx += nthr) {
    const int64_t r = idx / H, k = idx - r * H;
    const int64_t g = r / nj, jj = r - g * nj;
    w_s[(g * J + jj) * H + k] = w[(g * H + j0 + jj) * H + k];
  }

  C* h_state = static_cast<C*>(a.h_state);
  for (int64_t t = 0; t < T; ++t) {
    const C* h_prev = h_state + ((t + 1) & 1) * B * H;  // the state after step t-1 (h0 at t = 0)
    C* h_next = h_state + (t & 1) * B * H;
    for (int64_t b0 = 0; nj > 0 && b0 < B; b0 += Bt) {
      const int64_t nb = B - b0 < Bt ? B - b0 : Bt;
      __syncthreads();  // the previous tile's (and, first, the W_hh slice's) readers and writers are done
      for (int64_t idx = tid; idx < nb * H; idx += nthr) {
        const int64_t bb = idx / H, k = idx - bb * H;
        h_s[bb * hld + k] = h_prev[(b0 + bb) * H + k];
      }
      __syncthreads();
      for (int64_t p = tid; p < nb * nj; p += nthr) {
        const int64_t jj = p / nb, bb = p - jj * nb;
        const int64_t b = b0 + bb, j = j0 + jj;
        const C* hrow = h_s + bb * hld;
        detail::ForwardElementInputs<C, G> in;  // loaded before the product: in flight during it
        detail::load_forward_inputs<S, G>(a, t, b, j, &in);
        C acc[G];
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g] = C(0);
        for (int64_t k = 0; k < H; ++k) {
          const C hk = hrow[k];
#pragma unroll
          for (int g = 0; g < G; ++g) acc[g] += ld(w_s + (g * J + jj) * H + k) * hk;
        }
        detail::persistent_forward_element<S, G>(a, t, b, j, in, acc, hrow[j], h_next, nullptr);
      }
    }
    if (t + 1 < T) grid_sync();  // every block's h_{t} written before any block reads it
  }
}

// The backward, t = T-1 .. 0 (the per-step contract of gru_backward_step /
// lstm_backward_step plus the caller's dh += dG[t] W_hh). Block k keeps the
// W_hh COLUMNS of its units (all G*H rows; column jj at wc[jj * G*H ...]).
// Per step:
//   phase 1: the gate gradients dG[t] of its own units for every row, from
//     its own part of dh (dc), which only this block reads and writes;
//   grid barrier: all of dG[t] written;
//   phase 2: dh[b, j] += sum_r dG[t][b, r] W_hh[r, j] for its own units j,
//     dG[t] rows staged batch_tile at a time in shared memory.
// One barrier per step is enough: phase 1 of step t-1 writes dG[t-1], not
// the dG[t] that slower blocks may still read, and dh / dc are per block.
template <typename S, int G>
__global__ void __launch_bounds__(kThreads) recurrence_persistent_bwd_kernel(RecurrencePersistentBwd a) {
  using C = acc_t<S>;
  const int64_t T = a.T, B = a.B, H = a.H, GH = G * H;
  const int64_t J = a.plan.units, Bt = a.plan.batch_tile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * J;
  const int64_t nj = j0 < H ? (H - j0 < J ? H - j0 : J) : 0;
  const int64_t dld = GH + 1;  // row stride of the staged dG tile
  const int tid = threadIdx.x, nthr = blockDim.x;

  FASTSEQ_DYNAMIC_SMEM(smem);
  S* wc = reinterpret_cast<S*>(smem);  // [J, G*H]: W_hh column j0 + jj
  C* d_s = reinterpret_cast<C*>(smem + w_slice_bytes(G, J, H, sizeof(S)));  // [Bt, G*H + 1]

  const S* w = static_cast<const S*>(a.w_hh);
  for (int64_t idx = tid; idx < nj * GH; idx += nthr) {
    const int64_t jj = idx / GH, r = idx - jj * GH;
    wc[jj * GH + r] = w[r * H + j0 + jj];
  }

  C* dh = static_cast<C*>(a.dh);
  const C* dg = static_cast<const C*>(a.dg);

  for (int64_t t = T - 1; t >= 0; --t) {
    __syncthreads();  // phase 2 of step t+1 (and the W_hh slice) written by this block's threads
    // phase 1: dG[t] of this block's units
    for (int64_t p = tid; p < B * nj; p += nthr) {
      const int64_t b = p / nj, j = j0 + (p - b * nj);
      detail::BackwardElementInputs<C, G> in;
      detail::load_backward_inputs<S, G>(a, t, b, j, &in);
      detail::persistent_backward_element<S, G>(a, t, b, j, in, dh + b * H + j, nullptr);
    }
    grid_sync();  // all of dG[t] written before any block reads it
    // phase 2: dh[:, own units] += dG[t] W_hh[:, own units]
    const C* dg_t = dg + t * B * GH;
    for (int64_t b0 = 0; nj > 0 && b0 < B; b0 += Bt) {
      const int64_t nb = B - b0 < Bt ? B - b0 : Bt;
      __syncthreads();  // phase 1's dh writes and the previous tile's readers are done
      for (int64_t idx = tid; idx < nb * GH; idx += nthr) {
        const int64_t bb = idx / GH, r = idx - bb * GH;
        d_s[bb * dld + r] = dg_t[(b0 + bb) * GH + r];
      }
      __syncthreads();
      for (int64_t p = tid; p < nb * nj; p += nthr) {
        const int64_t jj = p / nb, bb = p - jj * nb;
        const C* drow = d_s + bb * dld;
        const S* wcol = wc + jj * GH;
        C acc = C(0);
        for (int64_t r = 0; r < GH; ++r) acc += drow[r] * ld(wcol + r);
        dh[(b0 + bb) * H + j0 + jj] += acc;
      }
    }
  }
}

// --------------------------------------------------------------- planning

template <typename S, int G>
cudaError_t plan_impl(int64_t B, int64_t H, int64_t blocks, bool backward, RecurrencePersistentPlan* plan) {
  using C = acc_t<S>;
  *plan = RecurrencePersistentPlan{};
  if (B <= 0 || H <= 0) {
    plan->reason = "empty batch or hidden size";
    return cudaSuccess;
  }
#if FASTSEQ_PERSISTENT_EMULATED
  const int64_t sms = kEmulatedSMs, smem_optin = kSm90SmemOptin;
#else
  int dev = 0, coop = 0, sm_count = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (!coop) {
    plan->reason = "the device does not support cooperative launches";
    return cudaSuccess;
  }
  const int64_t sms = sm_count, smem_optin = optin;
#endif
  int64_t nblk = blocks > 0 ? blocks : (sms < H ? sms : H);
  const int64_t units = (H + nblk - 1) / nblk;
  if (blocks <= 0) nblk = (H + units - 1) / units;  // no idle blocks by default
  const int64_t w_bytes = w_slice_bytes(G, units, H, sizeof(S));
  // A staged row: h_{t-1} (forward) or dG[t] (backward), padded by one element.
  const int64_t row_bytes = ((backward ? G * H : H) + 1) * static_cast<int64_t>(sizeof(C));
  const int64_t fit_rows = w_bytes < smem_optin ? (smem_optin - w_bytes) / row_bytes : 0;
  if (fit_rows < 1) {
    plan->reason = backward ? "the W_hh slice and one row of dG do not fit in a block's shared memory"
                            : "the W_hh slice and one row of h do not fit in a block's shared memory";
    return cudaSuccess;
  }
  // Rows per tile: enough (row, unit) pairs for every thread, within B and the shared memory.
  int64_t bt = (kThreads + units - 1) / units;
  if (bt > B) bt = B;
  if (bt > fit_rows) bt = fit_rows;
  const int64_t smem = w_bytes + bt * row_bytes;
  const void* kernel = backward ? reinterpret_cast<const void*>(recurrence_persistent_bwd_kernel<S, G>)
                                : reinterpret_cast<const void*>(recurrence_persistent_fwd_kernel<S, G>);
  bool fits = false;
  const cudaError_t co = detail::co_resident(kernel, kThreads, smem, nblk, sms, plan, &fits);
  if (co != cudaSuccess || !fits) return co;
  plan->blocks = nblk;
  plan->units = units;
  plan->batch_tile = bt;
  plan->smem_bytes = smem;
  return cudaSuccess;
}

template <typename S>
cudaError_t plan_gru(int64_t B, int64_t H, int64_t blocks, bool backward, RecurrencePersistentPlan* plan) {
  return plan_impl<S, 3>(B, H, blocks, backward, plan);
}

template <typename S>
cudaError_t plan_lstm(int64_t B, int64_t H, int64_t blocks, bool backward, RecurrencePersistentPlan* plan) {
  return plan_impl<S, 4>(B, H, blocks, backward, plan);
}

// ---------------------------------------------------------------- launching

// One cooperative launch of ``kernel`` over ``a.plan.blocks`` blocks (the forward's
// and the backward's argument structs alike).
template <typename Args>
cudaError_t launch_persistent(void (*kernel)(Args), const Args& a, cudaStream_t stream) {
  if (a.T <= 0 || a.B <= 0 || a.H <= 0) return cudaSuccess;
  if (a.plan.blocks <= 0 || a.plan.units <= 0 || a.plan.batch_tile <= 0) return cudaErrorInvalidValue;
  const unsigned int grid = static_cast<unsigned int>(a.plan.blocks);
  const size_t smem = static_cast<size_t>(a.plan.smem_bytes);
#if FASTSEQ_PERSISTENT_EMULATED
  (void)stream;
  ::fastseq_emu::launch_cooperative(grid, kThreads, smem, kernel, a);
  return cudaSuccess;
#else
  Args args = a;
  void* argv[] = {&args};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(kThreads), argv,
                                     smem, stream);
#endif
}

template <typename S, int G>
cudaError_t forward_impl(const RecurrencePersistentFwd& a, cudaStream_t stream) {
  return launch_persistent(recurrence_persistent_fwd_kernel<S, G>, a, stream);
}

template <typename S, int G>
cudaError_t backward_impl(const RecurrencePersistentBwd& a, cudaStream_t stream) {
  return launch_persistent(recurrence_persistent_bwd_kernel<S, G>, a, stream);
}

template <typename S>
cudaError_t gru_bwd_impl(const RecurrencePersistentBwd& a, cudaStream_t stream) {
  return backward_impl<S, 3>(a, stream);
}

template <typename S>
cudaError_t lstm_bwd_impl(const RecurrencePersistentBwd& a, cudaStream_t stream) {
  return backward_impl<S, 4>(a, stream);
}

template <typename S>
cudaError_t gru_impl(const RecurrencePersistentFwd& a, cudaStream_t stream) {
  return forward_impl<S, 3>(a, stream);
}

template <typename S>
cudaError_t lstm_impl(const RecurrencePersistentFwd& a, cudaStream_t stream) {
  return forward_impl<S, 4>(a, stream);
}

}  // namespace

cudaError_t recurrence_persistent_plan(DType dtype, int64_t gates, int64_t B, int64_t H, int64_t blocks,
                                       bool backward, RecurrencePersistentPlan* plan) {
  if (gates == 3) FASTSEQ_DISPATCH_DTYPE(dtype, plan_gru, B, H, blocks, backward, plan);
  if (gates == 4) FASTSEQ_DISPATCH_DTYPE(dtype, plan_lstm, B, H, blocks, backward, plan);
  return cudaErrorInvalidValue;
}

cudaError_t gru_forward_persistent(DType dtype, const RecurrencePersistentFwd& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, gru_impl, a, stream);
}

cudaError_t lstm_forward_persistent(DType dtype, const RecurrencePersistentFwd& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, lstm_impl, a, stream);
}

cudaError_t gru_backward_persistent(DType dtype, const RecurrencePersistentBwd& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, gru_bwd_impl, a, stream);
}

cudaError_t lstm_backward_persistent(DType dtype, const RecurrencePersistentBwd& a, cudaStream_t stream) {
  FASTSEQ_DISPATCH_DTYPE(dtype, lstm_bwd_impl, a, stream);
}

#if FASTSEQ_PERSISTENT_EMULATED
int64_t emulated_grid_syncs() { return ::fastseq_emu::grid_sync_count(); }
#endif

}  // namespace cuda
}  // namespace fastseq
