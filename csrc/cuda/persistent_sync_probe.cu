// The persistent kernels' fixed cost per step, alone: a benchmark kernel (the `sync` suite,
// bench/suites/sync.py; bench/NOTES.md v0.15) that runs `steps` steps of what every persistent
// recurrence kernel does between its products, and nothing else:
//
//   1. block k writes its slice (`words` 32-bit words) of the step's state buffer
//      (double-buffered: step t writes buffer[t & 1], as the kernels' h_op[t & 1]);
//   2. the blocks synchronise (the mode, below), then, with cluster > 1, the cluster's
//      blocks too (the cluster backward's second barrier);
//   3. every block reads the whole buffer (blocks * words words, 16-byte loads: the
//      kernels' h_{t-1} read from L2) into a checksum;
//   4. a block barrier (the kernels' gate phase follows one), then the next step.
//
// Modes (SyncProbeMode):
//   * Grid: cooperative_groups' grid barrier (detail::grid_sync), what the persistent
//     kernels use today;
//   * Flags: per-block arrival flags (detail::flag_barrier): no shared counter;
//   * Tagged: no barrier at all: each word carries its step in its high 16 bits (its value
//     in the low 16), written and read as single-copy-atomic relaxed 32-bit accesses; a
//     reader re-reads a 16-byte group until its four words carry the step it wants. The
//     data is its own flag (NCCL's LL protocol, with 16-bit halves), so a step costs the
//     writes' visibility and one read, without a fence or a flag's round trip.
//     Why the two buffers are enough here: a block writes buffer[t & 1] at step t only
//     after it read every block's words of step t - 1, each written after its block's
//     block barrier that ended step t - 2, i.e. after that block's reads of buffer[t & 1]
//     at step t - 2. The host fills the buffer with 0xFFFFFFFF (step tag 0xFFFF) before
//     the launch, so no word is taken for step 0 or 1 before it is written.
//
// Checksum: block k's words at step t hold v = (t * blocks + k + 1) & 0xFFFF; each thread
// sums the low 16 bits of the words it read; a block's threads together read every word
// once per step, so each block's total is  sum_t sum_j words * ((t * blocks + j + 1) &
// 0xFFFF). A barrier that does not hold lets a block read words of another step.
//
// Every block owns one SM: the plan asks for more than half an SM's shared memory (the
// kernels' register and shared-memory use does the same), so the grid barrier spans
// `blocks` SMs as in the kernels.
#include <cstring>

#include "persistent_common.cuh"

