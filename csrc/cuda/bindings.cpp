// CUDA implementations of the fastseq_cpp ops (ATen side, host compiler).
//
// Semantics, signatures and output layouts are those of
// fastseq/ops/<op>/naive.py; the schemas are defined by the CPU sources
// (csrc/cpu, TORCH_LIBRARY / TORCH_LIBRARY_FRAGMENT(fastseq_cpp, ...)); this
// file only adds the CUDA kernels of the same ops
// (TORCH_LIBRARY_IMPL(fastseq_cpp, CUDA, m); the name follows
// -DFASTSEQ_CPP_LIBRARY like the CPU sources).
//
// Split of the work:
//   * matrix products through ATen (at::mm_out / addmm_ / bmm, i.e. cuBLAS),
//     on the current stream, in the compute dtype;
//   * everything pointwise / fused through the launchers of kernels.h
//     (csrc/cuda/*.cu), which take raw pointers and the current CUDA stream
//     from c10::cuda::getCurrentCUDAStream().
//
// Precision (as the reference): half / bfloat16 inputs are computed in float32
// (GEMMs included: the weights are converted once per call, the recurrent
// state is carried in float32 between steps and only hs / cs are stored in
// half); float64 stays float64. Outputs are in the dtypes the reference
// returns. Where the reference returns None (grad_b_hh without a bias) the op
// returns an empty [0] tensor.
//
// When the inputs that the kernels read in one storage dtype do not share a
// dtype (mixed precision), they are all converted to the compute dtype first,
// which is exactly what the reference computes with; results are cast back.
//
// The dense recurrence forwards (gru_recurrence_forward,
// lstm_recurrence_forward) and backwards have two paths: the per-step loop (a cuBLAS product
// and a pointwise launch per step) and the persistent kernel (one cooperative
// launch for all T steps, W_hh resident in shared memory; kernels.h). The
// environment chooses, read at every call:
//   FASTSEQ_CUDA_PERSISTENT=0 (or unset): the per-step loop. The default until
//     the persistent kernel has been run and timed on a GPU (it was written and
//     tested under the host emulation only; its products are FMA loops, not
//     tensor-core GEMMs, so large batches may well be faster per step).
//   FASTSEQ_CUDA_PERSISTENT=auto: the persistent kernel when it applies (W_hh
//     in the dtype of the other inputs, its slice fits a block's shared memory,
//     the device launches cooperatively), else the per-step loop. Under the
//     host emulation (no device to query) auto is the per-step loop.
//   FASTSEQ_CUDA_PERSISTENT=1: the persistent kernel; a RuntimeError when it
//     does not apply (tests: no silent fallback).
//   FASTSEQ_CUDA_PERSISTENT_BLOCKS=N (N > 0): the persistent kernel's grid size
//     (default: one block per SM, at most H; the tensor-core kernel: the fewest
//     blocks of at most 32 / G units).
//   FASTSEQ_CUDA_PERSISTENT_MMA=1 (or unset): float16 / bfloat16 forwards and
//     backwards use the tensor-core persistent kernels (persistent_mma_kernels.cu:
//     the forward with W_hh in registers, products on tensor cores from h_{t-1}
//     rounded to the storage dtype; the backward with W_hh^T in shared memory,
//     products from dG[t] rounded to the storage dtype; float32 accumulation and
//     state) where they apply, else the shared-memory ones; 0: the shared-memory
//     ones (float32 products).
//   FASTSEQ_CUDA_PERSISTENT_ROW_TILES=N (N > 0): the tensor-core forward splits
//     the batch into N row tiles (default: tiles of 32 rows, or two, when the
//     padded batch has more than 32 rows and the grid fits the SMs).
//   FASTSEQ_CUDA_PERSISTENT_CLUSTER=auto (or unset): the tensor-core backward
//     splits its product inside thread-block clusters (the cluster backward,
//     sm_90) of the largest size of 8, 4, 2 that applies, else runs the block
//     kernel; 2, 4 or 8: that cluster size (FASTSEQ_CUDA_PERSISTENT=1 raises when
//     it does not apply); 0: the block kernel.
//   FASTSEQ_CUDA_PERSISTENT_SYNC=grid (or unset): the tensor-core forward's blocks
//     wait for each other's h_t at a grid barrier; tagged: they exchange h_t as
//     tagged words, without a barrier (persistent_mma_kernels.cu; opt-in until a
//     GPU has timed both: the `sync` benchmark suite, bench/NOTES.md v0.15).
// The same choice for the dense backwards (gru_recurrence_backward,
// lstm_recurrence_backward). The packed ops always run per step.
//
// FASTSEQ_CUDA_HOST_EMULATION (tests only; see common.cuh): the same code on
// CPU tensors, the kernels running on CPU threads, registered as a separate
// library `fastseq_cuda_emu` with the schemas of the CPU ops (../cpu/schemas.h,
// so their match with these C++ signatures is checked when it loads).
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef FASTSEQ_CUDA_HOST_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../cpu/schemas.h"  // relative: the tests compile this file without csrc/cpu on the include path
#include "kernels.h"

namespace fastseq {
namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// ------------------------------------------------------------------ helpers

at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

DType dtype_tag(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::Float32;
    case at::kDouble:
      return DType::Float64;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "fastseq_cpp (CUDA): unsupported dtype ", t);
  return DType::Float32;  // not reached
}

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// ---------------------------------------------------- device, stream, errors

#ifndef FASTSEQ_CUDA_HOST_EMULATION
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t stream_of(const at::Device& dev) { return c10::cuda::getCurrentCUDAStream(dev.index()).stream(); }
bool on_expected_device(const Tensor& t) { return t.is_cuda(); }
std::string error_string(cudaError_t err) { return cudaGetErrorString(err); }
#else
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
cudaStream_t stream_of(const at::Device&) { return nullptr; }
bool on_expected_device(const Tensor& t) { return t.is_cpu(); }
std::string error_string(cudaError_t err) { return "cudaError_t " + std::to_string(static_cast<int>(err)); }
#endif

void check_float_cuda(const Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.defined(), "fastseq_cpp (CUDA): ", name, ": undefined tensor");
  TORCH_CHECK(on_expected_device(t), "fastseq_cpp (CUDA): ", name, ": expected a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == dev, "fastseq_cpp (CUDA): ", name, ": expected a tensor on ", dev, ", got ",
              t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "fastseq_cpp (CUDA): ", name, ": expected float32/float64/float16/bfloat16, got ", s);
}

void check_shape(const Tensor& t, at::IntArrayRef want, const char* name) {
  TORCH_CHECK(t.sizes() == want, "fastseq_cpp (CUDA): ", name, ": expected shape ", want, ", got ", t.sizes());
}

void check_arg(const Tensor& t, at::IntArrayRef want, const char* name, const at::Device& dev) {
  check_float_cuda(t, name, dev);
  check_shape(t, want, name);
}

void check_dims(const Tensor& t, int64_t dims, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dims, "fastseq_cpp (CUDA): ", name, ": expected a ", dims, "-D tensor ", layout,
              ", got shape ", t.sizes());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastseq_cpp (CUDA): ", op, ": kernel launch failed: ", error_string(err));
}

// int64 lengths on `dev` (a CPU lengths tensor is copied over), or undefined.
Tensor lengths_on(const OptTensor& lengths, int64_t B, const at::Device& dev) {
  if (!has(lengths)) return Tensor();
  const Tensor& l = *lengths;
  TORCH_CHECK(l.dim() == 1 && l.size(0) == B, "fastseq_cpp (CUDA): lengths: expected shape [", B, "], got ",
              l.sizes());
  TORCH_CHECK(at::isIntegralType(l.scalar_type(), /*includeBool=*/false),
              "fastseq_cpp (CUDA): lengths: expected an integer tensor, got ", l.scalar_type());
  return l.to(dev, at::kLong).contiguous();
}

// `t` itself if its last dimension is contiguous (any row stride), else a copy.
Tensor rows_contig(const Tensor& t) { return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous(); }

