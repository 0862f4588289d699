// The tensor-core persistent forward and backward of the GRU and LSTM
// recurrences: one cooperative launch runs all T steps of one layer and
// direction, the forward with W_hh held in REGISTERS as warp-level MMA operands,
// the backward with W_hh^T's rows of the block's units in shared memory
// (kernels.h, "The tensor-core persistent forward" / "backward", for the
// contracts and when they apply; the backward's work split is at
// recurrence_persistent_mma_bwd_kernel).
//
// Why registers: the per-step product h_{t-1} W_hh^T is tiny (2 B G H^2 FLOP:
// 38 MFLOP at B 16, H 768, LSTM) and the step is latency-bound. Re-reading W_hh
// from L2 every step (the per-step kernels) costs 2 us at H = 768, from shared
// memory (persistent_kernels.cu, and the Triton W-resident kernel, whose two
// warpgroups each read all of it) ~1.3 us; spread over the register files of
// ~100 SMs it costs nothing per step: 4.7 MB of bf16 W_hh is 48 KB per SM at
// 96 blocks, a quarter of an SM's 256 KB of registers. (bench/NOTES.md, v0.9,
// has the model.)
//
// Work split, block k of `blocks` (256 threads, 8 warps):
//   * it owns the hidden units j in [k * units, (k + 1) * units) and all G
//     gates of each: the R = G * units rows r = g * units + jj of W_hh
//     (row g * H + j0 + jj), padded with zero rows to 16 * MT (MT = m_tiles);
//   * K = H (padded with zeros to a multiple of 16) is split among the warps:
//     warp w holds the 16 x 16 tiles of its rows for k-tiles
//     [w * kpw, (w + 1) * kpw) as wmma matrix_a fragments, loaded once (staged
//     through shared memory to zero the padding) and kept for all T steps;
//   * per step, for each 16 batch rows, warp w multiplies its tiles by the
//     matching 16 x 16 tiles of h_{t-1} (matrix_b, column major: h_op rows are
//     batch rows) straight from global memory (L2), accumulating in float, and
//     stores its partial sums [16 * MT, 16] to shared memory;
//   * __syncthreads, then one thread per (row b, unit jj) sums the warps'
//     partials of its G gates and runs detail::persistent_forward_element (the
//     gate formulas of gates.cuh; it also writes h_t in the storage dtype to
//     h_op[t & 1] for the next step's product); the element's other inputs (gi,
//     b_hh, lengths, c and h of t-1: detail::load_forward_inputs) were loaded at
//     the top of the step, before the product, for the thread's first kPrefetch
//     elements, so their round trip to L2 / HBM overlaps the product;
//   * a grid barrier, then the next step.
//
// Why one barrier per step is enough: step t reads h_op[(t-1) & 1] and writes
// h_op[t & 1] (and h_state[t & 1]); step t+1 writes the buffer step t read
// only after the barrier that ends step t. The shared partial sums of step
// t+1 are written after that barrier too, so after every thread of the block
// read step t's. The LSTM's c_state is per unit (one block).
//
// The tagged exchange (TG; plan.tagged, FASTSEQ_CUDA_PERSISTENT_SYNC=tagged): no grid barrier.
// h_t goes to h_tagged[t & 1] as 32-bit words, (step tag << 16) | the 16 bits of h in the
// storage dtype, each stored relaxed at gpu scope (single-copy atomic); a warp reads its
// 16 x 16 tiles of h_{t-1} with relaxed loads (all of its k-tiles in flight at once), re-reads
// any group of 4 words whose tags are not (t - 1) & 0xFFFF, unpacks them into its staging
// tiles in shared memory and loads its fragments from there. The data is its own flag
// (NCCL's LL protocol): no fence, no flag and no counter on the step's critical path; the
// price is twice the bytes of the h read. Why two buffers are enough without a barrier: a
// block writes h_tagged[t & 1] at step t only after it read all of h_{t-1} of its row tile,
// written by each of the tile's blocks after that block's __syncthreads that followed its
// reads of h_{t-2} from h_tagged[t & 1] (and those words depend on the values read, so
// the reads are done: the ordering NCCL's LL protocol relies on too); the tags of step t - 2
// and t differ. Hence every block must own a unit: a block that only read would not be
// waited for, and a fast block could overwrite words it has not read yet (the plan drops
// such blocks; the emulation hung on them before it did). Padding rows
// and columns (b >= B, j >= H) are never written or read (zeros in the tile). The host puts
// h0 in h_tagged[1] with tag 0xFFFF (step -1) and tag 0xFFFE in h_tagged[0], so no word is
// taken for step 0 before it is written; the 16-bit tags repeat every 65,536 steps, and the
// stale words a reader can meet are two steps old.
//
// Under FASTSEQ_CUDA_HOST_EMULATION (tests) wmma is emu/host_emulation.h's
// stand-in and the launch is fastseq_emu::launch_cooperative (a real grid
// barrier). On devices before sm_80 (no bf16 MMA) the kernels compile empty and
// the plan refuses them.
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "persistent_common.cuh"

#if !FASTSEQ_PERSISTENT_EMULATED
#include <mma.h>
#endif