namespace fastseq {
namespace cuda {
namespace {


template <int Mode>
__global__ void __launch_bounds__(kSyncProbeThreads, 1) persistent_sync_probe_kernel(SyncProbe a) {
  const unsigned int k = blockIdx.x;
  const int64_t total = a.blocks * a.words;  // words per buffer
  unsigned long long sum = 0;
  for (int64_t t = 0; t < a.steps; ++t) {
    unsigned int* buf = a.buffer + (t & 1) * total;
    const unsigned int tag = static_cast<unsigned int>(t & 0xFFFF);
    const unsigned int value = static_cast<unsigned int>((t * a.blocks + k + 1) & 0xFFFF);
    for (int64_t i = threadIdx.x; i < a.words; i += blockDim.x) {
      unsigned int* p = buf + k * a.words + i;
      if (Mode == static_cast<int>(SyncProbeMode::Tagged))
        detail::store_relaxed(p, (tag << 16) | value);
      else
        *p = value;
    }
    if (Mode == static_cast<int>(SyncProbeMode::Grid)) detail::grid_sync();
    if (Mode == static_cast<int>(SyncProbeMode::Flags))
      detail::flag_barrier(a.flags, static_cast<int>(a.blocks), static_cast<unsigned int>(t + 1));
#if FASTSEQ_PERSISTENT_EMULATED || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    if (a.cluster > 1) detail::cluster_sync();
#endif
    for (int64_t i = 4 * static_cast<int64_t>(threadIdx.x); i < total; i += 4 * static_cast<int64_t>(blockDim.x)) {
      unsigned int v[4];
      if (Mode == static_cast<int>(SyncProbeMode::Tagged)) {
        detail::load_relaxed4(buf + i, v);
        while (((v[0] >> 16) != tag || (v[1] >> 16) != tag || (v[2] >> 16) != tag || (v[3] >> 16) != tag) &&
               detail::spinning_allowed()) {
          detail::spin_pause();
          detail::load_relaxed4(buf + i, v);
        }
      } else {
        const uint4 q = *reinterpret_cast<const uint4*>(buf + i);
        v[0] = q.x;
        v[1] = q.y;
        v[2] = q.z;
        v[3] = q.w;
      }
      sum += (v[0] & 0xFFFF) + (v[1] & 0xFFFF) + (v[2] & 0xFFFF) + (v[3] & 0xFFFF);
    }
    __syncthreads();
  }
  a.sums[k * blockDim.x + threadIdx.x] = sum;
}

using ProbeKernel = void (*)(SyncProbe);

ProbeKernel probe_kernel(int mode) {
  switch (mode) {
    case static_cast<int>(SyncProbeMode::Flags):
      return persistent_sync_probe_kernel<static_cast<int>(SyncProbeMode::Flags)>;
    case static_cast<int>(SyncProbeMode::Tagged):
      return persistent_sync_probe_kernel<static_cast<int>(SyncProbeMode::Tagged)>;
    default:
      return persistent_sync_probe_kernel<static_cast<int>(SyncProbeMode::Grid)>;
  }
}

}  // namespace

cudaError_t persistent_sync_probe_plan(int mode, int64_t blocks, int64_t cluster, RecurrencePersistentPlan* plan) {
  *plan = RecurrencePersistentPlan{};
  if (blocks <= 0 || cluster <= 0 || blocks % cluster != 0) {
    plan->reason = "blocks must be a positive multiple of the cluster size";
    return cudaSuccess;
  }
  const ProbeKernel kernel = probe_kernel(mode);
  int64_t sms = 0, smem = 0;
#if FASTSEQ_PERSISTENT_EMULATED
  sms = detail::kEmulatedSMs;
  smem = 1024;
#else
  int dev = 0, coop = 0, sm_count = 0, per_sm = 0, major = 0, cluster_ok = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess && cluster > 1) err = cudaDeviceGetAttribute(&cluster_ok, cudaDevAttrClusterLaunch, dev);
  if (err != cudaSuccess) return err;
  if (!coop) {
    plan->reason = "the device does not support cooperative launches";
    return cudaSuccess;
  }
  if (cluster > 1 && (major < 9 || !cluster_ok)) {
    plan->reason = "the device cannot launch thread-block clusters (compute capability 9.0 or later)";
    return cudaSuccess;
  }
  sms = sm_count;
  smem = per_sm / 2 + 1024;  // more than half an SM's shared memory: one block per SM
#endif
  if (blocks > sms) {
    plan->reason = "more blocks than SMs (the probe gives each block an SM, as the kernels do)";
    return cudaSuccess;
  }
  bool fits = false;
  const cudaError_t co =
      cluster > 1
          ? detail::cluster_co_resident(reinterpret_cast<const void*>(kernel), kSyncProbeThreads, smem, blocks,
                                        cluster, sms, plan, &fits)
          : detail::co_resident(reinterpret_cast<const void*>(kernel), kSyncProbeThreads, smem, blocks, sms, plan,
                                &fits);
  if (co != cudaSuccess || !fits) return co;
  plan->blocks = blocks;
  plan->cluster = cluster;
  plan->smem_bytes = smem;
  return cudaSuccess;
}

cudaError_t persistent_sync_probe_launch(const SyncProbe& a, const RecurrencePersistentPlan& plan,
                                        cudaStream_t stream) {
  const ProbeKernel kernel = probe_kernel(a.mode);
  const unsigned int grid = static_cast<unsigned int>(plan.blocks), cluster = static_cast<unsigned int>(plan.cluster);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
#if FASTSEQ_PERSISTENT_EMULATED
  (void)stream;
  ::fastseq_emu::launch_cooperative_cluster(grid, cluster, kSyncProbeThreads, smem, kernel, a);
  return cudaSuccess;
#else
  if (cluster > 1) {
    cudaLaunchAttribute attrs[2];
    const cudaLaunchConfig_t cfg =
        detail::cluster_config(grid, cluster, kSyncProbeThreads, static_cast<int64_t>(smem), stream, true, attrs);
    return cudaLaunchKernelEx(&cfg, kernel, a);
  }
  SyncProbe args = a;
  void* argv[] = {&args};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(kSyncProbeThreads),
                                     argv, smem, stream);
#endif
}

}  // namespace cuda
}  // namespace fastseq
