/* A stand-in libcuda.so.1 for measuring Triton's host-side launch path on a machine
 * without a GPU (bench/stubdriver.py builds it; bench/host_probe.py and bench/kernels.py
 * run in a process whose LD_LIBRARY_PATH puts it first).
 *
 * It implements the driver entry points that Triton's launcher and cuda_utils module
 * call (Triton 3.6 and 3.9): contexts, module loading, function and device attributes,
 * pointer attributes. Each returns CUDA_SUCCESS and plausible values (an H100/H200's
 * device attributes); cuLaunchKernelEx only counts the launch. So everything on the
 * host path is Triton's own code -- the binder, the specialisation and cache lookup,
 * the launcher's argument unpacking, each tensor's data_ptr() and pointer check --
 * except the launch itself, which on a GPU is a driver call of a few microseconds.
 *
 * Types and enum values come from Triton's bundled cuda.h.
 */
#include <stddef.h>
#include <stdint.h>
#include "cuda.h"

/* The number of cuLaunchKernelEx calls so far (read by the probe through ctypes). */
unsigned long long fastseq_stub_launches = 0;

/* Parameter recording (tests/test_bound_launch.py, through bench.stubdriver.record):
 * while fastseq_stub_param_sizes[0] > 0, launch k < FASTSEQ_STUB_RECORDS (counted
 * from the last reset of fastseq_stub_launches) stores its grid and the bytes of its
 * parameters i = 0, 1, ... while fastseq_stub_param_sizes[i] > 0 (each at most 8). */
#define FASTSEQ_STUB_PARAMS 64
#define FASTSEQ_STUB_RECORDS 512
int fastseq_stub_param_sizes[FASTSEQ_STUB_PARAMS];
unsigned char fastseq_stub_params[FASTSEQ_STUB_RECORDS][FASTSEQ_STUB_PARAMS * 8];
unsigned int fastseq_stub_grids[FASTSEQ_STUB_RECORDS][3];

static int stub_context_storage, stub_module_storage, stub_function_storage;

CUresult cuInit(unsigned int flags) { (void)flags; return CUDA_SUCCESS; }

CUresult cuDriverGetVersion(int *v) { *v = 13000; return CUDA_SUCCESS; }

CUresult cuGetErrorString(CUresult e, const char **s) {
  (void)e;
  *s = "fastseq stub libcuda";
  return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult e, const char **s) { return cuGetErrorString(e, s); }

CUresult cuDeviceGet(CUdevice *d, int ordinal) { (void)ordinal; *d = 0; return CUDA_SUCCESS; }

CUresult cuDeviceGetCount(int *n) { *n = 1; return CUDA_SUCCESS; }

CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev) {
  (void)dev;
  switch (attrib) {
  case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = 1024; break;
  case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *pi = 32; break;
  case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *pi = 65536; break;
  case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *pi = 1980000; break;
  case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *pi = 132; break;
  case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *pi = 2619000; break;
  case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *pi = 5120; break;
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *pi = 9; break;
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *pi = 0; break;
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *pi = 49152; break;
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *pi = 232448; break;
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *pi = 233472; break;
  case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: *pi = 65536; break;
  case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: *pi = 60 * 1024 * 1024; break;
  default: *pi = 0;
  }
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
  (void)dev;
  *pctx = (CUcontext)&stub_context_storage;
  return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext *pctx) { *pctx = (CUcontext)&stub_context_storage; return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext ctx) { (void)ctx; return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(CUdevice *d) { *d = 0; return CUDA_SUCCESS; }
CUresult cuCtxGetLimit(size_t *v, CUlimit limit) { (void)limit; *v = 1 << 20; return CUDA_SUCCESS; }
CUresult cuCtxSetLimit(CUlimit limit, size_t v) { (void)limit; (void)v; return CUDA_SUCCESS; }
CUresult cuCtxSynchronize(void) { return CUDA_SUCCESS; }

CUresult cuModuleLoadData(CUmodule *m, const void *image) {
  (void)image;
  *m = (CUmodule)&stub_module_storage;
  return CUDA_SUCCESS;
}

CUresult cuModuleUnload(CUmodule m) { (void)m; return CUDA_SUCCESS; }

CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
  (void)m; (void)name;
  *f = (CUfunction)&stub_function_storage;
  return CUDA_SUCCESS;
}

/* Registers and local memory are unknown here (0): bench/kernels.py reads them from ptxas. */
CUresult cuFuncGetAttribute(int *pi, CUfunction_attribute attrib, CUfunction f) {
  (void)f;
  *pi = attrib == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ? 1024 : 0;
  return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute attrib, int value) {
  (void)f; (void)attrib; (void)value;
  return CUDA_SUCCESS;
}

CUresult cuFuncSetCacheConfig(CUfunction f, CUfunc_cache config) { (void)f; (void)config; return CUDA_SUCCESS; }

CUresult cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr ptr) {
  switch (attribute) {
  case CU_POINTER_ATTRIBUTE_DEVICE_POINTER: *(CUdeviceptr *)data = ptr; break;
  case CU_POINTER_ATTRIBUTE_MEMORY_TYPE: *(unsigned int *)data = CU_MEMORYTYPE_DEVICE; break;
  default: *(unsigned long long *)data = 0;
  }
  return CUDA_SUCCESS;
}

CUresult cuPointerGetAttributes(unsigned int n, CUpointer_attribute *attributes, void **data, CUdeviceptr ptr) {
  for (unsigned int i = 0; i < n; i++)
    cuPointerGetAttribute(data[i], attributes[i], ptr);
  return CUDA_SUCCESS;
}

CUresult cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus *status) {
  (void)s;
  *status = CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}

CUresult cuOccupancyMaxActiveClusters(int *n, CUfunction f, const CUlaunchConfig *config) {
  (void)f; (void)config;
  *n = 1;
  return CUDA_SUCCESS;
}

/* The one call that is not made: the launch. */
CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
  (void)f; (void)extra;
  if (fastseq_stub_param_sizes[0] > 0 && fastseq_stub_launches < FASTSEQ_STUB_RECORDS) {
    unsigned char *dst = fastseq_stub_params[fastseq_stub_launches];
    for (int i = 0; i < FASTSEQ_STUB_PARAMS && fastseq_stub_param_sizes[i] > 0; i++) {
      const unsigned char *src = (const unsigned char *)params[i];
      for (int b = 0; b < fastseq_stub_param_sizes[i] && b < 8; b++) dst[8 * i + b] = src[b];
    }
    fastseq_stub_grids[fastseq_stub_launches][0] = config->gridDimX;
    fastseq_stub_grids[fastseq_stub_launches][1] = config->gridDimY;
    fastseq_stub_grids[fastseq_stub_launches][2] = config->gridDimZ;
  }
  fastseq_stub_launches++;
  return CUDA_SUCCESS;
}