namespace fastseq {
namespace cuda {
namespace {

#if FASTSEQ_PERSISTENT_EMULATED
namespace wmma = ::fastseq_emu::wmma;
using detail::kSm90SmemOptin;
// The emulated device of this kernel has more SMs than persistent_kernels.cu's
// (8), so that the tests reach two k-tiles per warp (H > 128 needs >= 17 blocks
// of <= 8 LSTM units).
constexpr int64_t kEmulatedMmaSMs = 32;
#else
namespace wmma = nvcuda::wmma;
#endif

using detail::acc_t;
using detail::from_acc;
using detail::grid_sync;

constexpr int kMmaThreads = 256;
constexpr int kMmaWarps = kMmaThreads / 32;
constexpr int64_t kMmaMaxRows = 32;      // W_hh rows per block: G * units <= 32 (m_tiles <= 2)
constexpr int64_t kMmaMaxRowsSplit = 64; // the forward with batch row tiles: G * units <= 64 (m_tiles <= 4)
constexpr int64_t kRowTile = 32;         // the forward's default rows per batch tile when it splits the batch
constexpr int64_t kMmaMaxH = 1024;       // K tiles per warp <= 8
constexpr int kTile = 16;
constexpr int kBwdBatchTiles = 4;        // the backward's 16-row batch tiles per pass over W^T
constexpr int64_t kBwdDefaultUnits = 16; // the backward's units per block: one 16-row tile of W_hh^T
// The forward's elements (row, unit) per thread whose step inputs are loaded before the product
// (3: the default plans up to B 64, blocks of <= 32 / G units for <= 32 rows or of <= 64 / G units
// for 32 rows, have at most 3 per thread of the 256; past them, the inputs are loaded after the
// product).
constexpr int kPrefetch = 3;
// The backward's elements (row, unit) per thread whose step inputs are loaded during the previous
// step's product (4: B <= 64 with the default 16-unit blocks).
constexpr int kBwdPrefetch = 4;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FASTSEQ_MMA_AVAILABLE 1
#else
#define FASTSEQ_MMA_AVAILABLE 0
#endif

// Row pitches in shared memory. A 16-bit operand row of `cols` elements (a multiple of 16)
// takes cols + 8: an odd number of 16-byte units, so the 8 rows that one phase of a fragment
// load reads (LDSM / the bfloat16 loads) fall in 8 different bank quads. A float partial-sum
// row of `cols` floats (a multiple of 16) takes cols + 8: the accumulator stores' half-warp
// phases (4 rows x 4 lanes x 8 bytes) then cover 32 different banks. With the unpadded
// pitches (multiples of 128 bytes at most sizes) both were up to 8-way bank conflicts
// (emu/host_emulation.h measures them: tests/test_cuda_compile.py; bench/NOTES.md v0.14).
// The pitches keep every fragment pointer 32-byte aligned (wmma's requirement).
__host__ __device__ inline int64_t operand_pitch(int64_t cols) { return cols + 8; }
__host__ __device__ inline int64_t partial_pitch(int64_t cols) { return cols + 8; }

// The tagged forward's staging tiles: 16 rows of h_{t-1} x 16 columns per k-tile, at the
// conflict-free operand pitch; a warp's tiles follow the partial sums (at a 128-byte boundary).
constexpr int64_t kStagePitch = 16 + 8;
__host__ __device__ inline int64_t tagged_stage_offset(int64_t partial_bytes) { return (partial_bytes + 127) / 128 * 128; }
__host__ __device__ inline int64_t tagged_stage_bytes(int64_t kpw, int64_t elem) {
  return kMmaWarps * kpw * kTile * kStagePitch * elem;
}

// The 16 bits of a half / bfloat16 value, and back.
template <typename S>
FASTSEQ_DEVICE unsigned int half_bits(S v) {
  unsigned short u;
  memcpy(&u, &v, sizeof(u));
  return u;
}
template <typename S>
FASTSEQ_DEVICE S bits_half(unsigned int u) {
  const unsigned short x = static_cast<unsigned short>(u & 0xFFFFu);
  S v;
  memcpy(&v, &x, sizeof(x));
  return v;
}

// Bytes of a W_hh (W_hh^T) slice of `rows` rows of `pitch` elements in shared memory, rounded
// up to 32 (what follows it is 32-byte aligned).
__host__ __device__ inline int64_t mma_bwd_slice_bytes(int64_t rows, int64_t pitch, int64_t elem) {
  return (rows * pitch * elem + 31) / 32 * 32;
}

// The backward's carried dh of the block's units in shared memory, [B][units + 1] floats (the odd
// pitch: phase 2's threads take consecutive rows of one unit, phase 1's consecutive units of one
// row, both without bank conflicts), after the partial sums: its bytes.
__host__ __device__ inline int64_t mma_bwd_dh_bytes(int64_t units, int64_t B) { return (B * (units + 1) * 4 + 15) / 16 * 16; }

template <typename S, int G, int MT, int KPW, bool TG>
__global__ void __launch_bounds__(kMmaThreads, 1) recurrence_persistent_mma_fwd_kernel(RecurrencePersistentFwd a) {
#if FASTSEQ_MMA_AVAILABLE
  using C = acc_t<S>;  // float
  const int64_t T = a.T, B = a.B, H = a.H;
  const int64_t J = a.plan.units;
  const int64_t R = a.plan.row_tiles > 0 ? a.plan.row_tiles : 1;  // batch row tiles
  const int64_t ublocks = static_cast<int64_t>(gridDim.x) / R;    // blocks per row tile
  const int64_t kb = static_cast<int64_t>(blockIdx.x) % ublocks, rt = static_cast<int64_t>(blockIdx.x) / ublocks;
  const int64_t j0 = kb * J;
  const int64_t nj = j0 < H ? (H - j0 < J ? H - j0 : J) : 0;  // units of this block
  const int64_t Kp = a.ld_op, Bp = a.rows_op;                   // H and B rounded up to 16
  const int64_t Br = a.plan.batch_tile, r0 = rt * Br;           // this block's rows [r0, r0 + Br)
  const int64_t nb = B - r0 < 0 ? 0 : (B - r0 < Br ? B - r0 : Br);      // of them real
  const int64_t nbp = Bp - r0 < 0 ? 0 : (Bp - r0 < Br ? Bp - r0 : Br);  // of them in the operand
  constexpr int64_t MR = MT * kTile;                            // rows of the W_hh slice, padded
  const int64_t kt = Kp / kTile;
  const int64_t kpw = a.plan.k_tiles_per_warp;                  // <= KPW
  const int warp = threadIdx.x / 32, tid = threadIdx.x, nthr = blockDim.x;
  const int64_t k_first = warp * kpw;
  const int64_t nk = kt - k_first < 0 ? 0 : (kt - k_first < kpw ? kt - k_first : kpw);
  const int64_t active_warps = (kt + kpw - 1) / kpw;

  FASTSEQ_DYNAMIC_SMEM(smem);

  // The W_hh slice [MR, Kp] (row pitch wp), zero-padded, staged in shared memory once and
  // loaded into this warp's fragments; the shared memory then holds the partial sums.
  const int64_t wp = operand_pitch(Kp), rp = partial_pitch(Br);
  S* w_s = reinterpret_cast<S*>(smem);
  const S* w = static_cast<const S*>(a.w_hh);
  for (int64_t idx = tid; idx < MR * wp; idx += nthr) {
    const int64_t r = idx / wp, k = idx - r * wp;
    const int64_t g = r / J, jj = r - g * J;
    const bool in = g < G && jj < nj && k < H;
    w_s[idx] = in ? w[(g * H + j0 + jj) * H + k] : from_acc<S>(C(0));
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, S, wmma::row_major> wf[MT][KPW];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int kk = 0; kk < KPW; ++kk) {
      if (kk < nk) wmma::load_matrix_sync(wf[m][kk], w_s + m * kTile * wp + (k_first + kk) * kTile, wp);
    }
  }
  __syncthreads();  // every warp has its fragments: the shared memory is free

  float* red = reinterpret_cast<float*>(smem);  // [active_warps][MR][Br], row pitch rp
  C* h_state = static_cast<C*>(a.h_state);
  S* h_op = static_cast<S*>(a.h_op);
  // TG: this warp's staging tiles [kpw][16][kStagePitch] after the partial sums.
  S* stage = reinterpret_cast<S*>(smem + tagged_stage_offset(active_warps * MR * rp * 4)) +
             warp * kpw * kTile * kStagePitch;
  const int lane = tid % 32;
  // Elements whose inputs are loaded before the product: none in the tagged kernels with 8 k-tiles
  // per warp, whose loads of h_{t-1} in flight already take 250-255 registers.
  constexpr int PF = TG && KPW == 8 ? 0 : kPrefetch;