// Pointer `elems` elements past the start of `t` (which must be defined).
void* at_elem(const Tensor& t, int64_t elems) {
  return static_cast<char*>(t.data_ptr()) + elems * static_cast<int64_t>(t.element_size());
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// The dtype the kernels read `ts` in: their dtype when they share one that
// computes in `cd`, else `cd` itself (then every one of them is converted).
at::ScalarType storage_dtype(std::initializer_list<const Tensor*> ts, at::ScalarType cd) {
  const at::ScalarType s = (*ts.begin())->scalar_type();
  for (const Tensor* t : ts) {
    if (t->scalar_type() != s) return cd;
  }
  return compute_dtype(s) == cd ? s : cd;
}

// dW = sum_t dG[t]^T h_{t-1} (h_{-1} = h0): step 0 against h0, the other steps
// as one product, without materialising [h0; hs[:-1]].
Tensor weight_grad(const Tensor& dG, const Tensor& h_init, const Tensor& hs_cd, int64_t GH) {
  const int64_t T = dG.size(0), B = dG.size(1), H = h_init.size(1);
  Tensor dw = at::zeros({GH, H}, dG.options());
  if (T > 0) {
    at::mm_out(dw, dG.select(0, 0).t(), h_init);
    if (T > 1) {
      dw.addmm_(dG.narrow(0, 1, T - 1).reshape({(T - 1) * B, GH}).t(),
                hs_cd.narrow(0, 0, T - 1).reshape({(T - 1) * B, H}));
    }
  }
  return dw;
}

// ---------------------------------------------------------------- step loops
//
// The recurrent state: h_t (c_t) in the compute dtype. For float32/float64
// inputs it is the output hs[t] (cs[t]) itself; for half inputs it is carried
// in float32 between steps (never rounded to half, like the reference) in a
// ping-pong pair `carry` [2, B, H], and hs[t] only stores it.

// The state after step t (t = -1: the initial state).
Tensor state_after(int64_t t, const Tensor& init, const Tensor& out, const Tensor& carry) {
  if (t < 0) return init;
  return carry.defined() ? carry.select(0, t & 1) : out.select(0, t);
}

// Where step t writes the float32 carry of the state, or nullptr without one.
void* carry_out(int64_t t, const Tensor& carry) {
  return carry.defined() ? carry.select(0, t & 1).data_ptr() : nullptr;
}

// The forward step loop shared by the GRU and the LSTM: for t = 0..T-1, the
// recurrent product gh = h_{t-1} W_hh^T (cuBLAS, no bias), then launch(t,
// h_{t-1}) runs the fused pointwise kernel of step t (gates, state update,
// lengths mask, hs[t] and the saved gates).
template <typename Launch>
void forward_steps(int64_t T, const Tensor& h_init, const Tensor& hs, const Tensor& h_carry, const Tensor& wt,
                   Tensor& gh, const Launch& launch) {
  for (int64_t t = 0; t < T; ++t) {
    const Tensor h_prev = state_after(t - 1, h_init, hs, h_carry);
    at::mm_out(gh, h_prev, wt);
    launch(t, h_prev);
  }
}

// The backward step loop shared by the GRU and the LSTM: for t = T-1..0,
// launch(t) runs the fused pointwise kernel of step t (writing dgate[t] and
// leaving the carry part of dh_{t-1} in dh), then dh += dgate[t] @ W_hh
// (cuBLAS) completes dh_{t-1}.
template <typename Launch>
void backward_steps(int64_t T, const Tensor& dgate, const Tensor& w, Tensor& dh, const Launch& launch) {
  for (int64_t t = T - 1; t >= 0; --t) {
    launch(t);
    dh.addmm_(dgate.select(0, t), w);
  }
}

// ---------------------------------------------------------- packed step loops
//
// The packed layout (naive.py, "packed layout"): rows of step t at offsets[t]
// .. offsets[t] + batch_sizes[t]. The steps in the order they run: the step's
// rows are off .. off + n; rows b < p_n read their previous state at
// p_off + b, the others from h0[b] (c0[b]); p_n = 0 at the first step. The
// forward direction always has p_n = n; the reverse one p_n = batch_sizes[t+1].

struct PackedStep {
  int64_t off, n, p_off, p_n;
};

std::vector<PackedStep> packed_steps(const Tensor& batch_sizes, int64_t N, int64_t B, bool reverse) {
  TORCH_CHECK(batch_sizes.defined() && batch_sizes.dim() == 1 && batch_sizes.device().is_cpu() &&
                  batch_sizes.scalar_type() == at::kLong,
              "fastseq_cpp (CUDA): batch_sizes: expected a 1-D int64 CPU tensor, got ",
              batch_sizes.defined() ? batch_sizes.toString() : std::string("an undefined tensor"));
  const Tensor bs_t = batch_sizes.contiguous();
  const int64_t* bs = bs_t.data_ptr<int64_t>();
  const int64_t T = bs_t.numel();
  std::vector<int64_t> offsets(T, 0);
  int64_t total = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(bs[t] >= 0 && bs[t] <= B && (t == 0 || bs[t] <= bs[t - 1]),
                "fastseq_cpp (CUDA): batch_sizes: expected non-increasing values in [0, ", B, "], got ",
                batch_sizes);
    offsets[t] = total;
    total += bs[t];
  }
  TORCH_CHECK(total == N, "fastseq_cpp (CUDA): batch_sizes: expected a sum of N = ", N, ", got ", total);
  std::vector<PackedStep> steps;
  steps.reserve(T);
  int64_t prev = -1;
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = reverse ? T - 1 - k : k;
    if (prev < 0) {
      steps.push_back({offsets[t], bs[t], 0, 0});
    } else {
      steps.push_back({offsets[t], bs[t], offsets[prev], std::min(bs[prev], bs[t])});
    }
    prev = t;
  }
  return steps;
}

// gh[:n] = h_prev W_hh^T for a step's rows (cuBLAS, no bias): rows < p_n from
// the packed states, the others from h_init (two GEMMs when the step has both).
void packed_recurrent_product(const PackedStep& s, const Tensor& states, const Tensor& h_init, const Tensor& wt,
                              Tensor& gh) {
  if (s.p_n > 0) {
    Tensor out = gh.narrow(0, 0, s.p_n);
    at::mm_out(out, states.narrow(0, s.p_off, s.p_n), wt);
  }
  if (s.n > s.p_n) {
    Tensor out = gh.narrow(0, s.p_n, s.n - s.p_n);
    at::mm_out(out, h_init.narrow(0, s.p_n, s.n - s.p_n), wt);
  }
}

// The forward step loop of the packed layout: per step the recurrent product
// of its rows, then launch(step) runs the fused pointwise kernel of the step.
// `states`: the packed states in the compute dtype ([N, H]).
template <typename Launch>
void packed_forward_steps(const std::vector<PackedStep>& steps, const Tensor& h_init, const Tensor& states,
                          const Tensor& wt, Tensor& gh, const Launch& launch) {
  for (const PackedStep& s : steps) {
    packed_recurrent_product(s, states, h_init, wt, gh);
    launch(s);
  }
}

// The backward step loop of the packed layout: the steps in reverse order;
// launch(step) writes dgate of its rows and leaves the carry part of dh[:n],
// then dh[:n] += dgate[rows] @ W_hh. Rows of dh past a step's n keep the
// gradient into h0 (the rows started there).
template <typename Launch>
void packed_backward_steps(const std::vector<PackedStep>& steps, const Tensor& dgate, const Tensor& w, Tensor& dh,
                           const Launch& launch) {
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    launch(*it);
    if (it->n > 0) dh.narrow(0, 0, it->n).addmm_(dgate.narrow(0, it->off, it->n), w);
  }
}

// dW = dG^T h_prev_packed: [N, H] holding every row's previous state (the
// packed states in the compute dtype, or h_init), assembled per step.
Tensor packed_weight_grad(const std::vector<PackedStep>& steps, const Tensor& dG, const Tensor& states_cd,
                          const Tensor& h_init) {
  Tensor h_prev = at::empty({dG.size(0), h_init.size(1)}, dG.options());
  for (const PackedStep& s : steps) {
    if (s.p_n > 0) h_prev.narrow(0, s.off, s.p_n).copy_(states_cd.narrow(0, s.p_off, s.p_n));
    if (s.n > s.p_n) h_prev.narrow(0, s.off + s.p_n, s.n - s.p_n).copy_(h_init.narrow(0, s.p_n, s.n - s.p_n));
  }
  return at::mm(dG.t(), h_prev);
}

// ------------------------------------------------------- persistent forward

enum class PersistentMode { Off, On, Auto };

// FASTSEQ_CUDA_PERSISTENT (see the top of this file).
PersistentMode persistent_mode() {
  const char* v = std::getenv("FASTSEQ_CUDA_PERSISTENT");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "0") == 0) return PersistentMode::Off;
  if (std::strcmp(v, "auto") == 0) return PersistentMode::Auto;
  if (std::strcmp(v, "1") == 0) return PersistentMode::On;
  TORCH_CHECK(false, "fastseq_cpp (CUDA): FASTSEQ_CUDA_PERSISTENT: expected 0, 1 or auto, got '", v, "'");
  return PersistentMode::Off;  // not reached
}

// The positive integer in the environment variable `name`, 0 when it is unset or empty;
// raises naming the variable on anything else.
int64_t positive_env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && n > 0, "fastseq_cpp (CUDA): ", name,
              ": expected a positive integer, got '", v, "'");
  return n;
}

// FASTSEQ_CUDA_PERSISTENT_BLOCKS: the grid size asked for, 0 for the default.
int64_t persistent_blocks() { return positive_env("FASTSEQ_CUDA_PERSISTENT_BLOCKS"); }

// FASTSEQ_CUDA_PERSISTENT_MMA (see the top of this file): 0 keeps half-precision
// forwards and backwards off the tensor-core persistent kernels.
bool mma_enabled() {
  const char* v = std::getenv("FASTSEQ_CUDA_PERSISTENT_MMA");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "1") == 0) return true;
  TORCH_CHECK(std::strcmp(v, "0") == 0, "fastseq_cpp (CUDA): FASTSEQ_CUDA_PERSISTENT_MMA: expected 0 or 1, got '", v,
              "'");
  return false;
}

// FASTSEQ_CUDA_PERSISTENT_ROW_TILES (see the top of this file): the batch row tiles asked of
// the tensor-core forward, 0 for the plan's choice.
int64_t persistent_row_tiles() { return positive_env("FASTSEQ_CUDA_PERSISTENT_ROW_TILES"); }

// FASTSEQ_CUDA_PERSISTENT_CLUSTER (see the top of this file): the cluster size asked of
// the tensor-core backward, -1 for auto, 0 for none.
int64_t persistent_cluster() {
  const char* v = std::getenv("FASTSEQ_CUDA_PERSISTENT_CLUSTER");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return -1;
  if (std::strcmp(v, "0") == 0) return 0;
  if (std::strcmp(v, "2") == 0) return 2;
  if (std::strcmp(v, "4") == 0) return 4;
  if (std::strcmp(v, "8") == 0) return 8;
  TORCH_CHECK(false, "fastseq_cpp (CUDA): FASTSEQ_CUDA_PERSISTENT_CLUSTER: expected auto, 0, 2, 4 or 8, got '", v,
              "'");
  return 0;
}

