// What the emulation harnesses (decode_emu.cpp, fwd_emu.cpp, bwd_emu.cpp) share beyond the op's own host code.
#pragma once
#include <ATen/ATen.h>

#include "emu.h"

namespace fastattn {
namespace emu_harness {

// Registers t's whole storage as global memory (kernels may legally read any element of a strided view's storage);
// the emulated cp.async refuses sources outside the registered ranges.
inline void add_tensor(const at::Tensor& t) {
  if (t.defined() && t.numel() > 0) emu::add_global(t.storage().data(), t.storage().nbytes());
}

}  // namespace emu_harness
}  // namespace fastattn