  for (int64_t t = 0; t < T; ++t) {
    const S* op_prev = h_op + ((t + 1) & 1) * Bp * Kp;  // h_{t-1} (h0 at t = 0), storage dtype
    S* op_next = h_op + (t & 1) * Bp * Kp;
    const unsigned int* tg_prev = TG ? a.h_tagged + ((t + 1) & 1) * Bp * Kp : nullptr;
    unsigned int* tg_next = TG ? a.h_tagged + (t & 1) * Bp * Kp : nullptr;
    const C* h_prev = h_state + ((t + 1) & 1) * B * H;
    C* h_next = h_state + (t & 1) * B * H;
    // The step's inputs that do not depend on its product (gi, b_hh, lengths, the LSTM's c_{t-1}
    // and the float h_{t-1}: load_forward_inputs) for this thread's first PF elements,
    // loaded now, so that their way to L2 / HBM overlaps the product instead of following it.
    detail::ForwardElementInputs<C, G> pre[PF > 0 ? PF : 1];
    C pre_h[PF > 0 ? PF : 1];
#pragma unroll
    for (int i = 0; i < PF; ++i) {
      const int64_t p = tid + i * nthr;
      if (p < nj * nb) {
        const int64_t jj = p / nb, b = r0 + (p - jj * nb);
        detail::load_forward_inputs<S, G>(a, t, b, j0 + jj, &pre[i]);
        pre_h[i] = h_prev[b * H + j0 + jj];
      }
    }
    if (warp < active_warps) {
      for (int64_t n0 = 0; n0 < nbp; n0 += kTile) {
        if constexpr (TG) {
          // Lane l: row l / 2 of the 16, columns (l % 2) * 8 .. + 8 of each k-tile; every load is
          // issued before any tag is checked (all in flight), then the groups read too early again.
          const unsigned int want = static_cast<unsigned int>((t - 1) & 0xFFFF);
          const int64_t row = r0 + n0 + lane / 2, c0 = (lane % 2) * 8;
          unsigned int v[KPW][8];
#pragma unroll
          for (int kk = 0; kk < KPW; ++kk) {
            const int64_t col = (k_first + kk) * kTile + c0;
            if (kk < nk && row < B) {
              detail::load_relaxed4(tg_prev + row * Kp + col, v[kk]);
              detail::load_relaxed4(tg_prev + row * Kp + col + 4, v[kk] + 4);
            }
          }
          bool ready = false;
          while (!ready) {
            ready = true;
#pragma unroll
            for (int kk = 0; kk < KPW; ++kk) {
              const int64_t col = (k_first + kk) * kTile + c0;
#pragma unroll
              for (int q = 0; q < 2; ++q) {
                if (kk < nk && row < B) {
                  bool ok = true;
#pragma unroll
                  for (int e = 0; e < 4; ++e) ok = ok && (col + 4 * q + e >= H || (v[kk][4 * q + e] >> 16) == want);
                  if (!ok) {
                    ready = false;
                    detail::load_relaxed4(tg_prev + row * Kp + col + 4 * q, v[kk] + 4 * q);
                  }
                }
              }
            }
            if (!ready) {
              if (!detail::spinning_allowed()) break;  // emulation without barriers only
              detail::spin_pause();
            }
          }
#pragma unroll
          for (int kk = 0; kk < KPW; ++kk) {
            if (kk < nk) {
              const int64_t col = (k_first + kk) * kTile + c0;
              S* dst = stage + (kk * kTile + lane / 2) * kStagePitch + c0;
#pragma unroll
              for (int e = 0; e < 8; ++e)
                dst[e] = row < B && col + e < H ? bits_half<S>(v[kk][e]) : from_acc<S>(C(0));
            }
          }
          __syncwarp();
        }
        wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) wmma::fill_fragment(acc[m], 0.0f);
#pragma unroll
        for (int kk = 0; kk < KPW; ++kk) {
          if (kk < nk) {
            wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, S, wmma::col_major> hb;
            if constexpr (TG)
              wmma::load_matrix_sync(hb, stage + kk * kTile * kStagePitch, kStagePitch);
            else
              wmma::load_matrix_sync(hb, op_prev + (r0 + n0) * Kp + (k_first + kk) * kTile, Kp);
#pragma unroll
            for (int m = 0; m < MT; ++m) wmma::mma_sync(acc[m], wf[m][kk], hb, acc[m]);
          }
        }
        if constexpr (TG) __syncwarp();  // the staging tiles are read before the next 16 rows
#pragma unroll
        for (int m = 0; m < MT; ++m)
          wmma::store_matrix_sync(red + (warp * MR + m * kTile) * rp + n0, acc[m], rp, wmma::mem_row_major);
      }
    }
    __syncthreads();
    // Element p: consecutive threads take consecutive rows of one unit.
    const auto element = [&](int64_t p, const detail::ForwardElementInputs<C, G>& in, C hp) {
      const int64_t jj = p / nb, bl = p - jj * nb, b = r0 + bl, j = j0 + jj;
      C acc[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        C s = C(0);
        for (int64_t w8 = 0; w8 < active_warps; ++w8) s += red[(w8 * MR + g * J + jj) * rp + bl];
        acc[g] = s;
      }
      const C h = detail::persistent_forward_element<S, G>(a, t, b, j, in, acc, hp, h_next, TG ? nullptr : op_next);
      if constexpr (TG)
        detail::store_relaxed(tg_next + b * Kp + j,
                              (static_cast<unsigned int>(t & 0xFFFF) << 16) | half_bits(from_acc<S>(h)));
    };
#pragma unroll
    for (int i = 0; i < PF; ++i) {
      if (tid + i * nthr < nj * nb) element(tid + i * nthr, pre[i], pre_h[i]);
    }
    for (int64_t p = tid + PF * nthr; p < nj * nb; p += nthr) {  // past the prefetched elements
      const int64_t jj = p / nb, b = r0 + (p - jj * nb);
      detail::ForwardElementInputs<C, G> in;
      detail::load_forward_inputs<S, G>(a, t, b, j0 + jj, &in);
      element(p, in, h_prev[b * H + j0 + jj]);
    }
    if constexpr (TG) {
      __syncthreads();  // the partial sums are read before the next step writes them
    } else {
      if (t + 1 < T) grid_sync();  // every block's h_t written before any block reads it
    }
  }
#endif
}

// The kernel for a plan's (m_tiles, k_tiles_per_warp, tagged): KPW is the smallest of 2, 4, 8
// that holds it; the tagged exchange only with m_tiles <= 2 (the plan keeps it there).
template <typename S, int G, int MT, bool TG>
auto kernel_for_kpw(int64_t kpw) -> void (*)(RecurrencePersistentFwd) {
  if (kpw <= 2) return recurrence_persistent_mma_fwd_kernel<S, G, MT, 2, TG>;
  if (kpw <= 4) return recurrence_persistent_mma_fwd_kernel<S, G, MT, 4, TG>;
  return recurrence_persistent_mma_fwd_kernel<S, G, MT, 8, TG>;
}

template <typename S, int G>
auto kernel_for(int64_t m_tiles, int64_t kpw, bool tagged) -> void (*)(RecurrencePersistentFwd) {
  if (tagged) return m_tiles == 1 ? kernel_for_kpw<S, G, 1, true>(kpw) : kernel_for_kpw<S, G, 2, true>(kpw);
  if (m_tiles == 1) return kernel_for_kpw<S, G, 1, false>(kpw);
  if (m_tiles == 2) return kernel_for_kpw<S, G, 2, false>(kpw);
  if (m_tiles == 3) return kernel_for_kpw<S, G, 3, false>(kpw);
  return kernel_for_kpw<S, G, 4, false>(kpw);
}

// Phase 1 of the tensor-core backwards (the block and the cluster kernel): the gate gradients of
// the block's units for every row (persistent_backward_element), with
//   * the carried dh of those units in shared memory (dh_s, [B][units + 1] floats: phase 2 adds
//     its sums there, so phase 1 reads it without a round trip to L2; copied in from a.dh at the
//     start and out at the end),
//   * the step's other inputs (load_backward_inputs) of this thread's first kBwdPrefetch elements
//     loaded during the previous step's product (prefetch(t - 1) right after the grid barrier of
//     step t), so that phase 1 starts with them in registers.
// Element p: row b = p / nj, unit j0 + p % nj (consecutive threads: consecutive units of one row).
template <typename S, int G>
struct BackwardPhase1 {
  using C = acc_t<S>;
  const RecurrencePersistentBwd& a;
  const int64_t j0, nj, J;
  float* const dh_s;
  const int tid, nthr;
  detail::BackwardElementInputs<C, G> pre[kBwdPrefetch];

  FASTSEQ_DEVICE float* dh_at(int64_t p) const {
    const int64_t b = p / nj;
    return dh_s + b * (J + 1) + (p - b * nj);
  }

  FASTSEQ_DEVICE void prefetch(int64_t t) {
#pragma unroll
    for (int i = 0; i < kBwdPrefetch; ++i) {
      const int64_t p = tid + i * nthr;
      if (p < a.B * nj) detail::load_backward_inputs<S, G>(a, t, p / nj, j0 + p % nj, &pre[i]);
    }
  }

