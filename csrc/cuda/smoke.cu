// Smallest CUDA translation unit: proves the CUDA build path (nvcc, arch flags, linking) in CI before the
// real kernels land. Removed once csrc/cuda has kernels of its own.
#include <cuda_runtime.h>
namespace fastattn {
__global__ void smoke_kernel(float* x) { x[threadIdx.x] *= 2.0f; }
}  // namespace fastattn