// FASTSEQ_CUDA_PERSISTENT_SYNC (see the top of this file): whether the tensor-core forward
// exchanges h_{t-1} as tagged words (tagged) instead of through a grid barrier (grid, the default).
bool persistent_tagged() {
  const char* v = std::getenv("FASTSEQ_CUDA_PERSISTENT_SYNC");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "grid") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "tagged") == 0, "fastseq_cpp (CUDA): FASTSEQ_CUDA_PERSISTENT_SYNC: expected grid or "
              "tagged, got '", v, "'");
  return true;
}

// The persistent kernel's plan for this call, or a plan with blocks = 0 when
// the per-step loop runs (mode, sizes, dtypes or device); raises when the mode
// is On and the kernel does not apply.
// `st`: the storage dtype of the kernel's inputs; W_hh must have it.
RecurrencePersistentPlan persistent_plan(int64_t G, int64_t T, int64_t B, int64_t H, at::ScalarType st,
                                         const Tensor& w_hh, bool backward, const char* op) {
  RecurrencePersistentPlan plan{};
  const PersistentMode mode = persistent_mode();
#ifdef FASTSEQ_CUDA_HOST_EMULATION
  if (mode == PersistentMode::Auto) return plan;  // no device to decide on
#endif
  if (mode == PersistentMode::Off) return plan;
  const int64_t blocks = persistent_blocks();
  if (T == 0 || B == 0 || H == 0) return plan;  // nothing to launch: both paths return empty outputs
  if (w_hh.scalar_type() != st) {
    plan.reason = "w_hh's dtype differs from the other inputs' (W_hh is kept in their dtype)";
  } else {
    // Half precision: the tensor-core kernels first (forward: W_hh in registers; backward:
    // W_hh^T in shared memory).
    // The backward tries the cluster kernel first; a cluster size asked for by name has
    // no fallback.
    const bool half = st == at::kHalf || st == at::kBFloat16;
    const int64_t cluster = half && mma_enabled() && backward ? persistent_cluster() : 0;
    if (cluster != 0)
      check_launch(recurrence_persistent_mma_backward_plan(dtype_tag(st), G, B, H, blocks, cluster, &plan), op);
    if (half && mma_enabled() && plan.blocks == 0 && cluster <= 0)
      check_launch(backward ? recurrence_persistent_mma_backward_plan(dtype_tag(st), G, B, H, blocks, 0, &plan)
                            : recurrence_persistent_mma_plan(dtype_tag(st), G, B, H, blocks,
                                                             persistent_row_tiles(), persistent_tagged(), &plan),
                   op);
    if (plan.blocks == 0 && cluster <= 0)
      check_launch(recurrence_persistent_plan(dtype_tag(st), G, B, H, blocks, backward, &plan), op);
  }
  TORCH_CHECK(mode != PersistentMode::On || plan.blocks > 0, "fastseq_cpp (CUDA): ", op,
              ": FASTSEQ_CUDA_PERSISTENT=1 but the persistent kernel does not apply: ", plan.reason);
  return plan;
}

// The forward of the persistent kernel (GRU when c_init is undefined, else
// LSTM): fills hs (cs) and gates.
void persistent_forward(const RecurrencePersistentPlan& plan, const Tensor& x, const Tensor& w_hh,
                        const Tensor& bias, const Tensor& lens, const Tensor& h_init, const Tensor& c_init,
                        Tensor& hs, Tensor* cs, Tensor& gates, bool save_gates, cudaStream_t stream, const char* op) {
  const int64_t T = hs.size(0), B = hs.size(1), H = hs.size(2);
  const Tensor w = w_hh.contiguous();
  Tensor h_state = at::empty({2, B, H}, h_init.options());
  h_state.select(0, 1).copy_(h_init);  // the kernel reads the state before step 0 from h_state[1]
  const Tensor c_state = c_init.defined() ? c_init.clone() : Tensor();
  RecurrencePersistentFwd a{};
  a.gi = x.data_ptr();
  a.ld_t = x.stride(0);
  a.ld_b = x.stride(1);
  a.w_hh = w.data_ptr();
  a.bias = ptr_or_null(bias);
  a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  a.T = T;
  a.B = B;
  a.H = H;
  a.h_state = h_state.data_ptr();
  a.c_state = c_state.defined() ? c_state.data_ptr() : nullptr;
  a.hs = hs.data_ptr();
  a.cs = cs != nullptr ? cs->data_ptr() : nullptr;
  a.gates = save_gates ? gates.data_ptr() : nullptr;
  a.plan = plan;
  const DType tag = dtype_tag(x.scalar_type());
  if (plan.m_tiles > 0) {  // the tensor-core kernel: h_{t-1} in the storage dtype, zero-padded to 16s
    const int64_t rows = (B + 15) / 16 * 16, ld = (H + 15) / 16 * 16;
    const Tensor h_op = at::zeros({2, rows, ld}, x.options().dtype(w.scalar_type()));
    h_op.select(0, 1).narrow(0, 0, B).narrow(1, 0, H).copy_(h_init);
    a.h_op = h_op.data_ptr();
    a.ld_op = ld;
    a.rows_op = rows;
    Tensor h_tagged;
    if (plan.tagged) {  // (tag << 16) | the 16 bits of h: h0 with tag 0xFFFF (step -1), the other buffer 0xFFFE
      h_tagged = at::empty({2, rows, ld}, x.options().dtype(at::kInt));
      h_tagged.select(0, 0).fill_(static_cast<int32_t>(0xFFFE0000u));
      h_tagged.select(0, 1).copy_(h_op.select(0, 1).view(at::kShort).to(at::kInt).bitwise_and(0xFFFF).bitwise_or(
          static_cast<int32_t>(0xFFFF0000u)));
      a.h_tagged = reinterpret_cast<unsigned int*>(h_tagged.data_ptr<int32_t>());
    }
    check_launch(c_init.defined() ? lstm_forward_persistent_mma(tag, a, stream)
                                  : gru_forward_persistent_mma(tag, a, stream),
                 op);
    return;
  }
  check_launch(c_init.defined() ? lstm_forward_persistent(tag, a, stream) : gru_forward_persistent(tag, a, stream),
               op);
}

// The backward of the persistent kernel (GRU when grad_cs is undefined, else
// LSTM): fills dg (and dg_s), leaves grad h0 (c0) in dh (dc). `prev`: hs (GRU)
// or cs (LSTM) in the storage dtype; `init`: h0 (GRU) or c0 (LSTM) in the
// compute dtype.
void persistent_backward(const RecurrencePersistentPlan& plan, const Tensor& grad_hs, const Tensor& grad_cs,
                         const Tensor& gates, const Tensor& prev, const Tensor& init, const Tensor& w_hh,
                         const Tensor& lens, Tensor& dh, Tensor* dc, Tensor& dg, const Tensor& dg_s,
                         cudaStream_t stream, const char* op) {
  const bool lstm = grad_cs.defined();
  const Tensor w = w_hh.contiguous();
  RecurrencePersistentBwd a{};
  a.grad_hs = grad_hs.data_ptr();
  a.grad_cs = lstm ? grad_cs.data_ptr() : nullptr;
  a.gates = gates.data_ptr();
  a.hs = lstm ? nullptr : prev.data_ptr();
  a.cs = lstm ? prev.data_ptr() : nullptr;
  a.h0 = lstm ? nullptr : init.data_ptr();
  a.c0 = lstm ? init.data_ptr() : nullptr;
  a.w_hh = w.data_ptr();
  a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  a.T = grad_hs.size(0);
  a.B = grad_hs.size(1);
  a.H = grad_hs.size(2);
  a.dh = dh.data_ptr();
  a.dc = dc != nullptr ? dc->data_ptr() : nullptr;
  a.dg = dg.data_ptr();
  a.dg_s = dg_s.defined() ? dg_s.data_ptr() : nullptr;
  a.plan = plan;
  const DType tag = dtype_tag(grad_hs.scalar_type());
  if (plan.m_tiles > 0) {  // the tensor-core kernel: dG[t] in the storage dtype, zero-padded to 16s
    const int64_t G = lstm ? 4 : 3;
    const int64_t rows = (a.B + 15) / 16 * 16, ld = (G * a.H + 15) / 16 * 16;
    const Tensor dg_op = at::zeros({2, rows, ld}, grad_hs.options().dtype(w.scalar_type()));
    a.dg_op = dg_op.data_ptr();
    a.ld_op = ld;
    a.rows_op = rows;
    cudaError_t err = lstm ? lstm_backward_persistent_mma(tag, a, stream) : gru_backward_persistent_mma(tag, a, stream);
    if (err != cudaSuccess && plan.cluster > 0 && persistent_cluster() < 0) {
      // FASTSEQ_CUDA_PERSISTENT_CLUSTER=auto: a cluster launch the device refuses (a launch-time
      // error: nothing ran) falls back to the block kernel, warned once. A size asked for by
      // name raises instead.
#ifndef FASTSEQ_CUDA_HOST_EMULATION
      (void)cudaGetLastError();  // clear the launch's error state
#endif
      RecurrencePersistentPlan block{};
      check_launch(recurrence_persistent_mma_backward_plan(tag, G, a.B, a.H, persistent_blocks(), 0, &block), op);
      if (block.blocks > 0) {
        TORCH_WARN_ONCE("fastseq_cpp (CUDA): ", op, ": the cluster backward's launch failed (", error_string(err),
                        "); running the block kernel instead (FASTSEQ_CUDA_PERSISTENT_CLUSTER=0 skips the attempt)");
        a.plan = block;
        err = lstm ? lstm_backward_persistent_mma(tag, a, stream) : gru_backward_persistent_mma(tag, a, stream);
      }
    }
    check_launch(err, op);
    return;
  }
  check_launch(lstm ? lstm_backward_persistent(tag, a, stream) : gru_backward_persistent(tag, a, stream), op);
}