  // Before the first step: dh in, step T-1's inputs on their way.
  FASTSEQ_DEVICE void start() {
    const float* dh = static_cast<const float*>(a.dh);
    for (int64_t p = tid; p < a.B * nj; p += nthr) *dh_at(p) = dh[(p / nj) * a.H + j0 + p % nj];
    if (a.T > 0) prefetch(a.T - 1);
  }

  // Step t; op_t: the product operand dG[t] (row pitch Kp).
  FASTSEQ_DEVICE void run(int64_t t, S* op_t, int64_t Kp) {
#pragma unroll
    for (int i = 0; i < kBwdPrefetch; ++i) {
      const int64_t p = tid + i * nthr;
      if (p < a.B * nj)
        detail::persistent_backward_element<S, G>(a, t, p / nj, j0 + p % nj, pre[i], dh_at(p), op_t + (p / nj) * Kp);
    }
    for (int64_t p = tid + kBwdPrefetch * nthr; p < a.B * nj; p += nthr) {  // past the prefetched elements
      detail::BackwardElementInputs<C, G> in;
      detail::load_backward_inputs<S, G>(a, t, p / nj, j0 + p % nj, &in);
      detail::persistent_backward_element<S, G>(a, t, p / nj, j0 + p % nj, in, dh_at(p), op_t + (p / nj) * Kp);
    }
  }

  // After the last step (phase 2's sums of step 0 added by other threads): dh out.
  FASTSEQ_DEVICE void finish() {
    __syncthreads();
    float* dh = static_cast<float*>(a.dh);
    for (int64_t p = tid; p < a.B * nj; p += nthr) dh[(p / nj) * a.H + j0 + p % nj] = *dh_at(p);
  }
};


// The backward (t = T-1 .. 0; kernels.h, "The tensor-core persistent backward").
// Block k owns units j in [k * units, (k + 1) * units) and keeps W_hh^T's rows of
// them, w_s[jj][r] = W_hh[r][j0 + jj] for r < G*H, zero-padded to [16 * MT, ld_op],
// in shared memory for all T steps. Per step:
//   phase 1: dG[t] of its units for every row (persistent_backward_element: dg,
//     dg_s, dh, dc and the product operand dg_op[t & 1] in the storage dtype;
//     BackwardPhase1: the step's inputs loaded during step t+1's product, the
//     carried dh of the block's units in shared memory);
//   grid barrier: all of dG[t] written;
//   phase 2: warp w multiplies its k-tiles [w * kpw, (w + 1) * kpw) of w_s (matrix_a,
//     row major, loaded from shared memory once per 64 batch rows) by the
//     matching 16 x 16 tiles of dG[t]^T (matrix_b, column major: dg_op rows are
//     batch rows, from global memory / L2) for up to 4 tiles of 16 batch rows
//     at a time, float32 accumulation in registers; the partial
//     sums [16 * MT, rows_op] go to shared memory after the slice, and one thread
//     per (unit jj, row b) adds the warps' sums to the carried dh (dh_s).
// One barrier per step is enough: phase 1 of step t-1 writes dg_op[(t-1) & 1],
// not the dg_op[t & 1] that slower blocks may still read in phase 2 of step t,
// and it cannot reach step t-2 (which rewrites dg_op[t & 1]) before every block
// has passed the barrier of step t-1, i.e. finished phase 2 of step t. dh and dc
// of a unit are read and written by its own block only (phase 2 of step t+1
// before phase 1 of step t: the __syncthreads at the top of the loop).
template <typename S, int G, int MT>
__global__ void __launch_bounds__(kMmaThreads, 1) recurrence_persistent_mma_bwd_kernel(RecurrencePersistentBwd a) {
#if FASTSEQ_MMA_AVAILABLE
  const int64_t T = a.T, B = a.B, H = a.H, GH = G * H;
  const int64_t J = a.plan.units;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * J;
  const int64_t nj = j0 < H ? (H - j0 < J ? H - j0 : J) : 0;  // units of this block
  const int64_t Kp = a.ld_op, Bp = a.rows_op;                   // G*H and B rounded up to 16
  constexpr int64_t MR = MT * kTile;                            // rows of the W_hh^T slice, padded
  const int64_t kt = Kp / kTile;
  const int64_t kpw = a.plan.k_tiles_per_warp;
  const int warp = threadIdx.x / 32, tid = threadIdx.x, nthr = blockDim.x;
  const int64_t k_first = warp * kpw;
  const int64_t nk = kt - k_first < 0 ? 0 : (kt - k_first < kpw ? kt - k_first : kpw);
  const int64_t active_warps = (kt + kpw - 1) / kpw;

  FASTSEQ_DYNAMIC_SMEM(smem);
  const int64_t wp = operand_pitch(Kp), rp = partial_pitch(Bp);
  S* w_s = reinterpret_cast<S*>(smem);  // [MR, Kp], row pitch wp
  float* red = reinterpret_cast<float*>(smem + mma_bwd_slice_bytes(MR, wp, sizeof(S)));  // [active_warps][MR][Bp], pitch rp
  const S* w = static_cast<const S*>(a.w_hh);
  for (int64_t idx = tid; idx < MR * wp; idx += nthr) {
    const int64_t jj = idx / wp, r = idx - jj * wp;
    w_s[idx] = jj < nj && r < GH ? w[r * H + j0 + jj] : from_acc<S>(0.0f);
  }
  S* dg_op = static_cast<S*>(a.dg_op);
  float* dh_s = red + active_warps * MR * rp;  // [B][J + 1]: the carried dh of this block's units
  BackwardPhase1<S, G> phase1{a, j0, nj, J, dh_s, tid, nthr, {}};
  phase1.start();

  for (int64_t t = T - 1; t >= 0; --t) {
    __syncthreads();  // phase 2 of step t+1 (and the slice) done by this block's threads
    S* op_t = dg_op + (t & 1) * Bp * Kp;
    phase1.run(t, op_t, Kp);
    grid_sync();  // all of dG[t] written before any block reads it
    if (t > 0) phase1.prefetch(t - 1);  // step t-1's inputs, on their way during this step's product
    if (nj == 0) continue;
    if (warp < active_warps) {
      // kBwdBatchTiles batch tiles at a time, so that each W^T tile is read from shared
      // memory once per 16 * kBwdBatchTiles rows (once per step for B <= 64).
      for (int64_t n0 = 0; n0 < Bp; n0 += kBwdBatchTiles * kTile) {
        const int64_t nt = (Bp - n0) / kTile < kBwdBatchTiles ? (Bp - n0) / kTile : kBwdBatchTiles;
        wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc[MT][kBwdBatchTiles];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
#pragma unroll
          for (int n = 0; n < kBwdBatchTiles; ++n) wmma::fill_fragment(acc[m][n], 0.0f);
        }
        for (int64_t kk = 0; kk < nk; ++kk) {
          const int64_t k0 = (k_first + kk) * kTile;
          wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, S, wmma::row_major> wa[MT];
#pragma unroll
          for (int m = 0; m < MT; ++m) wmma::load_matrix_sync(wa[m], w_s + m * kTile * wp + k0, wp);
#pragma unroll
          for (int n = 0; n < kBwdBatchTiles; ++n) {
            if (n < nt) {
              wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, S, wmma::col_major> db;
              wmma::load_matrix_sync(db, op_t + (n0 + n * kTile) * Kp + k0, Kp);
#pragma unroll
              for (int m = 0; m < MT; ++m) wmma::mma_sync(acc[m][n], wa[m], db, acc[m][n]);
            }
          }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
#pragma unroll
          for (int n = 0; n < kBwdBatchTiles; ++n) {
            if (n < nt)
              wmma::store_matrix_sync(red + (warp * MR + m * kTile) * rp + n0 + n * kTile, acc[m][n], rp,
                                      wmma::mem_row_major);
          }
        }
      }
    }
    __syncthreads();
    for (int64_t p = tid; p < nj * B; p += nthr) {
      const int64_t jj = p / B, b = p - jj * B;  // consecutive threads: consecutive rows b of the partials
      float sum = 0.0f;
      for (int64_t w8 = 0; w8 < active_warps; ++w8) sum += red[(w8 * MR + jj) * rp + b];
      dh_s[b * (J + 1) + jj] += sum;
    }
  }
  phase1.finish();
#endif
}

