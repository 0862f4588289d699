// Launchers of the fastseq CUDA kernels (csrc/cuda/*.cu).
//
// This header is shared by the nvcc-compiled kernels and by the host-compiled
// ATen bindings (bindings.cpp). It names no ATen / c10 / torch type: tensors
// travel as raw device pointers, sizes and strides (in elements), the stream
// as a cudaStream_t, and the element type as a DType tag. The launchers have
// C++ linkage and take only PODs, so the _GLIBCXX_USE_CXX11_ABI setting of the
// two compilers does not matter.
//
// Pointer types
// -------------
// "S" pointers hold the storage dtype named by the `dtype` argument (float,
// double, __half or __nv_bfloat16). "C" pointers hold the compute dtype:
// double for Float64 storage, float for every other storage dtype (half
// inputs are computed in float32, like fastseq/ops/<op>/naive.py). `int64_t*`
// pointers are device int64 arrays; `uint8_t*` masks are device bool arrays.
// Optional pointers may be nullptr. All pointers are device pointers.
//
// Every launcher enqueues its kernel(s) on `stream` and returns
// cudaGetLastError() (cudaSuccess when nothing had to be launched, e.g. an
// empty batch). Nothing here synchronises or allocates.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace fastseq {
namespace cuda {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// ================================================================ recurrences
//
// Time-major, gate order GRU (r, z, n), LSTM (i, f, g, o), saved gates as in
// the reference: GRU (r, z, n, hn) with hn = W_hn h + b_hn, LSTM activated
// (i, f, g, o). One launch per time step; the recurrent products are cuBLAS
// GEMMs issued by the caller between the launches.
//
// `lengths` (optional, int64 [B]): row b updates only at steps t < lengths[b];
// past its length its state passes through unchanged (its gates are still
// computed and saved, as the reference does), and in the backward its gate
// gradients are zero and dh (dc) passes through.
//
// Packed layout (a PackedSequence's; fastseq/ops/recurrence/naive.py, "packed
// layout"): the same launchers run one step of a packed recurrence. The caller
// passes the step's row count as B, pointers already offset to the step's rows
// (gi, hs, gates ... at row offsets[t]; the previous state at the previous
// step's offset), lengths = nullptr, and n_prev: rows b < n_prev read their
// previous state from h_prev (c_prev), rows b >= n_prev from h_alt (c_alt),
// i.e. h0 (c0) row b (the reverse direction: rows that start at this step).
// The dense path passes n_prev = B in the forward and n_prev = (t > 0 ? B : 0)
// in the backward.

// GRU forward, step t (element (b, j) per thread):
//   r = sig(gi_r + gh_r + b_r), z = sig(gi_z + gh_z + b_z), hn = gh_n + b_n,
//   n = tanh(gi_n + r * hn),    h' = (1 - z) n + z h_prev (or h_prev if not valid).
struct GruFwdStep {
  const void* gi;      // S [B, 3H], rows ld_gi apart (gi[t])
  int64_t ld_gi;
  const void* gh;      // C [B, 3H] contiguous: h_prev W_hh^T (no bias)
  const void* bias;    // C [3H] b_hh, or nullptr
  const void* h_prev;  // C [B, H], rows ld_h apart (rows b < n_prev)
  int64_t ld_h;
  const void* h_alt;  // C [B, H] contiguous (h0): the previous state of rows b >= n_prev, or nullptr
  int64_t n_prev;
  const int64_t* lengths;  // [B] or nullptr
  int64_t t, B, H;
  void* h_state;  // C [B, H] contiguous: h' in the compute dtype, or nullptr
  void* hs_out;   // S [B, H] contiguous: hs[t]
  void* gates;    // S [B, 4H] contiguous: (r, z, n, hn), or nullptr
};
cudaError_t gru_forward_step(DType dtype, const GruFwdStep& a, cudaStream_t stream);

// GRU backward, step t. With d = dh + grad_hs[t]:
//   dn = d (1 - z) (1 - n^2), dz = d (h_prev - n) z (1 - z), dr = dn hn r (1 - r)
//   dgi[t] = (dr, dz, dn), dgh[t] = (dr, dz, dn r), dh <- d z
// (rows past their length: dgi = dgh = 0, dh <- d). The caller then adds
// dgh[t] @ W_hh to dh (cuBLAS, beta = 1).
struct GruBwdStep {
  const void* grad_hs;   // S [B, H] contiguous (grad_hs[t])
  const void* gates;     // S [B, 4H] contiguous (gates[t])
  const void* h_prev_s;  // S [B, H] contiguous (hs[t-1]): the previous state of rows b < n_prev
  const void* h_prev_c;  // C [B, H] contiguous (h0 in the compute dtype): that of rows b >= n_prev
  int64_t n_prev;
  const int64_t* lengths;
  int64_t t, B, H;
  void* dh;   // C [B, H] contiguous, in/out
  void* dgi;  // S [B, 3H] contiguous out
  void* dgh;  // C [B, 3H] contiguous out
};
cudaError_t gru_backward_step(DType dtype, const GruBwdStep& a, cudaStream_t stream);

// LSTM forward, step t: pre = gi[t] + gh + b; i, f, o = sig, g = tanh;
//   c' = f c_prev + i g, h' = o tanh(c') (or h_prev, c_prev if not valid).
struct LstmFwdStep {
  const void* gi;  // S [B, 4H], rows ld_gi apart
  int64_t ld_gi;
  const void* gh;      // C [B, 4H] contiguous
  const void* bias;    // C [4H] or nullptr
  const void* h_prev;  // C [B, H], rows ld_h apart
  int64_t ld_h;
  const void* c_prev;  // C [B, H], rows ld_c apart
  int64_t ld_c;
  const void* h_alt;  // C [B, H] contiguous (h0): the previous h of rows b >= n_prev, or nullptr
  const void* c_alt;  // C [B, H] contiguous (c0): the previous c of rows b >= n_prev, or nullptr
  int64_t n_prev;     // rows b < n_prev read h_prev / c_prev
  const int64_t* lengths;
  int64_t t, B, H;
  void* h_state;  // C [B, H] contiguous or nullptr
  void* c_state;  // C [B, H] contiguous or nullptr
  void* hs_out;   // S [B, H] contiguous
  void* cs_out;   // S [B, H] contiguous
  void* gates;    // S [B, 4H] contiguous (i, f, g, o) or nullptr
};
cudaError_t lstm_forward_step(DType dtype, const LstmFwdStep& a, cudaStream_t stream);

// LSTM backward, step t. With d = dh + grad_hs[t], dc_in = dc + grad_cs[t],
// tc = tanh(c_t), dc_tot = dc_in + d o (1 - tc^2):
//   dg[t] = (dc_tot g i (1-i), dc_tot c_prev f (1-f), dc_tot i (1-g^2), d tc o (1-o))
//   dh <- 0, dc <- dc_tot f   (rows past their length: dg = 0, dh <- d, dc <- dc_in)
// The caller then adds dg[t] @ W_hh to dh.
struct LstmBwdStep {
  const void* grad_hs;   // S [B, H] contiguous
  const void* grad_cs;   // S [B, H] contiguous
  const void* gates;     // S [B, 4H] contiguous
  const void* c;         // S [B, H] contiguous (cs[t])
  const void* c_prev_s;  // S [B, H] contiguous (cs[t-1]): the previous c of rows b < n_prev
  const void* c_prev_c;  // C [B, H] contiguous (c0 in the compute dtype): that of rows b >= n_prev
  int64_t n_prev;
  const int64_t* lengths;
  int64_t t, B, H;
  void* dh;     // C [B, H] in/out
  void* dc;     // C [B, H] in/out
  void* dg;     // C [B, 4H] out
  void* dgi_s;  // S [B, 4H] out: dg in the storage dtype, or nullptr
};
cudaError_t lstm_backward_step(DType dtype, const LstmBwdStep& a, cudaStream_t stream);

// ======================================================= persistent recurrences
//
// The whole forward of one layer and direction in ONE cooperative launch
// (persistent_kernels.cu), with the semantics and outputs of T launches of
// gru_forward_step / lstm_forward_step plus the caller's cuBLAS products:
// hs[t] (cs[t]) and the saved gates in the same layout, lengths masking, the
// state carried in the compute dtype between steps.
//
// Work split: block k of `blocks` owns the hidden units j in
// [k * units, (k + 1) * units) (none when k * units >= H) with all G gates of
// them, and keeps its slice of W_hh (rows g*H + j, all H columns, in the
// storage dtype) in shared memory for all T steps. Per step every block reads
// the whole h_{t-1} (compute dtype, global memory, ping-pong), batch_tile rows
// at a time staged in shared memory, forms its slice of h_{t-1} W_hh^T with
// accumulation in the compute dtype, applies the gates (gates.cuh), masks by
// lengths and writes hs[t], cs[t], gates[t] and the new state; then a grid
// barrier (cooperative_groups' grid.sync()) before the next step.
//
// The backward (t = T-1 .. 0) has the contract of T launches of
// gru_backward_step / lstm_backward_step plus the caller's dh += dG[t] W_hh:
// block k keeps the W_hh columns of its units (the same bytes as the forward's
// rows); per step it forms dG[t] of its units (phase 1, from its own part of
// dh, dc), then after a grid barrier dh[:, its units] += dG[t] W_hh[:, its
// units] from the whole dG[t] (phase 2), staged batch_tile rows at a time:
// T grid barriers.
//
// Size limit: per block  G * units * H * sizeof(S)  (the W_hh slice, rounded up
// to 16 bytes)  +  batch_tile * (R + 1) * sizeof(C)  (the staged rows: R = H of
// h in the forward, R = G*H of dG in the backward) must fit
// the device's opt-in shared memory per block (227 KB on sm_90: H100 / H200),
// with batch_tile >= 1; that is G*H*H*sizeof(S) <= blocks * 227 KB, less the h
// rows. When it does not fit, or the device cannot launch cooperatively, the
// plan says so (blocks = 0) and the caller runs the per-step path.
struct RecurrencePersistentPlan {
  int64_t blocks = 0;            // grid size; 0: the persistent kernel does not apply (see reason)
  int64_t units = 0;             // hidden units per block
  int64_t batch_tile = 0;        // rows of h_{t-1} staged in shared memory at a time
  int64_t smem_bytes = 0;        // dynamic shared memory per block
  const char* reason = nullptr;  // why blocks == 0 (a static string)
  // The tensor-core kernels only (recurrence_persistent_mma_plan, _mma_backward_plan; 0 otherwise):
  int64_t m_tiles = 0;           // 16-row tiles of the block's W_hh slice (forward: G * units rows;
                                 // backward: units rows of W_hh^T)
  int64_t k_tiles_per_warp = 0;  // 16-column tiles each warp multiplies (forward: held in registers;
                                 // the cluster backward: the k-tiles of each rank's slice)
  int64_t cluster = 0;           // the cluster backward only: blocks per thread-block cluster (2, 4, 8)
  int64_t row_tiles = 0;         // the tensor-core forward only: batch row tiles of batch_tile rows each
                                 // (blocks = row_tiles x blocks per tile); 0 or 1: one tile
  int64_t tagged = 0;            // the tensor-core forward only: 1 when h_{t-1} is exchanged as tagged
                                 // words (h_tagged) instead of through a grid barrier
};

// Sizes the launch for `gates` = 3 (GRU) or 4 (LSTM) on the current device.
// `blocks` > 0 asks for that grid size (units = ceil(H / blocks); blocks past
// ceil(H / units) own no unit but take part in the barriers); 0 takes one
// block per SM (at most H). Queries the device (cooperative launch support,
// SM count, opt-in shared memory, occupancy) and raises the kernel's dynamic
// shared memory limit; under FASTSEQ_CUDA_HOST_EMULATION it plans for an
// emulated device of kEmulatedSMs SMs with sm_90's 227 KB and cooperative
// launches. Returns an error only when a device query fails.
cudaError_t recurrence_persistent_plan(DType dtype, int64_t gates, int64_t B, int64_t H, int64_t blocks,
                                       bool backward, RecurrencePersistentPlan* plan);

struct RecurrencePersistentFwd {
  const void* gi;  // S [T, B, G*H], strides (ld_t, ld_b, 1)
  int64_t ld_t, ld_b;
  const void* w_hh;        // S [G*H, H] contiguous
  const void* bias;        // C [G*H] (b_hh) or nullptr
  const int64_t* lengths;  // [B] or nullptr
  int64_t T, B, H;
  void* h_state;  // C [2, B, H]: the state after step t in h_state[t & 1]; the caller puts h0 in h_state[1]
  void* c_state;  // C [B, H] (LSTM; nullptr for the GRU): c0 on entry, updated in place
  void* hs;       // S [T, B, H] contiguous out
  void* cs;       // S [T, B, H] contiguous out (LSTM) or nullptr
  void* gates;    // S [T, B, 4H] contiguous out, or nullptr
  RecurrencePersistentPlan plan;  // from recurrence_persistent_plan (blocks > 0)
  // The tensor-core forward only: the product's operand h_{t-1} in the storage
  // dtype, S [2, rows_op, ld_op] zeros but for h0 in [1, :B, :H] (the kernel
  // writes h_t into [t & 1, :B, :H]); rows_op = B and ld_op = H rounded up to 16.
  void* h_op = nullptr;
  int64_t ld_op = 0, rows_op = 0;
  // plan.tagged only: h_{t-1} as 32-bit words (step tag << 16) | (h's 16 bits), [2, rows_op, ld_op]:
  // h0 in [1, :B, :H] with tag 0xFFFF, every word of [0] with tag 0xFFFE (persistent_mma_kernels.cu).
  unsigned int* h_tagged = nullptr;
};
cudaError_t gru_forward_persistent(DType dtype, const RecurrencePersistentFwd& a, cudaStream_t stream);
cudaError_t lstm_forward_persistent(DType dtype, const RecurrencePersistentFwd& a, cudaStream_t stream);

// The tensor-core persistent forward (persistent_mma_kernels.cu): the contract
// of gru/lstm_forward_persistent for float16 / bfloat16, with W_hh held in
// REGISTERS across the T steps as warp-level MMA operands (nvcuda::wmma,
// 16 x 16 x 16 tiles: HMMA on sm_80 and later) instead of shared memory, and
// the product h_{t-1} W_hh^T formed on tensor cores from h_{t-1} rounded to the
// storage dtype (h_op) with float32 accumulation, as cuDNN's half-precision
// recurrences and fastseq's Triton kernels do; the state is still carried in
// float32. The batch is split into row_tiles tiles of batch_tile rows; block
// (tile r, k) owns `units` hidden units (all G gates: G * units <= 16 * m_tiles
// rows of W_hh) for the rows of tile r, and its 8 warps split K = H in
// k_tiles_per_warp tiles each; per step every warp forms its partial products
// for the tile's rows (16 at a time) from h_op (global memory, L2), the partial
// sums meet in shared memory, and the block applies the gates of its units to
// its rows; then a grid barrier. Applies when: float16 / bfloat16, W_hh in that
// dtype, the device is sm_80 or later and launches cooperatively, G * units <=
// 32 with one tile or <= 64 with several (units = ceil(H / blocks); blocks, per
// tile, defaults to the fewest that satisfy it, i.e. the fewest blocks that
// read the tile's rows of h_{t-1} each step), row_tiles x blocks <= the SM
// count, H <= 1024, and the partial sums (8 * 16 * m_tiles * batch_tile floats)
// fit the opt-in shared memory. `row_tiles` > 0 asks for that many tiles; 0
// splits a batch of more than 32 (padded) rows into tiles of 32 rows, or two,
// when the grid fits the SMs (plan_impl in persistent_mma_kernels.cu).
// `tagged`: exchange h_{t-1} as tagged words instead of through a grid barrier
// (plan->tagged = 1; blocks of at most 32 / G units, the staging tiles in shared
// memory too; the caller then fills RecurrencePersistentFwd::h_tagged).
// Otherwise plan->blocks = 0 with the reason.
cudaError_t recurrence_persistent_mma_plan(DType dtype, int64_t gates, int64_t B, int64_t H, int64_t blocks,
                                           int64_t row_tiles, bool tagged, RecurrencePersistentPlan* plan);
cudaError_t gru_forward_persistent_mma(DType dtype, const RecurrencePersistentFwd& a, cudaStream_t stream);
cudaError_t lstm_forward_persistent_mma(DType dtype, const RecurrencePersistentFwd& a, cudaStream_t stream);

struct RecurrencePersistentBwd {
  const void* grad_hs;  // S [T, B, H] contiguous
  const void* grad_cs;  // S [T, B, H] contiguous (LSTM) or nullptr
  const void* gates;    // S [T, B, 4H] contiguous (the forward's saved gates)
  const void* hs;       // S [T, B, H] contiguous (GRU: the previous states)
  const void* cs;       // S [T, B, H] contiguous (LSTM) or nullptr
  const void* h0;       // C [B, H] contiguous (GRU: the previous state at t = 0)
  const void* c0;       // C [B, H] contiguous (LSTM) or nullptr
  const void* w_hh;     // S [G*H, H] contiguous
  const int64_t* lengths;
  int64_t T, B, H;
  void* dh;    // C [B, H], zeros on entry; grad h0 on exit
  void* dc;    // C [B, H], zeros on entry; grad c0 on exit (LSTM) or nullptr
  void* dg;    // C [T, B, G*H] out: the gradient of h W_hh^T (GRU: dgh = (dr, dz, dn r); LSTM: dg)
  void* dg_s;  // S [T, B, G*H] out: grad_gi in the storage dtype (GRU: always; LSTM: or nullptr)
  RecurrencePersistentPlan plan;  // from recurrence_persistent_plan(..., backward = true, ...)
  // The tensor-core backward only: the product's operand dG[t] in the storage dtype,
  // S [2, rows_op, ld_op] zeros (the kernel writes dG[t] into [t & 1, :B, :G*H]);
  // rows_op = B and ld_op = G*H rounded up to 16.
  void* dg_op = nullptr;
  int64_t ld_op = 0, rows_op = 0;
};
cudaError_t gru_backward_persistent(DType dtype, const RecurrencePersistentBwd& a, cudaStream_t stream);
cudaError_t lstm_backward_persistent(DType dtype, const RecurrencePersistentBwd& a, cudaStream_t stream);

// The tensor-core persistent backward (persistent_mma_kernels.cu): the contract of
// gru/lstm_backward_persistent for float16 / bfloat16, with the recurrent product
// dh[:, own units] += dG[t] W_hh[:, own units] on tensor cores (wmma 16 x 16 x 16,
// float32 accumulation) from dG[t] rounded to the storage dtype (dg_op), as the
// forward rounds h_{t-1}. Block k owns `units` (<= 32: m_tiles = ceil(units / 16)
// tiles of 16 rows) hidden units and keeps W_hh^T's rows of them ([units, G*H],
// zero-padded to 16 * m_tiles x ld_op) in SHARED memory: at K = G*H (4096 for an
// LSTM of H = 1024) the fragments would not fit the registers, as the forward's
// K = H ones do; each warp loads its k_tiles_per_warp tiles from shared memory at
// every step (a 16-unit block's slice is at most 200 KB; the smem read is
// ~0.2-0.3 us per step at H = 768-1024). Phase 1 of each step is the
// shared-memory kernel's (persistent_common.cuh: persistent_backward_element),
// which also writes dg_op; then a grid barrier; then the products, the 8 warps'
// partial sums meeting in shared memory. Applies when: float16 / bfloat16, the
// device is sm_80 or later and launches cooperatively, units = ceil(H / blocks)
// <= 32 (blocks defaults to ceil(H / 16): 16-unit blocks, the fewest that read
// dG[t] each step with one 16-row tile), blocks <= the SM count, and the W^T
// slice plus the partial sums (8 * 16 * m_tiles * rows_op floats) fit the
// opt-in shared memory. Otherwise plan->blocks = 0 with the reason.
//
// The cluster backward (`cluster` != 0; sm_90): the same contract and phase 1,
// with the product split along K = G*H inside thread-block clusters of
// plan.cluster blocks (2, 4 or 8; `cluster` > 0 asks for that size, < 0 takes
// the largest that applies and is at most the block count), so that each block
// reads 1 / cluster of dG[t] from L2, not all of it. A cluster owns its blocks'
// cluster * units (<= 128) columns of W_hh; rank q keeps W_hh^T's k-tiles
// [q * k_tiles_per_warp, (q + 1) * k_tiles_per_warp) of them in shared memory
// (m_tiles = ceil(cluster * units / 16) tiles of 16 columns), forms their
// partial products for all rows_op rows, and each block sums the ranks'
// partial sums of its own units through distributed shared memory after a
// cluster barrier. One cooperative launch with a cluster dimension
// (cudaLaunchKernelEx); the grid is the block kernel's rounded up to a multiple
// of plan.cluster (blocks past ceil(H / units) own no unit but hold their
// k-tiles). Applies when: sm_90 or later with cluster launch, cluster * units <=
// 128, the slice plus the partial sums (8 / m_tiles x 16 * m_tiles x rows_op
// floats) fit the opt-in shared memory, and the device holds the grid's
// clusters at once (cudaOccupancyMaxActiveClusters).
cudaError_t recurrence_persistent_mma_backward_plan(DType dtype, int64_t gates, int64_t B, int64_t H, int64_t blocks,
                                                    int64_t cluster, RecurrencePersistentPlan* plan);
cudaError_t gru_backward_persistent_mma(DType dtype, const RecurrencePersistentBwd& a, cudaStream_t stream);
cudaError_t lstm_backward_persistent_mma(DType dtype, const RecurrencePersistentBwd& a, cudaStream_t stream);

// ------------------------------------------- the persistent step's synchronisation, alone
//
// persistent_sync_probe (persistent_sync_probe.cu; the `sync` benchmark suite): `steps`
// steps of a persistent kernel's exchange without its arithmetic: block k writes its
// `words` words of buffer[t & 1], the blocks synchronise by `mode`, every block reads the
// whole buffer into per-thread checksums. Times the step's fixed cost (barrier plus the
// state's round trip through L2) that bench/step_model.py assumes.
enum class SyncProbeMode : int {
  Grid = 0,    // cooperative_groups' grid barrier (the kernels' detail::grid_sync)
  Flags = 1,   // per-block arrival flags (detail::flag_barrier)
  Tagged = 2,  // no barrier: each word carries its step (the data is its own flag)
};
constexpr int kSyncProbeThreads = 256;

struct SyncProbe {
  unsigned int* buffer;      // [2, blocks * words]; Tagged: 0xFFFFFFFF before the launch
  unsigned int* flags;       // [blocks], zero before the launch (Flags)
  unsigned long long* sums;  // [blocks, kSyncProbeThreads] out: each thread's checksum
  int64_t blocks = 0, words = 0, steps = 0;  // words: a multiple of 4
  int mode = 0;                              // a SyncProbeMode
  int cluster = 1;                           // > 1: a cluster barrier after the mode's, per step
};

// The launch: `blocks` blocks (at most one per SM: each asks for more than half an SM's
// shared memory), all co-resident (a cooperative launch; in clusters of `cluster` with
// cluster > 1, sm_90). plan->blocks = 0 with plan->reason when the device cannot. Returns
// an error only when a device query fails.
cudaError_t persistent_sync_probe_plan(int mode, int64_t blocks, int64_t cluster, RecurrencePersistentPlan* plan);
cudaError_t persistent_sync_probe_launch(const SyncProbe& a, const RecurrencePersistentPlan& plan,
                                        cudaStream_t stream);

#ifdef FASTSEQ_CUDA_HOST_EMULATION
// Tests only: the grid barriers the emulated cooperative launches completed.
int64_t emulated_grid_syncs();
// Tests only: the warp-level MMAs (16 x 16 x 16) the emulated kernels executed.
int64_t emulated_mma_count();
// Tests only: the cluster barriers the emulated clustered launches completed (once per cluster).
int64_t emulated_cluster_syncs();
// Tests only: the worst bank-conflict ways of the wmma shared-memory accesses since the last
// call (emu/host_emulation.h's model; 1: conflict-free, 0: none), and start over.
int64_t emulated_take_smem_conflict_ways();
// Tests only: that model for one 16-bit fragment load (accumulator false) or one float
// accumulator store at a row pitch of `pitch` elements.
int64_t emulated_smem_ways_at_pitch(int64_t pitch, bool accumulator);
// Tests only: the plan of the last emulated tensor-core launch: blocks, units, batch_tile,
// m_tiles, k_tiles_per_warp, cluster, row_tiles.
std::vector<int64_t> emulated_last_mma_plan();
#endif

// ================================================================= attention
//
// energy[b,t,j] = v^T tanh(q[b,t] + K[b,j]); softmax over valid j; context =
// weights @ V. One block per (b, t) query: one warp per source position j at a
// time (lanes over A, warp-shuffle sum), block softmax, then threads over D.
// Validity: mask[b, j] != 0 if a mask is given (lengths are then ignored, as
// in the reference), else j < lengths[b] if lengths are given, else all.

struct AttnFwd {
  const void* q;  // S [B, T, A], strides (sq_b, sq_t, 1)
  int64_t sq_b, sq_t;
  const void* k;  // S [B, S, A], strides (sk_b, sk_s, 1)
  int64_t sk_b, sk_s;
  const void* v;  // S [B, S, D], strides (sv_b, sv_s, 1)
  int64_t sv_b, sv_s;
  const void* e;          // S [A] contiguous (the energy vector)
  const uint8_t* mask;    // [B, S] bool, rows sm_b apart, or nullptr
  int64_t sm_b;
  const int64_t* lengths;  // [B] or nullptr
  int64_t B, T, S, A, D;
  const void* out_bias;  // S [B, T, D], strides (sob_b, sob_t, 1), or nullptr; given, the
  int64_t sob_b, sob_t;  // context output is tanh(out_bias + context) (Luong's attention vector)
  void* context;    // S [B, T, D] contiguous out
  void* weights;    // S [B, T, S] contiguous out
  void* workspace;  // C [B * T * S] scores, or nullptr (see below)
};
// Elements (of the compute dtype) the `workspace` of attention_forward needs:
// 0 when a query's S scores fit in shared memory (then pass nullptr).
int64_t attention_forward_workspace_elems(DType dtype, int64_t B, int64_t T, int64_t S);
cudaError_t attention_forward(DType dtype, const AttnFwd& a, cudaStream_t stream);

// Energy part of the attention backward, tanh(q + K) recomputed. Given
// de = dL/d energy[b,t,j] (C, from the softmax backward), with
// u = tanh(q_t + K_j), g = de (1 - u^2) v:
//   dq[b,t] = sum_j g,  dk[b,j] = sum_t g,  dv_part[b*n_chunks + c] = sum_{t, j in chunk c} de u
// (sum dv_part over its rows for grad of v). Two launches, each output
// element owned by one thread: no atomics, deterministic.
struct AttnEnergyBwd {
  const void* q;  // S [B, T, A], strides (sq_b, sq_t, 1)
  int64_t sq_b, sq_t;
  const void* k;  // S [B, S, A], strides (sk_b, sk_s, 1)
  int64_t sk_b, sk_s;
  const void* e;   // S [A] contiguous
  const void* de;  // C [B, T, S] contiguous
  int64_t B, T, S, A;
  void* dq;       // S [B, T, A] contiguous out
  void* dk;       // S [B, S, A] contiguous out
  void* dv_part;  // C [B * attention_backward_chunks(S), A] contiguous out
};
int64_t attention_backward_chunks(int64_t S);
cudaError_t attention_energy_backward(DType dtype, const AttnEnergyBwd& a, cudaStream_t stream);

// ============================================ GRU cell of the attention decoder
//
// Forward: x = gi + xc (xc = context W_ic^T, a cuBLAS GEMM by the caller),
// hh = gh + b_hh; r = sig(x_r + hh_r), z = sig(x_z + hh_z),
// n = tanh(x_n + r hh_n), h' = (1 - z) n + z h; gates (r, z, n, hh_n).
struct GruCellFwd {
  const void* gi;  // S [B, 3H], rows ld_gi apart
  int64_t ld_gi;
  const void* xc;  // C [B, 3H] contiguous
  const void* gh;  // S [B, 3H], rows ld_gh apart
  int64_t ld_gh;
  const void* bias;  // C [3H] or nullptr
  const void* h;     // S [B, H], rows ld_h apart
  int64_t ld_h;
  int64_t B, H;
  void* h_out;  // S [B, H] contiguous
  void* gates;  // S [B, 4H] contiguous or nullptr
};
cudaError_t gru_cell_forward(DType dtype, const GruCellFwd& a, cudaStream_t stream);

// Backward (pointwise part): dn = dh (1-z)(1-n^2), dz = dh (h - n) z (1-z),
// dr = dn hn r (1-r); dgi = (dr, dz, dn), dgh = (dr, dz, dn r), dh_prev = dh z.
struct GruCellBwd {
  const void* grad_h;  // S [B, H] contiguous
  const void* gates;   // S [B, 4H] contiguous
  const void* h;       // S [B, H], rows ld_h apart
  int64_t ld_h;
  int64_t B, H;
  void* dgi_c;   // C [B, 3H] out (always)
  void* dgh_c;   // C [B, 3H] out or nullptr
  void* dgi_s;   // S [B, 3H] out or nullptr
  void* dgh_s;   // S [B, 3H] out or nullptr
  void* dh_prev; // S [B, H] out
};
cudaError_t gru_cell_backward(DType dtype, const GruCellBwd& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastseq
