// Decode kernel instantiations for float: head dims 32/64/128/256 x query rows 1/2/4/8 (see decode_launch.h).
#include "../decode_kernel.cuh"

namespace fastattn {
namespace cuda {

#define FA_DECODE_INSTANTIATE(D) \
  template cudaError_t run_decode<float, D, 1>(const DecodeParams&, cudaStream_t); \
  template cudaError_t run_decode<float, D, 2>(const DecodeParams&, cudaStream_t); \
  template cudaError_t run_decode<float, D, 4>(const DecodeParams&, cudaStream_t); \
  template cudaError_t run_decode<float, D, 8>(const DecodeParams&, cudaStream_t);

FA_DECODE_INSTANTIATE(32)
FA_DECODE_INSTANTIATE(64)
FA_DECODE_INSTANTIATE(128)
FA_DECODE_INSTANTIATE(256)

}  // namespace cuda
}  // namespace fastattn