#if FASTSEQ_PERSISTENT_EMULATED || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define FASTSEQ_CLUSTER_AVAILABLE 1
#else
#define FASTSEQ_CLUSTER_AVAILABLE 0
#endif

// The cluster backward (sm_90; kernels.h, "The cluster backward"): the same steps as
// recurrence_persistent_mma_bwd_kernel, with the product split along K inside a
// thread-block cluster of CL = plan.cluster blocks, so that each block reads 1 / CL of
// dG[t] from L2 instead of all of it (the term that dominates the block kernel's step:
// bench/NOTES.md v0.14).
//   * Block k (rank q = k % CL in cluster c = k / CL) still owns units
//     [k * units, (k + 1) * units) for phase 1 and for dh. The cluster owns the CL * units
//     columns n of W_hh starting at c * CL * units (its blocks' units), padded to
//     MR = 16 * m_tiles rows of W_hh^T.
//   * Rank q holds the k-tiles [q * ktr, (q + 1) * ktr) of K = G*H (ktr =
//     plan.k_tiles_per_warp: here the k-tiles per rank) for all the cluster's columns:
//     w_s[n][kk] = W_hh[q * 16 * ktr + kk][c0 + n] in shared memory, zero-padded.
//   * Phase 2: warp w takes m-tile w % m_tiles and the (w / m_tiles)-th of the
//     kparts = 8 / m_tiles contiguous pieces of the rank's k-tiles; its sums over those
//     tiles for up to 4 tiles of 16 batch rows at a time go to red[part][MR][rows_op]
//     in its block's shared memory. No two warps write the same partial sum.
//   * A cluster barrier, then one thread per (unit jj, row b) of the block's units adds
//     the partial sums of all CL ranks and kparts pieces, read through distributed
//     shared memory, to the carried dh (dh_s; phase 1 as the block kernel's: BackwardPhase1).
// Barriers per step: the grid barrier (dG[t] complete) and one cluster barrier (the
// partial sums complete). The partial sums need no second buffer: rank q rewrites
// red in phase 2 of step t-1 only after the grid barrier of step t-1, which every
// block of the cluster reaches only after it has read (and used) step t's sums. A
// last cluster barrier keeps every block resident until the others stopped reading
// its shared memory.
template <typename S, int G>
__global__ void __launch_bounds__(kMmaThreads, 1)
    recurrence_persistent_mma_cluster_bwd_kernel(RecurrencePersistentBwd a) {
#if FASTSEQ_MMA_AVAILABLE && FASTSEQ_CLUSTER_AVAILABLE
  const int64_t T = a.T, B = a.B, H = a.H, GH = G * H;
  const int64_t J = a.plan.units, CL = a.plan.cluster;
  const int64_t k = static_cast<int64_t>(blockIdx.x);
  const int64_t q = static_cast<int64_t>(detail::cluster_rank());
  const int64_t j0 = k * J;
  const int64_t nj = j0 < H ? (H - j0 < J ? H - j0 : J) : 0;  // units of this block
  const int64_t c0 = (k - q) * J;                               // the cluster's first column
  const int64_t nc = c0 < H ? (H - c0 < CL * J ? H - c0 : CL * J) : 0;  // its columns
  const int64_t Kp = a.ld_op, Bp = a.rows_op;                   // G*H and B rounded up to 16
  const int64_t mt = a.plan.m_tiles, MR = mt * kTile;
  const int64_t kt = Kp / kTile;
  const int64_t ktr = a.plan.k_tiles_per_warp;                  // k-tiles per rank
  const int64_t kr0 = q * ktr;
  const int64_t nkr = kt - kr0 < 0 ? 0 : (kt - kr0 < ktr ? kt - kr0 : ktr);
  const int64_t ldw = operand_pitch(ktr * kTile), rp = partial_pitch(Bp);  // row pitches
  const int64_t kparts = kMmaWarps / mt;
  const int warp = threadIdx.x / 32, tid = threadIdx.x, nthr = blockDim.x;
  const int64_t m = warp % mt, part = warp / mt;
  const int64_t kpp = (nkr + kparts - 1) / kparts;
  const int64_t kk0 = part * kpp;
  const int64_t nkk = nkr - kk0 < 0 ? 0 : (nkr - kk0 < kpp ? nkr - kk0 : kpp);

  FASTSEQ_DYNAMIC_SMEM(smem);
  S* w_s = reinterpret_cast<S*>(smem);  // [MR, ldw]
  float* red = reinterpret_cast<float*>(smem + mma_bwd_slice_bytes(MR, ldw, sizeof(S)));  // [kparts][MR][Bp], pitch rp
  const S* w = static_cast<const S*>(a.w_hh);
  for (int64_t idx = tid; idx < MR * ldw; idx += nthr) {
    const int64_t n = idx / ldw, kk = idx - n * ldw, r = kr0 * kTile + kk;
    w_s[idx] = n < nc && kk < nkr * kTile && r < GH ? w[r * H + c0 + n] : from_acc<S>(0.0f);
  }
  S* dg_op = static_cast<S*>(a.dg_op);
  float* dh_s = red + kparts * MR * rp;  // [B][J + 1]: the carried dh of this block's units
  BackwardPhase1<S, G> phase1{a, j0, nj, J, dh_s, tid, nthr, {}};
  phase1.start();

  for (int64_t t = T - 1; t >= 0; --t) {
    __syncthreads();  // this block's reads of dh (step t+1) done; the slice written
    S* op_t = dg_op + (t & 1) * Bp * Kp;
    phase1.run(t, op_t, Kp);
    grid_sync();  // all of dG[t] written before any block reads it
    if (t > 0) phase1.prefetch(t - 1);  // step t-1's inputs, on their way during this step's product
    if (part < kparts) {
      for (int64_t n0 = 0; n0 < Bp; n0 += kBwdBatchTiles * kTile) {
        const int64_t nt = (Bp - n0) / kTile < kBwdBatchTiles ? (Bp - n0) / kTile : kBwdBatchTiles;
        wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc[kBwdBatchTiles];
#pragma unroll
        for (int n = 0; n < kBwdBatchTiles; ++n) wmma::fill_fragment(acc[n], 0.0f);
        for (int64_t kk = kk0; kk < kk0 + nkk; ++kk) {
          wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, S, wmma::row_major> wa;
          wmma::load_matrix_sync(wa, w_s + m * kTile * ldw + kk * kTile, ldw);
#pragma unroll
          for (int n = 0; n < kBwdBatchTiles; ++n) {
            if (n < nt) {
              wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, S, wmma::col_major> db;
              wmma::load_matrix_sync(db, op_t + (n0 + n * kTile) * Kp + (kr0 + kk) * kTile, Kp);
              wmma::mma_sync(acc[n], wa, db, acc[n]);
            }
          }
        }
#pragma unroll
        for (int n = 0; n < kBwdBatchTiles; ++n) {
          if (n < nt)
            wmma::store_matrix_sync(red + (part * MR + m * kTile) * rp + n0 + n * kTile, acc[n], rp,
                                    wmma::mem_row_major);
        }
      }
    }
    detail::cluster_sync();  // every rank's partial sums written
    for (int64_t p = tid; p < nj * B; p += nthr) {
      const int64_t jj = p / B, b = p - jj * B;  // consecutive threads: consecutive rows b of the partials
      const int64_t n = q * J + jj;              // this unit's column in the cluster
      float sum = 0.0f;
      for (int64_t r = 0; r < CL; ++r) {
        const float* rr = detail::cluster_map(red, static_cast<unsigned int>(r));
        for (int64_t pp = 0; pp < kparts; ++pp) sum += rr[(pp * MR + n) * rp + b];
      }
      dh_s[b * (J + 1) + jj] += sum;
    }
  }
  phase1.finish();
  detail::cluster_sync();  // no block exits while another may still read its shared memory
#endif
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The device's limits (cooperative launch, SMs, opt-in shared memory; sm_80+), or the
// emulated device's; false with plan->reason when it cannot run these kernels.
cudaError_t device_limits(int64_t* sms, int64_t* smem_optin, RecurrencePersistentPlan* plan, bool* ok) {
  *ok = false;
#if FASTSEQ_PERSISTENT_EMULATED
  *sms = kEmulatedMmaSMs;
  *smem_optin = kSm90SmemOptin;
#else
  int dev = 0, coop = 0, sm_count = 0, optin = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (major < 8) {
    plan->reason = "the device has no bfloat16 tensor cores (compute capability below 8.0)";
    return cudaSuccess;
  }
  if (!coop) {
    plan->reason = "the device does not support cooperative launches";
    return cudaSuccess;
  }
  *sms = sm_count;
  *smem_optin = optin;
#endif
  *ok = true;
  return cudaSuccess;
}

// The plans' common start: reset the plan, refuse empty sizes, read the device's limits.
// False when planning stops here: plan->reason says why, or *err holds a failed query.
bool plan_start(int64_t B, int64_t H, RecurrencePersistentPlan* plan, int64_t* sms, int64_t* smem_optin,
                cudaError_t* err) {
  *plan = RecurrencePersistentPlan{};
  *err = cudaSuccess;
  if (B <= 0 || H <= 0) {
    plan->reason = "empty batch or hidden size";
    return false;
  }
  bool ok = false;
  *err = device_limits(sms, smem_optin, plan, &ok);
  return *err == cudaSuccess && ok;
}

// The plans' grid: `blocks` (> 0) blocks as asked (those past ceil(H / units) own no unit),
// or by default the fewest blocks of at most `max_units` units each.
void block_split(int64_t H, int64_t blocks, int64_t max_units, int64_t* nblk, int64_t* units) {
  *nblk = blocks > 0 ? blocks : cdiv(H, max_units);
  *units = cdiv(H, *nblk);
  if (blocks <= 0) *nblk = cdiv(H, *units);
}


// A plan's sizes, once it applies (the reason of an earlier refusal cleared).
void fill_plan(int64_t blocks, int64_t units, int64_t rows, int64_t smem, int64_t m_tiles, int64_t kpw,
               RecurrencePersistentPlan* plan) {
  plan->reason = nullptr;
  plan->blocks = blocks;
  plan->units = units;
  plan->batch_tile = rows;
  plan->smem_bytes = smem;
  plan->m_tiles = m_tiles;
  plan->k_tiles_per_warp = kpw;
}

// The plan's last step, both directions: the blocks must be co-resident (cooperative launch).
cudaError_t finish_plan(const void* kernel, int64_t sms, int64_t blocks, int64_t units, int64_t rows, int64_t smem,
                        int64_t m_tiles, int64_t kpw, RecurrencePersistentPlan* plan) {
  bool fits = false;
  const cudaError_t co = detail::co_resident(kernel, kMmaThreads, smem, blocks, sms, plan, &fits);
  if (co != cudaSuccess || !fits) return co;
  fill_plan(blocks, units, rows, smem, m_tiles, kpw, plan);
  return cudaSuccess;
}

#if FASTSEQ_PERSISTENT_EMULATED
RecurrencePersistentPlan g_last_plan{};  // tests: the plan of the last emulated launch
#endif

// One cooperative launch of `kernel` on the plan's grid (emulated: a real grid barrier, one
// CPU thread per block).
template <typename Args>
cudaError_t launch_cooperative(void (*kernel)(Args), const RecurrencePersistentPlan& p, const Args& a,
                               cudaStream_t stream) {
  const unsigned int grid = static_cast<unsigned int>(p.blocks);
  const size_t smem = static_cast<size_t>(p.smem_bytes);
#if FASTSEQ_PERSISTENT_EMULATED
  (void)stream;
  g_last_plan = p;
  ::fastseq_emu::launch_cooperative(grid, kMmaThreads, smem, kernel, a);
  return cudaSuccess;
#else
  Args args = a;
  void* argv[] = {&args};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(kMmaThreads), argv,
                                     smem, stream);
#endif
}