// ====================================================================== GRU

std::tuple<Tensor, Tensor> gru_recurrence_forward(const Tensor& gi, const Tensor& h0, const Tensor& w_hh,
                                                  const OptTensor& b_hh, const OptTensor& lengths,
                                                  bool save_gates) {
  check_dims(gi, 3, "gi", "[T, B, 3H]");
  const at::Device dev = gi.device();
  check_float_cuda(gi, "gi", dev);
  TORCH_CHECK(gi.size(2) % 3 == 0, "fastseq_cpp (CUDA): gi: last dimension ", gi.size(2), " is not 3H");
  const int64_t T = gi.size(0), B = gi.size(1), H = gi.size(2) / 3;
  check_arg(h0, {B, H}, "h0", dev);
  check_arg(w_hh, {3 * H, H}, "w_hh", dev);
  if (has(b_hh)) check_arg(*b_hh, {3 * H}, "b_hh", dev);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto st = gi.scalar_type();
  const auto cd = compute_dtype(st);
  const auto opt_cd = gi.options().dtype(cd);
  const Tensor x = gi.stride(2) == 1 ? gi : gi.contiguous();
  const Tensor bias = has(b_hh) ? b_hh->to(cd).contiguous() : Tensor();
  const Tensor h_init = h0.to(cd).contiguous();
  const Tensor lens = lengths_on(lengths, B, dev);
  Tensor hs = at::empty({T, B, H}, gi.options());
  Tensor gates = save_gates ? at::empty({T, B, 4 * H}, gi.options()) : at::empty({0}, gi.options());
  const RecurrencePersistentPlan plan = persistent_plan(3, T, B, H, st, w_hh, false, "gru_recurrence_forward");
  if (plan.blocks > 0) {
    persistent_forward(plan, x, w_hh, bias, lens, h_init, Tensor(), hs, nullptr, gates, save_gates, stream,
                       "gru_recurrence_forward");
    return {hs, gates};
  }
  const Tensor wt = w_hh.to(cd).t();
  Tensor gh = at::empty({B, 3 * H}, opt_cd);
  // Half inputs: the state is carried in float32 (ping-pong), hs only stores it.
  const Tensor state = st != cd ? at::empty({2, B, H}, opt_cd) : Tensor();

  GruFwdStep a{};
  a.ld_gi = x.stride(1);
  a.gh = gh.data_ptr();
  a.bias = ptr_or_null(bias);
  a.ld_h = H;
  a.n_prev = B;  // every row's previous state is h_prev
  a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  a.B = B;
  a.H = H;
  const DType tag = dtype_tag(st);
  forward_steps(T, h_init, hs, state, wt, gh, [&](int64_t t, const Tensor& h_prev) {
    a.t = t;
    a.gi = at_elem(x, t * x.stride(0));
    a.h_prev = h_prev.data_ptr();
    a.h_state = carry_out(t, state);
    a.hs_out = at_elem(hs, t * B * H);
    a.gates = save_gates ? at_elem(gates, t * B * 4 * H) : nullptr;
    check_launch(gru_forward_step(tag, a, stream), "gru_recurrence_forward");
  });
  return {hs, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_recurrence_backward(const Tensor& grad_hs, const Tensor& h0,
                                                                   const Tensor& w_hh, const Tensor& hs,
                                                                   const Tensor& gates, const OptTensor& lengths,
                                                                   bool has_bias, bool grad_h0) {
  check_dims(hs, 3, "hs", "[T, B, H]");
  const at::Device dev = hs.device();
  check_float_cuda(hs, "hs", dev);
  const int64_t T = hs.size(0), B = hs.size(1), H = hs.size(2);
  check_arg(grad_hs, {T, B, H}, "grad_hs", dev);
  check_arg(h0, {B, H}, "h0", dev);
  check_arg(w_hh, {3 * H, H}, "w_hh", dev);
  check_arg(gates, {T, B, 4 * H}, "gates", dev);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto cd = compute_dtype(hs.scalar_type());
  const auto st = storage_dtype({&hs, &grad_hs, &gates}, cd);
  const auto opt_cd = hs.options().dtype(cd);
  const Tensor gy = grad_hs.to(st).contiguous();
  const Tensor g = gates.to(st).contiguous();
  const Tensor hs_k = hs.to(st).contiguous();
  const Tensor h_init = h0.to(cd).contiguous();
  const Tensor lens = lengths_on(lengths, B, dev);
  Tensor dgi = at::empty({T, B, 3 * H}, hs.options().dtype(st));
  Tensor dgh = at::empty({T, B, 3 * H}, opt_cd);
  Tensor dh = at::zeros({B, H}, opt_cd);

  GruBwdStep a{};
  a.h_prev_c = h_init.data_ptr();
  a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  a.B = B;
  a.H = H;
  a.dh = dh.data_ptr();
  const DType tag = dtype_tag(st);
  const RecurrencePersistentPlan plan = persistent_plan(3, T, B, H, st, w_hh, true, "gru_recurrence_backward");
  if (plan.blocks > 0) {
    persistent_backward(plan, gy, Tensor(), g, hs_k, h_init, w_hh, lens, dh, nullptr, dgh, dgi, stream,
                        "gru_recurrence_backward");
  } else {
    const Tensor w = w_hh.to(cd);
    backward_steps(T, dgh, w, dh, [&](int64_t t) {  // dh = d z + dgh[t] @ W_hh
      a.t = t;
      a.grad_hs = at_elem(gy, t * B * H);
      a.gates = at_elem(g, t * B * 4 * H);
      a.h_prev_s = t > 0 ? at_elem(hs_k, (t - 1) * B * H) : nullptr;
      a.n_prev = t > 0 ? B : 0;  // step 0 reads h0 (h_prev_c)
      a.dgi = at_elem(dgi, t * B * 3 * H);
      a.dgh = at_elem(dgh, t * B * 3 * H);
      check_launch(gru_backward_step(tag, a, stream), "gru_recurrence_backward");
    });
  }

  const Tensor dw = weight_grad(dgh, h_init, hs_k.to(cd), 3 * H);
  const auto wdt = w_hh.scalar_type();
  Tensor db = has_bias ? dgh.sum(at::IntArrayRef{0, 1}).to(wdt) : at::empty({0}, w_hh.options());
  return {dgi.to(hs.scalar_type()), grad_h0 ? dh.to(h0.scalar_type()) : at::empty({0}, h0.options()), dw.to(wdt), db};
}

// ===================================================================== LSTM

std::tuple<Tensor, Tensor, Tensor> lstm_recurrence_forward(const Tensor& gi, const Tensor& h0, const Tensor& c0,
                                                           const Tensor& w_hh, const OptTensor& b_hh,
                                                           const OptTensor& lengths, bool save_gates) {
  check_dims(gi, 3, "gi", "[T, B, 4H]");
  const at::Device dev = gi.device();
  check_float_cuda(gi, "gi", dev);
  TORCH_CHECK(gi.size(2) % 4 == 0, "fastseq_cpp (CUDA): gi: last dimension ", gi.size(2), " is not 4H");
  const int64_t T = gi.size(0), B = gi.size(1), H = gi.size(2) / 4;
  check_arg(h0, {B, H}, "h0", dev);
  check_arg(c0, {B, H}, "c0", dev);
  check_arg(w_hh, {4 * H, H}, "w_hh", dev);
  if (has(b_hh)) check_arg(*b_hh, {4 * H}, "b_hh", dev);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto st = gi.scalar_type();
  const auto cd = compute_dtype(st);
  const auto opt_cd = gi.options().dtype(cd);
  const Tensor x = gi.stride(2) == 1 ? gi : gi.contiguous();
  const Tensor bias = has(b_hh) ? b_hh->to(cd).contiguous() : Tensor();
  const Tensor h_init = h0.to(cd).contiguous();
  const Tensor c_init = c0.to(cd).contiguous();
  const Tensor lens = lengths_on(lengths, B, dev);
  Tensor hs = at::empty({T, B, H}, gi.options());
  Tensor cs = at::empty({T, B, H}, gi.options());
  Tensor gates = save_gates ? at::empty({T, B, 4 * H}, gi.options()) : at::empty({0}, gi.options());
  const RecurrencePersistentPlan plan = persistent_plan(4, T, B, H, st, w_hh, false, "lstm_recurrence_forward");
  if (plan.blocks > 0) {
    persistent_forward(plan, x, w_hh, bias, lens, h_init, c_init, hs, &cs, gates, save_gates, stream,
                       "lstm_recurrence_forward");
    return {hs, cs, gates};
  }
  const Tensor wt = w_hh.to(cd).t();
  Tensor gh = at::empty({B, 4 * H}, opt_cd);
  // Half inputs: the states are carried in float32 (ping-pong), hs and cs only store them.
  const Tensor h_state = st != cd ? at::empty({2, B, H}, opt_cd) : Tensor();
  const Tensor c_state = st != cd ? at::empty({2, B, H}, opt_cd) : Tensor();

  LstmFwdStep a{};
  a.ld_gi = x.stride(1);
  a.gh = gh.data_ptr();
  a.bias = ptr_or_null(bias);
  a.ld_h = H;
  a.ld_c = H;
  a.n_prev = B;  // every row's previous state is h_prev, c_prev
  a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  a.B = B;
  a.H = H;
  const DType tag = dtype_tag(st);
  forward_steps(T, h_init, hs, h_state, wt, gh, [&](int64_t t, const Tensor& h_prev) {
    a.t = t;
    a.gi = at_elem(x, t * x.stride(0));
    a.h_prev = h_prev.data_ptr();
    a.c_prev = state_after(t - 1, c_init, cs, c_state).data_ptr();
    a.h_state = carry_out(t, h_state);
    a.c_state = carry_out(t, c_state);
    a.hs_out = at_elem(hs, t * B * H);
    a.cs_out = at_elem(cs, t * B * H);
    a.gates = save_gates ? at_elem(gates, t * B * 4 * H) : nullptr;
    check_launch(lstm_forward_step(tag, a, stream), "lstm_recurrence_forward");
  });
  return {hs, cs, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_recurrence_backward(
    const Tensor& grad_hs, const Tensor& grad_cs, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const Tensor& hs, const Tensor& cs, const Tensor& gates, const OptTensor& lengths, bool has_bias,
    bool grad_h0) {
  check_dims(hs, 3, "hs", "[T, B, H]");
  const at::Device dev = hs.device();
  check_float_cuda(hs, "hs", dev);
  const int64_t T = hs.size(0), B = hs.size(1), H = hs.size(2);
  check_arg(grad_hs, {T, B, H}, "grad_hs", dev);
  check_arg(grad_cs, {T, B, H}, "grad_cs", dev);
  check_arg(cs, {T, B, H}, "cs", dev);
  check_arg(h0, {B, H}, "h0", dev);
  check_arg(c0, {B, H}, "c0", dev);
  check_arg(w_hh, {4 * H, H}, "w_hh", dev);
  check_arg(gates, {T, B, 4 * H}, "gates", dev);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto cd = compute_dtype(hs.scalar_type());
  const auto st = storage_dtype({&hs, &grad_hs, &grad_cs, &cs, &gates}, cd);
  const auto opt_cd = hs.options().dtype(cd);
  const Tensor gy = grad_hs.to(st).contiguous();
  const Tensor gcy = grad_cs.to(st).contiguous();
  const Tensor g = gates.to(st).contiguous();
  const Tensor cs_k = cs.to(st).contiguous();
  const Tensor h_init = h0.to(cd).contiguous();
  const Tensor c_init = c0.to(cd).contiguous();
  const Tensor lens = lengths_on(lengths, B, dev);
  Tensor dg = at::empty({T, B, 4 * H}, opt_cd);
  // float32/float64: grad_gi is dg itself; half: a copy in the storage dtype.
  Tensor dgi_s = st != cd ? at::empty({T, B, 4 * H}, hs.options().dtype(st)) : Tensor();
  Tensor dh = at::zeros({B, H}, opt_cd);
  Tensor dc = at::zeros({B, H}, opt_cd);

  LstmBwdStep a{};
  a.c_prev_c = c_init.data_ptr();
  a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  a.B = B;
  a.H = H;
  a.dh = dh.data_ptr();
  a.dc = dc.data_ptr();
  const DType tag = dtype_tag(st);
  const RecurrencePersistentPlan plan = persistent_plan(4, T, B, H, st, w_hh, true, "lstm_recurrence_backward");
  if (plan.blocks > 0) {
    persistent_backward(plan, gy, gcy, g, cs_k, c_init, w_hh, lens, dh, &dc, dg, dgi_s, stream,
                        "lstm_recurrence_backward");
  } else {
    const Tensor w = w_hh.to(cd);
    backward_steps(T, dg, w, dh, [&](int64_t t) {  // dh = dg[t] @ W_hh (or the passed-through dh)
      a.t = t;
      a.grad_hs = at_elem(gy, t * B * H);
      a.grad_cs = at_elem(gcy, t * B * H);
      a.gates = at_elem(g, t * B * 4 * H);
      a.c = at_elem(cs_k, t * B * H);
      a.c_prev_s = t > 0 ? at_elem(cs_k, (t - 1) * B * H) : nullptr;
      a.n_prev = t > 0 ? B : 0;  // step 0 reads c0 (c_prev_c)
      a.dg = at_elem(dg, t * B * 4 * H);
      a.dgi_s = dgi_s.defined() ? at_elem(dgi_s, t * B * 4 * H) : nullptr;
      check_launch(lstm_backward_step(tag, a, stream), "lstm_recurrence_backward");
    });
  }

  const Tensor dw = weight_grad(dg, h_init, hs.to(cd), 4 * H);
  const auto wdt = w_hh.scalar_type();
  Tensor db = has_bias ? dg.sum(at::IntArrayRef{0, 1}).to(wdt) : at::empty({0}, w_hh.options());
  const Tensor dgi = dgi_s.defined() ? dgi_s : dg;
  if (!grad_h0) return {dgi.to(hs.scalar_type()), at::empty({0}, h0.options()), at::empty({0}, c0.options()), dw.to(wdt), db};
  return {dgi.to(hs.scalar_type()), dh.to(h0.scalar_type()), dc.to(c0.scalar_type()), dw.to(wdt), db};
}

// ============================================================= packed layout
//
// The recurrences on a PackedSequence's own layout (naive.py, "packed
// layout"): per step one GEMM over the step's rows (two in the reverse
// direction when rows start there) and one launch of the dense pointwise
// kernels on the step's rows (kernels.h, "Packed layout"). The state is read
// back from the packed outputs; for half inputs a float32 copy of the packed
// states is kept (the state is never rounded to half between steps).

std::tuple<Tensor, Tensor> gru_packed_recurrence_forward(const Tensor& gi, const Tensor& h0, const Tensor& w_hh,
                                                         const OptTensor& b_hh, const Tensor& batch_sizes,
                                                         bool reverse, bool save_gates) {
  check_dims(gi, 2, "gi", "[N, 3H]");
  check_dims(h0, 2, "h0", "[B, H]");
  const at::Device dev = gi.device();
  check_float_cuda(gi, "gi", dev);
  TORCH_CHECK(gi.size(1) % 3 == 0, "fastseq_cpp (CUDA): gi: last dimension ", gi.size(1), " is not 3H");
  const int64_t N = gi.size(0), B = h0.size(0), H = gi.size(1) / 3;
  check_arg(h0, {B, H}, "h0", dev);
  check_arg(w_hh, {3 * H, H}, "w_hh", dev);
  if (has(b_hh)) check_arg(*b_hh, {3 * H}, "b_hh", dev);
  const std::vector<PackedStep> steps = packed_steps(batch_sizes, N, B, reverse);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto st = gi.scalar_type();
  const auto cd = compute_dtype(st);
  const auto opt_cd = gi.options().dtype(cd);
  const Tensor x = rows_contig(gi);
  const Tensor wt = w_hh.to(cd).t();
  const Tensor bias = has(b_hh) ? b_hh->to(cd).contiguous() : Tensor();
  const Tensor h_init = h0.to(cd).contiguous();
  Tensor hs = at::empty({N, H}, gi.options());
  Tensor gates = save_gates ? at::empty({N, 4 * H}, gi.options()) : at::empty({0}, gi.options());
  Tensor gh = at::empty({B, 3 * H}, opt_cd);
  // The packed states in the compute dtype: hs itself, or a float32 copy for half inputs.
  const Tensor h_state = st != cd ? at::empty({N, H}, opt_cd) : hs;

  GruFwdStep a{};
  a.ld_gi = x.stride(0);
  a.gh = gh.data_ptr();
  a.bias = ptr_or_null(bias);
  a.ld_h = H;
  a.h_alt = h_init.data_ptr();
  a.H = H;
  const DType tag = dtype_tag(st);
  packed_forward_steps(steps, h_init, h_state, wt, gh, [&](const PackedStep& s) {
    a.gi = at_elem(x, s.off * x.stride(0));
    a.h_prev = s.p_n > 0 ? at_elem(h_state, s.p_off * H) : nullptr;
    a.n_prev = s.p_n;
    a.B = s.n;
    a.h_state = st != cd ? at_elem(h_state, s.off * H) : nullptr;
    a.hs_out = at_elem(hs, s.off * H);
    a.gates = save_gates ? at_elem(gates, s.off * 4 * H) : nullptr;
    check_launch(gru_forward_step(tag, a, stream), "gru_packed_recurrence_forward");
  });
  return {hs, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_packed_recurrence_backward(
    const Tensor& grad_hs, const Tensor& h0, const Tensor& w_hh, const Tensor& hs, const Tensor& gates,
    const Tensor& batch_sizes, bool reverse, bool has_bias, bool grad_h0) {
  check_dims(hs, 2, "hs", "[N, H]");
  check_dims(h0, 2, "h0", "[B, H]");
  const at::Device dev = hs.device();
  check_float_cuda(hs, "hs", dev);
  const int64_t N = hs.size(0), B = h0.size(0), H = hs.size(1);
  check_arg(grad_hs, {N, H}, "grad_hs", dev);
  check_arg(h0, {B, H}, "h0", dev);
  check_arg(w_hh, {3 * H, H}, "w_hh", dev);
  check_arg(gates, {N, 4 * H}, "gates", dev);
  const std::vector<PackedStep> steps = packed_steps(batch_sizes, N, B, reverse);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto cd = compute_dtype(hs.scalar_type());
  const auto st = storage_dtype({&hs, &grad_hs, &gates}, cd);
  const auto opt_cd = hs.options().dtype(cd);
  const Tensor gy = grad_hs.to(st).contiguous();
  const Tensor g = gates.to(st).contiguous();
  const Tensor hs_k = hs.to(st).contiguous();
  const Tensor w = w_hh.to(cd);
  const Tensor h_init = h0.to(cd).contiguous();
  Tensor dgi = at::empty({N, 3 * H}, hs.options().dtype(st));
  Tensor dgh = at::empty({N, 3 * H}, opt_cd);
  Tensor dh = at::zeros({B, H}, opt_cd);

  GruBwdStep a{};
  a.h_prev_c = h_init.data_ptr();
  a.H = H;
  a.dh = dh.data_ptr();
  const DType tag = dtype_tag(st);
  packed_backward_steps(steps, dgh, w, dh, [&](const PackedStep& s) {  // dh[:n] = d z + dgh[rows] @ W_hh
    a.B = s.n;
    a.n_prev = s.p_n;
    a.grad_hs = at_elem(gy, s.off * H);
    a.gates = at_elem(g, s.off * 4 * H);
    a.h_prev_s = s.p_n > 0 ? at_elem(hs_k, s.p_off * H) : nullptr;
    a.dgi = at_elem(dgi, s.off * 3 * H);
    a.dgh = at_elem(dgh, s.off * 3 * H);
    check_launch(gru_backward_step(tag, a, stream), "gru_packed_recurrence_backward");
  });

  const Tensor dw = packed_weight_grad(steps, dgh, hs_k.to(cd), h_init);
  const auto wdt = w_hh.scalar_type();
  Tensor db = has_bias ? dgh.sum(0).to(wdt) : at::empty({0}, w_hh.options());
  return {dgi.to(hs.scalar_type()), grad_h0 ? dh.to(h0.scalar_type()) : at::empty({0}, h0.options()), dw.to(wdt), db};
}

std::tuple<Tensor, Tensor, Tensor> lstm_packed_recurrence_forward(const Tensor& gi, const Tensor& h0,
                                                                  const Tensor& c0, const Tensor& w_hh,
                                                                  const OptTensor& b_hh, const Tensor& batch_sizes,
                                                                  bool reverse, bool save_gates) {
  check_dims(gi, 2, "gi", "[N, 4H]");
  check_dims(h0, 2, "h0", "[B, H]");
  const at::Device dev = gi.device();
  check_float_cuda(gi, "gi", dev);
  TORCH_CHECK(gi.size(1) % 4 == 0, "fastseq_cpp (CUDA): gi: last dimension ", gi.size(1), " is not 4H");
  const int64_t N = gi.size(0), B = h0.size(0), H = gi.size(1) / 4;
  check_arg(h0, {B, H}, "h0", dev);
  check_arg(c0, {B, H}, "c0", dev);
  check_arg(w_hh, {4 * H, H}, "w_hh", dev);
  if (has(b_hh)) check_arg(*b_hh, {4 * H}, "b_hh", dev);
  const std::vector<PackedStep> steps = packed_steps(batch_sizes, N, B, reverse);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto st = gi.scalar_type();
  const auto cd = compute_dtype(st);
  const auto opt_cd = gi.options().dtype(cd);
  const Tensor x = rows_contig(gi);
  const Tensor wt = w_hh.to(cd).t();
  const Tensor bias = has(b_hh) ? b_hh->to(cd).contiguous() : Tensor();
  const Tensor h_init = h0.to(cd).contiguous();
  const Tensor c_init = c0.to(cd).contiguous();
  Tensor hs = at::empty({N, H}, gi.options());
  Tensor cs = at::empty({N, H}, gi.options());
  Tensor gates = save_gates ? at::empty({N, 4 * H}, gi.options()) : at::empty({0}, gi.options());
  Tensor gh = at::empty({B, 4 * H}, opt_cd);
  // The packed states in the compute dtype: hs / cs themselves, or float32 copies for half inputs.
  const Tensor h_state = st != cd ? at::empty({N, H}, opt_cd) : hs;
  const Tensor c_state = st != cd ? at::empty({N, H}, opt_cd) : cs;

  LstmFwdStep a{};
  a.ld_gi = x.stride(0);
  a.gh = gh.data_ptr();
  a.bias = ptr_or_null(bias);
  a.ld_h = H;
  a.ld_c = H;
  a.h_alt = h_init.data_ptr();
  a.c_alt = c_init.data_ptr();
  a.H = H;
  const DType tag = dtype_tag(st);
  packed_forward_steps(steps, h_init, h_state, wt, gh, [&](const PackedStep& s) {
    a.gi = at_elem(x, s.off * x.stride(0));
    a.h_prev = s.p_n > 0 ? at_elem(h_state, s.p_off * H) : nullptr;
    a.c_prev = s.p_n > 0 ? at_elem(c_state, s.p_off * H) : nullptr;
    a.n_prev = s.p_n;
    a.B = s.n;
    a.h_state = st != cd ? at_elem(h_state, s.off * H) : nullptr;
    a.c_state = st != cd ? at_elem(c_state, s.off * H) : nullptr;
    a.hs_out = at_elem(hs, s.off * H);
    a.cs_out = at_elem(cs, s.off * H);
    a.gates = save_gates ? at_elem(gates, s.off * 4 * H) : nullptr;
    check_launch(lstm_forward_step(tag, a, stream), "lstm_packed_recurrence_forward");
  });
  return {hs, cs, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_packed_recurrence_backward(
    const Tensor& grad_hs, const Tensor& grad_cs, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const Tensor& hs, const Tensor& cs, const Tensor& gates, const Tensor& batch_sizes, bool reverse,
    bool has_bias, bool grad_h0) {
  check_dims(hs, 2, "hs", "[N, H]");
  check_dims(h0, 2, "h0", "[B, H]");
  const at::Device dev = hs.device();
  check_float_cuda(hs, "hs", dev);
  const int64_t N = hs.size(0), B = h0.size(0), H = hs.size(1);
  check_arg(grad_hs, {N, H}, "grad_hs", dev);
  check_arg(grad_cs, {N, H}, "grad_cs", dev);
  check_arg(cs, {N, H}, "cs", dev);
  check_arg(h0, {B, H}, "h0", dev);
  check_arg(c0, {B, H}, "c0", dev);
  check_arg(w_hh, {4 * H, H}, "w_hh", dev);
  check_arg(gates, {N, 4 * H}, "gates", dev);
  const std::vector<PackedStep> steps = packed_steps(batch_sizes, N, B, reverse);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto cd = compute_dtype(hs.scalar_type());
  const auto st = storage_dtype({&hs, &grad_hs, &grad_cs, &cs, &gates}, cd);
  const auto opt_cd = hs.options().dtype(cd);
  const Tensor gy = grad_hs.to(st).contiguous();
  const Tensor gcy = grad_cs.to(st).contiguous();
  const Tensor g = gates.to(st).contiguous();
  const Tensor cs_k = cs.to(st).contiguous();
  const Tensor w = w_hh.to(cd);
  const Tensor h_init = h0.to(cd).contiguous();
  const Tensor c_init = c0.to(cd).contiguous();
  Tensor dg = at::empty({N, 4 * H}, opt_cd);
  // float32/float64: grad_gi is dg itself; half: a copy in the storage dtype.
  Tensor dgi_s = st != cd ? at::empty({N, 4 * H}, hs.options().dtype(st)) : Tensor();
  Tensor dh = at::zeros({B, H}, opt_cd);
  Tensor dc = at::zeros({B, H}, opt_cd);

  LstmBwdStep a{};
  a.c_prev_c = c_init.data_ptr();
  a.H = H;
  a.dh = dh.data_ptr();
  a.dc = dc.data_ptr();
  const DType tag = dtype_tag(st);
  packed_backward_steps(steps, dg, w, dh, [&](const PackedStep& s) {  // dh[:n] = dg[rows] @ W_hh
    a.B = s.n;
    a.n_prev = s.p_n;
    a.grad_hs = at_elem(gy, s.off * H);
    a.grad_cs = at_elem(gcy, s.off * H);
    a.gates = at_elem(g, s.off * 4 * H);
    a.c = at_elem(cs_k, s.off * H);
    a.c_prev_s = s.p_n > 0 ? at_elem(cs_k, s.p_off * H) : nullptr;
    a.dg = at_elem(dg, s.off * 4 * H);
    a.dgi_s = dgi_s.defined() ? at_elem(dgi_s, s.off * 4 * H) : nullptr;
    check_launch(lstm_backward_step(tag, a, stream), "lstm_packed_recurrence_backward");
  });

  const Tensor dw = packed_weight_grad(steps, dg, hs.to(cd), h_init);
  const auto wdt = w_hh.scalar_type();
  Tensor db = has_bias ? dg.sum(0).to(wdt) : at::empty({0}, w_hh.options());
  const Tensor dgi = dgi_s.defined() ? dgi_s : dg;
  if (!grad_h0) return {dgi.to(hs.scalar_type()), at::empty({0}, h0.options()), at::empty({0}, c0.options()), dw.to(wdt), db};
  return {dgi.to(hs.scalar_type()), dh.to(h0.scalar_type()), dc.to(c0.scalar_type()), dw.to(wdt), db};
}

// ================================================================ attention

std::tuple<Tensor, Tensor> additive_attention_forward(const Tensor& query, const Tensor& proj_keys,
                                                      const Tensor& values, const Tensor& energy,
                                                      const OptTensor& mask, const OptTensor& lengths,
                                                      const OptTensor& out_bias) {
  check_dims(query, 3, "query", "[B, T, A]");
  check_dims(values, 3, "values", "[B, S, D]");
  const at::Device dev = values.device();
  check_float_cuda(values, "values", dev);
  const int64_t B = query.size(0), T = query.size(1), A = query.size(2);
  const int64_t S = values.size(1), D = values.size(2);
  check_arg(query, {B, T, A}, "query", dev);
  check_shape(values, {B, S, D}, "values");
  check_arg(proj_keys, {B, S, A}, "proj_keys", dev);
  check_arg(energy, {A}, "energy", dev);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto vt = values.scalar_type();
  const auto cd = compute_dtype(vt);
  const auto st = storage_dtype({&values, &query, &proj_keys, &energy}, cd);
  const Tensor q = rows_contig(query.to(st));
  const Tensor k = rows_contig(proj_keys.to(st));
  const Tensor v = rows_contig(values.to(st));
  const Tensor e = energy.to(st).contiguous();
  // A mask wins over lengths (reference.source_mask); [1, S] / [B, 1] masks broadcast.
  Tensor m;
  if (has(mask)) {
    TORCH_CHECK(mask->dim() == 2, "fastseq_cpp (CUDA): mask: expected a 2-D tensor [B, S], got shape ",
                mask->sizes());
    m = mask->to(dev, at::kBool).expand({B, S}).contiguous();
  }
  const Tensor lens = m.defined() ? Tensor() : lengths_on(lengths, B, dev);
  Tensor ob;  // read in place through its (b, t) strides
  if (has(out_bias)) {
    check_arg(*out_bias, {B, T, D}, "out_bias", dev);
    ob = rows_contig(out_bias->to(st));
  }
  const auto opt_st = values.options().dtype(st);
  Tensor context = at::empty({B, T, D}, opt_st);
  Tensor weights = at::empty({B, T, S}, opt_st);
  const DType tag = dtype_tag(st);
  const int64_t ws_elems = attention_forward_workspace_elems(tag, B, T, S);
  Tensor ws = ws_elems > 0 ? at::empty({ws_elems}, values.options().dtype(cd)) : Tensor();

  AttnFwd a{};
  a.q = q.data_ptr();
  a.sq_b = q.stride(0);
  a.sq_t = q.stride(1);
  a.k = k.data_ptr();
  a.sk_b = k.stride(0);
  a.sk_s = k.stride(1);
  a.v = v.data_ptr();
  a.sv_b = v.stride(0);
  a.sv_s = v.stride(1);
  a.e = e.data_ptr();
  a.mask = m.defined() ? static_cast<const uint8_t*>(m.data_ptr()) : nullptr;
  a.sm_b = S;
  a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  a.B = B;
  a.T = T;
  a.S = S;
  a.A = A;
  a.D = D;
  a.out_bias = ob.defined() ? ob.data_ptr() : nullptr;
  a.sob_b = ob.defined() ? ob.stride(0) : 0;
  a.sob_t = ob.defined() ? ob.stride(1) : 0;
  a.context = context.data_ptr();
  a.weights = weights.data_ptr();
  a.workspace = ws.defined() ? ws.data_ptr() : nullptr;
  check_launch(attention_forward(tag, a, stream), "additive_attention_forward");
  return {context.to(vt), weights.to(vt)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_backward(
    const Tensor& grad_context, const OptTensor& grad_weights, const Tensor& query, const Tensor& proj_keys,
    const Tensor& values, const Tensor& energy, const Tensor& weights) {
  check_dims(query, 3, "query", "[B, T, A]");
  check_dims(values, 3, "values", "[B, S, D]");
  const at::Device dev = values.device();
  check_float_cuda(values, "values", dev);
  const int64_t B = query.size(0), T = query.size(1), A = query.size(2);
  const int64_t S = values.size(1), D = values.size(2);
  check_arg(query, {B, T, A}, "query", dev);
  check_shape(values, {B, S, D}, "values");
  check_arg(proj_keys, {B, S, A}, "proj_keys", dev);
  check_arg(energy, {A}, "energy", dev);
  check_arg(weights, {B, T, S}, "weights", dev);
  check_arg(grad_context, {B, T, D}, "grad_context", dev);
  if (has(grad_weights)) check_arg(*grad_weights, {B, T, S}, "grad_weights", dev);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  // Softmax and weighted-sum part (reference.attention_score_grad), in cd:
  //   dw = grad_context V^T + grad_weights, de = w (dw - sum_j w dw), dV = w^T grad_context
  const auto cd = compute_dtype(values.scalar_type());
  const Tensor w = weights.to(cd);
  const Tensor dc = grad_context.to(cd);
  Tensor dw = at::bmm(dc, values.to(cd).transpose(1, 2));
  if (has(grad_weights)) dw.add_(grad_weights->to(cd));
  const Tensor de = (w * (dw - (w * dw).sum(-1, /*keepdim=*/true))).contiguous();
  const Tensor dvalues = at::bmm(w.transpose(1, 2), dc);

  // Energy part: fused kernels, tanh(q + K) recomputed.
  const auto st = storage_dtype({&query, &proj_keys, &energy}, cd);
  const Tensor q = rows_contig(query.to(st));
  const Tensor k = rows_contig(proj_keys.to(st));
  const Tensor e = energy.to(st).contiguous();
  const auto opt_st = query.options().dtype(st);
  Tensor dq = at::empty({B, T, A}, opt_st);
  Tensor dk = at::empty({B, S, A}, opt_st);
  const int64_t n_chunks = attention_backward_chunks(S);
  Tensor dv_part = at::empty({B * n_chunks, A}, query.options().dtype(cd));

  AttnEnergyBwd a{};
  a.q = q.data_ptr();
  a.sq_b = q.stride(0);
  a.sq_t = q.stride(1);
  a.k = k.data_ptr();
  a.sk_b = k.stride(0);
  a.sk_s = k.stride(1);
  a.e = e.data_ptr();
  a.de = de.data_ptr();
  a.B = B;
  a.T = T;
  a.S = S;
  a.A = A;
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv_part = dv_part.data_ptr();
  check_launch(attention_energy_backward(dtype_tag(st), a, stream), "additive_attention_backward");
  return {dq.to(query.scalar_type()), dk.to(proj_keys.scalar_type()), dvalues.to(values.scalar_type()),
          dv_part.sum(0).to(energy.scalar_type())};
}

// ============================================ GRU cell of the attention decoder

std::tuple<Tensor, Tensor> gru_context_cell_forward(const Tensor& gi, const Tensor& context, const Tensor& w_ic,
                                                    const Tensor& gh, const OptTensor& b_hh, const Tensor& h,
                                                    bool save_gates) {
  check_dims(h, 2, "h", "[B, H]");
  check_dims(context, 2, "context", "[B, D]");
  const at::Device dev = h.device();
  check_float_cuda(h, "h", dev);
  const int64_t B = h.size(0), H = h.size(1), D = context.size(1);
  check_arg(gi, {B, 3 * H}, "gi", dev);
  check_arg(context, {B, D}, "context", dev);
  check_arg(w_ic, {3 * H, D}, "w_ic", dev);
  check_arg(gh, {B, 3 * H}, "gh", dev);
  if (has(b_hh)) check_arg(*b_hh, {3 * H}, "b_hh", dev);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto cd = compute_dtype(gi.scalar_type());
  const Tensor xc = at::mm(context.to(cd), w_ic.to(cd).t()).contiguous();  // context W_ic^T, [B, 3H]
  const auto st = storage_dtype({&gi, &gh, &h}, cd);
  const Tensor x = rows_contig(gi.to(st));
  const Tensor g_h = rows_contig(gh.to(st));
  const Tensor hp = rows_contig(h.to(st));
  const Tensor bias = has(b_hh) ? b_hh->to(cd).contiguous() : Tensor();
  const auto opt_st = gi.options().dtype(st);
  Tensor out = at::empty({B, H}, opt_st);
  Tensor gates = save_gates ? at::empty({B, 4 * H}, opt_st) : at::empty({0}, gi.options());

  GruCellFwd a{};
  a.gi = x.data_ptr();
  a.ld_gi = x.stride(0);
  a.xc = xc.data_ptr();
  a.gh = g_h.data_ptr();
  a.ld_gh = g_h.stride(0);
  a.bias = ptr_or_null(bias);
  a.h = hp.data_ptr();
  a.ld_h = hp.stride(0);
  a.B = B;
  a.H = H;
  a.h_out = out.data_ptr();
  a.gates = save_gates ? gates.data_ptr() : nullptr;
  check_launch(gru_cell_forward(dtype_tag(st), a, stream), "gru_context_cell_forward");
  return {out.to(gi.scalar_type()), gates.to(gi.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_context_cell_backward(
    const Tensor& grad_h, const Tensor& gates, const Tensor& h, const Tensor& context, const Tensor& w_ic,
    bool has_bias) {
  check_dims(h, 2, "h", "[B, H]");
  check_dims(context, 2, "context", "[B, D]");
  const at::Device dev = h.device();
  check_float_cuda(h, "h", dev);
  const int64_t B = h.size(0), H = h.size(1), D = context.size(1);
  check_arg(grad_h, {B, H}, "grad_h", dev);
  check_arg(gates, {B, 4 * H}, "gates", dev);
  check_arg(context, {B, D}, "context", dev);
  check_arg(w_ic, {3 * H, D}, "w_ic", dev);
  const DeviceGuard guard(dev);
  const cudaStream_t stream = stream_of(dev);

  const auto cd = compute_dtype(h.scalar_type());
  const auto st = storage_dtype({&gates, &grad_h, &h}, cd);
  const Tensor gy = grad_h.to(st).contiguous();
  const Tensor g = gates.to(st).contiguous();
  const Tensor hp = rows_contig(h.to(st));
  const auto opt_cd = h.options().dtype(cd);
  const auto opt_st = h.options().dtype(st);
  Tensor dgi_c = at::empty({B, 3 * H}, opt_cd);
  Tensor dgh_c, dgi_s, dgh_s;
  if (st == cd) {
    dgh_c = at::empty({B, 3 * H}, opt_cd);
  } else {
    dgi_s = at::empty({B, 3 * H}, opt_st);
    dgh_s = at::empty({B, 3 * H}, opt_st);
    if (has_bias) dgh_c = at::empty({B, 3 * H}, opt_cd);  // db in the compute dtype
  }
  Tensor dhp = at::empty({B, H}, opt_st);

  GruCellBwd a{};
  a.grad_h = gy.data_ptr();
  a.gates = g.data_ptr();
  a.h = hp.data_ptr();
  a.ld_h = hp.stride(0);
  a.B = B;
  a.H = H;
  a.dgi_c = dgi_c.data_ptr();
  a.dgh_c = dgh_c.defined() ? dgh_c.data_ptr() : nullptr;
  a.dgi_s = dgi_s.defined() ? dgi_s.data_ptr() : nullptr;
  a.dgh_s = dgh_s.defined() ? dgh_s.data_ptr() : nullptr;
  a.dh_prev = dhp.data_ptr();
  check_launch(gru_cell_backward(dtype_tag(st), a, stream), "gru_context_cell_backward");

  const Tensor dctx = at::mm(dgi_c, w_ic.to(cd)).to(context.scalar_type());
  const Tensor dw = at::mm(dgi_c.t(), context.to(cd)).to(w_ic.scalar_type());
  Tensor db = has_bias ? dgh_c.sum(0).to(w_ic.scalar_type()) : at::empty({0}, w_ic.options());
  const auto gdt = gates.scalar_type();
  const Tensor dgi = (st == cd ? dgi_c : dgi_s).to(gdt);
  const Tensor dgh = (st == cd ? dgh_c : dgh_s).to(gdt);
  return {dgi, dctx, dw, dgh, db, dhp.to(h.scalar_type())};
}

// ------------------------------------------------- the step's synchronisation, alone

// persistent_sync_probe (kernels.h): a benchmark op. Raises on a bad argument (naming it) and
// when the device cannot launch the probe (the plan's reason).
Tensor persistent_sync_probe(Tensor& buffer, int64_t blocks, int64_t steps, c10::string_view mode,
                             int64_t cluster) {
  const char* op = "persistent_sync_probe";
  TORCH_CHECK(on_expected_device(buffer), "fastseq_cpp (CUDA): ", op, ": buffer: expected a CUDA tensor, got ",
              buffer.device());
  TORCH_CHECK(buffer.scalar_type() == at::kInt, "fastseq_cpp (CUDA): ", op, ": buffer: expected int32, got ",
              buffer.scalar_type());
  TORCH_CHECK(blocks > 0, "fastseq_cpp (CUDA): ", op, ": blocks: expected a positive integer, got ", blocks);
  TORCH_CHECK(buffer.dim() == 2 && buffer.size(0) == 2 && buffer.is_contiguous() && buffer.size(1) % blocks == 0 &&
                  (buffer.size(1) / blocks) % 4 == 0 && buffer.size(1) > 0,
              "fastseq_cpp (CUDA): ", op, ": buffer: expected a contiguous [2, blocks * words] tensor with words a "
              "positive multiple of 4 (blocks = ", blocks, "), got shape ", buffer.sizes());
  TORCH_CHECK(steps > 0, "fastseq_cpp (CUDA): ", op, ": steps: expected a positive integer, got ", steps);
  SyncProbeMode m = SyncProbeMode::Grid;
  if (mode == "flags") {
    m = SyncProbeMode::Flags;
  } else if (mode == "tagged") {
    m = SyncProbeMode::Tagged;
  } else {
    TORCH_CHECK(mode == "grid", "fastseq_cpp (CUDA): ", op, ": mode: expected grid, flags or tagged, got '",
                std::string(mode), "'");
  }
  TORCH_CHECK(cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8, "fastseq_cpp (CUDA): ", op,
              ": cluster: expected 1, 2, 4 or 8, got ", cluster);
  const at::Device dev = buffer.device();
  const DeviceGuard guard(dev);
  RecurrencePersistentPlan plan{};
  check_launch(persistent_sync_probe_plan(static_cast<int>(m), blocks, cluster, &plan), op);
  TORCH_CHECK(plan.blocks > 0, "fastseq_cpp (CUDA): ", op, ": cannot launch ", blocks, " blocks in clusters of ",
              cluster, ": ", plan.reason);
  buffer.fill_(-1);  // every word's step tag 0xFFFF (see the kernel)
  const Tensor flags = at::zeros({blocks}, buffer.options());
  Tensor sums = at::empty({blocks, kSyncProbeThreads}, buffer.options().dtype(at::kLong));
  SyncProbe a{};
  a.buffer = reinterpret_cast<unsigned int*>(buffer.data_ptr<int32_t>());
  a.flags = reinterpret_cast<unsigned int*>(flags.data_ptr<int32_t>());
  a.sums = reinterpret_cast<unsigned long long*>(sums.data_ptr<int64_t>());
  a.blocks = blocks;
  a.words = buffer.size(1) / blocks;
  a.steps = steps;
  a.mode = static_cast<int>(m);
  a.cluster = static_cast<int>(cluster);
  check_launch(persistent_sync_probe_launch(a, plan, stream_of(dev)), op);
  return sums;
}

}  // namespace
}  // namespace cuda
}  // namespace fastseq

#define FASTSEQ_CUDA_IMPLS(m)                                                                     \
  m.impl("gru_recurrence_forward", &fastseq::cuda::gru_recurrence_forward);                    \
  m.impl("gru_recurrence_backward", &fastseq::cuda::gru_recurrence_backward);                  \
  m.impl("lstm_recurrence_forward", &fastseq::cuda::lstm_recurrence_forward);                  \
  m.impl("lstm_recurrence_backward", &fastseq::cuda::lstm_recurrence_backward);                \
  m.impl("gru_packed_recurrence_forward", &fastseq::cuda::gru_packed_recurrence_forward);      \
  m.impl("gru_packed_recurrence_backward", &fastseq::cuda::gru_packed_recurrence_backward);    \
  m.impl("lstm_packed_recurrence_forward", &fastseq::cuda::lstm_packed_recurrence_forward);    \
  m.impl("lstm_packed_recurrence_backward", &fastseq::cuda::lstm_packed_recurrence_backward);  \
  m.impl("additive_attention_forward", &fastseq::cuda::additive_attention_forward);            \
  m.impl("additive_attention_backward", &fastseq::cuda::additive_attention_backward);          \
  m.impl("gru_context_cell_forward", &fastseq::cuda::gru_context_cell_forward);                \
  m.impl("gru_context_cell_backward", &fastseq::cuda::gru_context_cell_backward);                \
  m.impl("persistent_sync_probe", &fastseq::cuda::persistent_sync_probe)

#ifndef FASTSEQ_CUDA_HOST_EMULATION

// The library name, overridable like the CPU sources' (-DFASTSEQ_CPP_LIBRARY=...; schemas.h).
TORCH_LIBRARY_IMPL(FASTSEQ_CPP_LIBRARY, CUDA, m) {
  FASTSEQ_CUDA_IMPLS(m);
}

#else  // test build: the schemas of csrc/cpu, under another name

TORCH_LIBRARY(fastseq_cuda_emu, m) {
  fastseq::define_all_ops(m);
  // Tests only: the grid barriers completed by the emulated cooperative launches so far.
  m.def("emulated_grid_syncs() -> int", []() -> int64_t { return fastseq::cuda::emulated_grid_syncs(); });
  // Tests only: the warp-level 16 x 16 x 16 MMAs the emulated tensor-core kernels executed so far.
  m.def("emulated_mma_count() -> int", []() -> int64_t { return fastseq::cuda::emulated_mma_count(); });
  m.def("emulated_cluster_syncs() -> int", []() -> int64_t { return fastseq::cuda::emulated_cluster_syncs(); });
  m.def("emulated_take_smem_conflict_ways() -> int",
        []() -> int64_t { return fastseq::cuda::emulated_take_smem_conflict_ways(); });
  m.def("emulated_last_mma_plan() -> int[]",
        []() -> std::vector<int64_t> { return fastseq::cuda::emulated_last_mma_plan(); });
  m.def("emulated_smem_ways_at_pitch(int pitch, bool accumulator) -> int",
        [](int64_t pitch, bool accumulator) -> int64_t {
          return fastseq::cuda::emulated_smem_ways_at_pitch(pitch, accumulator);
        });
}

TORCH_LIBRARY_IMPL(fastseq_cuda_emu, CPU, m) {
  FASTSEQ_CUDA_IMPLS(m);
}

#endif
