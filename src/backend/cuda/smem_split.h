// Which kernel launches ask for the SM's largest shared-memory split (smem_split_mode in
// common.cuh, set_smem_split): a plain header, so the rule is tested without a device.
#pragma once

namespace kestrel::cuda {

// Mode 0: none (the driver's split for every kernel); 1: every launch; 2 (the default): every
// launch but those of kernels that read their input through L1 (`l1_reader`: the column-split
// GEMVs with no fused norm and no dp4a input stage).
// A mode as set_smem_split and KESTREL_CUDA_SMEM_SPLIT take it: 0-2, anything else the default.
constexpr int valid_smem_split(int mode) {
  return mode >= 0 && mode <= 2 ? mode : 2;
}

constexpr bool wants_max_shared(int mode, bool l1_reader) {
  return mode == 1 || (mode == 2 && !l1_reader);
}

}  // namespace kestrel::cuda