// One cooperative launch of `kernel` on the plan's grid in clusters of plan.cluster blocks
// (emulated: a real grid barrier and real cluster barriers, one CPU thread per block).
template <typename Args>
cudaError_t launch_cooperative_cluster(void (*kernel)(Args), const RecurrencePersistentPlan& p, const Args& a,
                                       cudaStream_t stream) {
  const unsigned int grid = static_cast<unsigned int>(p.blocks), cluster = static_cast<unsigned int>(p.cluster);
  const size_t smem = static_cast<size_t>(p.smem_bytes);
#if FASTSEQ_PERSISTENT_EMULATED
  (void)stream;
  g_last_plan = p;
  // Tests: FASTSEQ_CUDA_EMU_CLUSTER_LAUNCH=fail refuses the launch, as a device might.
  const char* env = std::getenv("FASTSEQ_CUDA_EMU_CLUSTER_LAUNCH");
  if (env != nullptr && std::strcmp(env, "fail") == 0) return cudaErrorNotSupported;
  ::fastseq_emu::launch_cooperative_cluster(grid, cluster, kMmaThreads, smem, kernel, a);
  return cudaSuccess;
#else
  cudaLaunchAttribute attrs[2];
  const cudaLaunchConfig_t cfg =
      detail::cluster_config(grid, cluster, kMmaThreads, static_cast<int64_t>(smem), stream, true, attrs);
  return cudaLaunchKernelEx(&cfg, kernel, a);
#endif
}

// The forward's plan. Row tiles: `row_tiles` > 0 asks for that many batch tiles (blocks of up
// to 64 / G units each); 0 picks: one tile (the whole batch, blocks of up to 32 / G units)
// while the padded batch is at most 32 rows, else tiles of 32 rows (or two tiles) with blocks
// of up to 64 / G units when that grid fits the SMs, else one tile. Each block reads only
// its tile's rows of h_{t-1} per step: the batch split halves (or better) the L2 term that
// dominates the step at B 64 (bench/NOTES.md v0.14). `blocks` > 0: blocks per row tile.
// `tagged`: the tagged exchange (see the top of this file): blocks of at most 32 / G units
// whether or not the batch is split, and its staging tiles after the partial sums.
template <typename S, int G>
cudaError_t plan_impl(int64_t B, int64_t H, int64_t blocks, int64_t row_tiles, bool tagged,
                      RecurrencePersistentPlan* plan) {
  int64_t sms = 0, smem_optin = 0;
  cudaError_t err = cudaSuccess;
  if (!plan_start(B, H, plan, &sms, &smem_optin, &err)) return err;
  if (H > kMmaMaxH) {
    plan->reason = "hidden size above 1024 (the tensor-core kernel holds at most 8 k-tiles of W_hh per warp)";
    return cudaSuccess;
  }
  const int64_t rows = cdiv(B, kTile) * kTile;
  // The tagged exchange is compiled for m_tiles <= 2 only: blocks of at most 32 / G units.
  const int64_t split_cap = (tagged ? kMmaMaxRows : kMmaMaxRowsSplit) / G;
  const int64_t row_units = rows / kTile;  // 16-row batch tiles
  int64_t R = 1, max_units = kMmaMaxRows / G;
  if (row_tiles > 0) {
    R = cdiv(row_units, cdiv(row_units, row_tiles));  // no empty tile
    max_units = split_cap;
  } else if (rows > kRowTile && blocks <= 0) {
    const int64_t split_units = split_cap;
    int64_t ub = 0, u = 0;
    block_split(H, 0, split_units, &ub, &u);
    for (const int64_t r : {cdiv(rows, kRowTile), int64_t{2}}) {
      if (r > 1 && r * ub <= sms) {
        R = r;
        max_units = split_units;
        break;
      }
    }
  }
  const int64_t Br = cdiv(row_units, R) * kTile;
  int64_t nblk = 0, units = 0;
  block_split(H, blocks, max_units, &nblk, &units);  // default: the fewest blocks (each reads all its rows of h)
  // The tagged exchange: no block without a unit (its reads would be ordered before no one's
  // writes; see the top of this file), so blocks asked past ceil(H / units) are dropped.
  if (tagged) nblk = cdiv(H, units);
  if (units > max_units) {
    plan->reason = max_units * G > kMmaMaxRows
                       ? "more than 64 / G hidden units per block (its W_hh rows would not fit its registers)"
                       : "more than 32 / G hidden units per block (its W_hh rows would not fit its registers, or "
                         "the tagged exchange's kernels)";
    return cudaSuccess;
  }
  const int64_t m_tiles = cdiv(G * units, kTile);
  const int64_t kt = cdiv(H, kTile);
  const int64_t kpw = cdiv(kt, kMmaWarps);
  const int64_t stage = m_tiles * kTile * operand_pitch(kt * kTile) * static_cast<int64_t>(sizeof(S));
  const int64_t partial =
      cdiv(kt, kpw) * m_tiles * kTile * partial_pitch(Br) * static_cast<int64_t>(sizeof(float));
  const int64_t exchange = tagged ? tagged_stage_offset(partial) + tagged_stage_bytes(kpw, sizeof(S)) : partial;
  const int64_t smem = stage > exchange ? stage : exchange;
  if (smem > smem_optin) {
    plan->reason = "the partial sums of the batch do not fit a block's shared memory (batch too large)";
    return cudaSuccess;
  }
  const cudaError_t fin = finish_plan(reinterpret_cast<const void*>(kernel_for<S, G>(m_tiles, kpw, tagged)), sms, R * nblk,
                                      units, Br, smem, m_tiles, kpw, plan);
  if (plan->blocks > 0) {
    plan->row_tiles = R;
    plan->tagged = tagged ? 1 : 0;
  }
  return fin;
}

template <typename S, int G>
cudaError_t launch_impl(const RecurrencePersistentFwd& a, cudaStream_t stream) {
  if (a.T <= 0 || a.B <= 0 || a.H <= 0) return cudaSuccess;
  const RecurrencePersistentPlan& p = a.plan;
  const int64_t R = p.row_tiles > 0 ? p.row_tiles : 1;
  if (p.blocks <= 0 || p.units <= 0 || p.m_tiles < 1 || p.m_tiles > 4 || p.k_tiles_per_warp < 1 ||
      p.k_tiles_per_warp > 8 || a.h_op == nullptr || a.ld_op != cdiv(a.H, kTile) * kTile ||
      a.rows_op != cdiv(a.B, kTile) * kTile || p.blocks % R != 0 || p.batch_tile <= 0 ||
      p.batch_tile % kTile != 0 || R * p.batch_tile < a.rows_op || (p.tagged && (p.m_tiles > 2 || a.h_tagged == nullptr)))
    return cudaErrorInvalidValue;
  return launch_cooperative(kernel_for<S, G>(p.m_tiles, p.k_tiles_per_warp, p.tagged != 0), p, a, stream);
}

template <typename S, int G>
auto bwd_kernel_for(int64_t m_tiles) -> void (*)(RecurrencePersistentBwd) {
  return m_tiles == 1 ? recurrence_persistent_mma_bwd_kernel<S, G, 1> : recurrence_persistent_mma_bwd_kernel<S, G, 2>;
}

template <typename S, int G>
cudaError_t plan_bwd_impl(int64_t B, int64_t H, int64_t blocks, RecurrencePersistentPlan* plan) {
  int64_t sms = 0, smem_optin = 0;
  cudaError_t err = cudaSuccess;
  if (!plan_start(B, H, plan, &sms, &smem_optin, &err)) return err;
  int64_t nblk = 0, units = 0;
  block_split(H, blocks, kBwdDefaultUnits, &nblk, &units);
  if (units > kMmaMaxRows) {
    plan->reason = "more than 32 hidden units per block (the backward's W_hh^T slice holds at most two 16-row tiles)";
    return cudaSuccess;
  }
  const int64_t m_tiles = cdiv(units, kTile);
  const int64_t ld = cdiv(G * H, kTile) * kTile;
  const int64_t kt = ld / kTile;
  const int64_t kpw = cdiv(kt, kMmaWarps);
  const int64_t rows = cdiv(B, kTile) * kTile;
  const int64_t smem = mma_bwd_slice_bytes(m_tiles * kTile, operand_pitch(ld), sizeof(S)) +
                       cdiv(kt, kpw) * m_tiles * kTile * partial_pitch(rows) * static_cast<int64_t>(sizeof(float)) +
                       mma_bwd_dh_bytes(units, B);
  if (smem > smem_optin) {
    plan->reason = "the W_hh^T slice, the partial sums and the carried dh of the batch do not fit a block's shared memory";
    return cudaSuccess;
  }
  return finish_plan(reinterpret_cast<const void*>(bwd_kernel_for<S, G>(m_tiles)), sms, nblk, units, rows, smem,
                     m_tiles, kpw, plan);
}

template <typename S, int G>
cudaError_t launch_cluster_bwd_impl(const RecurrencePersistentBwd& a, cudaStream_t stream);

template <typename S, int G>
cudaError_t launch_bwd_impl(const RecurrencePersistentBwd& a, cudaStream_t stream) {
  if (a.T <= 0 || a.B <= 0 || a.H <= 0) return cudaSuccess;
  const RecurrencePersistentPlan& p = a.plan;
  if (p.cluster > 0) return launch_cluster_bwd_impl<S, G>(a, stream);
  if (p.blocks <= 0 || p.units <= 0 || p.m_tiles < 1 || p.m_tiles > 2 || p.k_tiles_per_warp < 1 ||
      a.dg_op == nullptr || a.ld_op != cdiv(G * a.H, kTile) * kTile || a.rows_op != cdiv(a.B, kTile) * kTile)
    return cudaErrorInvalidValue;
  return launch_cooperative(bwd_kernel_for<S, G>(p.m_tiles), p, a, stream);
}

constexpr int64_t kMaxClusterColumns = 8 * kTile;  // a cluster's W_hh columns: m_tiles <= 8 (one per warp)

// The cluster backward's plan: `cluster` 2, 4 or 8 asks for that size; < 0 takes the
// largest of 8, 4, 2 that applies and is at most the block count. The grid is the block
// kernel's (16-unit blocks by default, or `blocks`) rounded up to a multiple of the size.
template <typename S, int G>
cudaError_t plan_cluster_bwd_impl(int64_t B, int64_t H, int64_t blocks, int64_t cluster,
                                  RecurrencePersistentPlan* plan) {
  int64_t sms = 0, smem_optin = 0;
  cudaError_t err = cudaSuccess;
  if (!plan_start(B, H, plan, &sms, &smem_optin, &err)) return err;
  if (cluster > 0 && cluster != 2 && cluster != 4 && cluster != 8) {
    plan->reason = "the cluster size must be 2, 4 or 8";
    return cudaSuccess;
  }
#if !FASTSEQ_PERSISTENT_EMULATED
  int device = 0, major = 0, clusters_ok = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&clusters_ok, cudaDevAttrClusterLaunch, device);
  if (err != cudaSuccess) return err;
  if (major < 9 || !clusters_ok) {
    plan->reason = "the device does not launch thread-block clusters (compute capability below 9.0)";
    return cudaSuccess;
  }
#endif
  int64_t nblk = 0, units = 0;
  block_split(H, blocks, kBwdDefaultUnits, &nblk, &units);
  const int64_t kt = cdiv(G * H, kTile);
  const int64_t rows = cdiv(B, kTile) * kTile;
  const void* kernel = reinterpret_cast<const void*>(recurrence_persistent_mma_cluster_bwd_kernel<S, G>);
  plan->reason = "fewer than 2 blocks: no cluster to form";
  for (const int64_t cl : {int64_t{8}, int64_t{4}, int64_t{2}}) {
    if (cluster > 0 ? cl != cluster : cl > nblk) continue;
    if (cl * units > kMaxClusterColumns) {
      plan->reason = "more than 128 W_hh columns per cluster (cluster size x units per block)";
      continue;
    }
    const int64_t m_tiles = cdiv(cl * units, kTile);
    const int64_t ktr = cdiv(kt, cl);
    const int64_t smem = mma_bwd_slice_bytes(m_tiles * kTile, operand_pitch(ktr * kTile), sizeof(S)) +
                         (kMmaWarps / m_tiles) * m_tiles * kTile * partial_pitch(rows) *
                             static_cast<int64_t>(sizeof(float)) +
                         mma_bwd_dh_bytes(units, B);
    if (smem > smem_optin) {
      plan->reason = "the W_hh^T slice, the partial sums and the carried dh of the batch do not fit a block's shared memory";
      continue;
    }
    const int64_t grid = cdiv(nblk, cl) * cl;
    bool fits = false;
    const cudaError_t co = detail::cluster_co_resident(kernel, kMmaThreads, smem, grid, cl, sms, plan, &fits);
    if (co != cudaSuccess) return co;
    if (!fits) continue;
    fill_plan(grid, units, rows, smem, m_tiles, ktr, plan);
    plan->cluster = cl;
    return cudaSuccess;
  }
  return cudaSuccess;
}

template <typename S, int G>
cudaError_t launch_cluster_bwd_impl(const RecurrencePersistentBwd& a, cudaStream_t stream) {
  const RecurrencePersistentPlan& p = a.plan;
  const int64_t kt = cdiv(G * a.H, kTile);
  if (p.blocks <= 0 || p.units <= 0 || p.blocks % p.cluster != 0 || p.m_tiles < 1 ||
      p.m_tiles != cdiv(p.cluster * p.units, kTile) || p.m_tiles * kTile > kMaxClusterColumns ||
      p.k_tiles_per_warp != cdiv(kt, p.cluster) || a.dg_op == nullptr || a.ld_op != kt * kTile ||
      a.rows_op != cdiv(a.B, kTile) * kTile)
    return cudaErrorInvalidValue;
  return launch_cooperative_cluster(recurrence_persistent_mma_cluster_bwd_kernel<S, G>, p, a, stream);
}

// Both plans' dtype and gate dispatch: float16 / bfloat16 only (float32 and float64 have
// no matching MMA here; the plan says so), G = 3 or 4; plan_for(S{}, integral_constant<G>).
template <typename PlanFor>
cudaError_t mma_plan(DType dtype, int64_t gates, RecurrencePersistentPlan* plan, PlanFor&& plan_for) {
  *plan = RecurrencePersistentPlan{};
  const bool half = dtype == DType::Float16, bf16 = dtype == DType::BFloat16;
  if (!half && !bf16) {
    plan->reason = "the tensor-core kernel takes float16 and bfloat16 only";
    return cudaSuccess;
  }
  using G3 = std::integral_constant<int, 3>;
  using G4 = std::integral_constant<int, 4>;
  if (gates == 3) return half ? plan_for(__half{}, G3{}) : plan_for(__nv_bfloat16{}, G3{});
  if (gates == 4) return half ? plan_for(__half{}, G4{}) : plan_for(__nv_bfloat16{}, G4{});
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t recurrence_persistent_mma_backward_plan(DType dtype, int64_t gates, int64_t B, int64_t H, int64_t blocks,
                                                    int64_t cluster, RecurrencePersistentPlan* plan) {
  return mma_plan(dtype, gates, plan, [&](auto s, auto g) {
    return cluster != 0 ? plan_cluster_bwd_impl<decltype(s), decltype(g)::value>(B, H, blocks, cluster, plan)
                        : plan_bwd_impl<decltype(s), decltype(g)::value>(B, H, blocks, plan);
  });
}

cudaError_t gru_backward_persistent_mma(DType dtype, const RecurrencePersistentBwd& a, cudaStream_t stream) {
  if (dtype == DType::Float16) return launch_bwd_impl<__half, 3>(a, stream);
  if (dtype == DType::BFloat16) return launch_bwd_impl<__nv_bfloat16, 3>(a, stream);
  return cudaErrorInvalidValue;
}

cudaError_t lstm_backward_persistent_mma(DType dtype, const RecurrencePersistentBwd& a, cudaStream_t stream) {
  if (dtype == DType::Float16) return launch_bwd_impl<__half, 4>(a, stream);
  if (dtype == DType::BFloat16) return launch_bwd_impl<__nv_bfloat16, 4>(a, stream);
  return cudaErrorInvalidValue;
}

cudaError_t recurrence_persistent_mma_plan(DType dtype, int64_t gates, int64_t B, int64_t H, int64_t blocks,
                                           int64_t row_tiles, bool tagged, RecurrencePersistentPlan* plan) {
  return mma_plan(dtype, gates, plan, [&](auto s, auto g) {
    return plan_impl<decltype(s), decltype(g)::value>(B, H, blocks, row_tiles, tagged, plan);
  });
}

cudaError_t gru_forward_persistent_mma(DType dtype, const RecurrencePersistentFwd& a, cudaStream_t stream) {
  if (dtype == DType::Float16) return launch_impl<__half, 3>(a, stream);
  if (dtype == DType::BFloat16) return launch_impl<__nv_bfloat16, 3>(a, stream);
  return cudaErrorInvalidValue;
}

cudaError_t lstm_forward_persistent_mma(DType dtype, const RecurrencePersistentFwd& a, cudaStream_t stream) {
  if (dtype == DType::Float16) return launch_impl<__half, 4>(a, stream);
  if (dtype == DType::BFloat16) return launch_impl<__nv_bfloat16, 4>(a, stream);
  return cudaErrorInvalidValue;
}

#if FASTSEQ_PERSISTENT_EMULATED
int64_t emulated_mma_count() { return ::fastseq_emu::wmma::mma_count(); }
int64_t emulated_cluster_syncs() { return ::fastseq_emu::cluster_sync_count(); }
int64_t emulated_take_smem_conflict_ways() { return ::fastseq_emu::take_smem_conflict_ways(); }
std::vector<int64_t> emulated_last_mma_plan() {
  const RecurrencePersistentPlan& p = g_last_plan;
  return {p.blocks, p.units, p.batch_tile, p.m_tiles, p.k_tiles_per_warp, p.cluster, p.row_tiles, p.tagged};
}
int64_t emulated_smem_ways_at_pitch(int64_t pitch, bool accumulator) {
  return ::fastseq_emu::smem_ways_at_pitch(static_cast<unsigned>(pitch), accumulator);
}
#endif

}  // namespace cuda
}  // namespace fastseq
