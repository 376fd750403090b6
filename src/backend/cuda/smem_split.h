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

// The L1 readers' own split (set_l1_reader_carveout, KESTREL_CUDA_L1_READER_CARVEOUT): -1 (the
// default) none, else a percent of the SM's largest shared memory (0-100, the carveout
// attribute's unit; the driver takes a split it offers that holds at least that much, as we read
// the CUDA guide: 71% of an H100's 228 KB is the 164 KB split). A measurement aid that sets an
// L1 reader's split apart from its ring's depth. A percent too small for the blocks an SM the
// persistent grids are sized by (the occupancy calculator counts the whole shared memory) runs
// those grids in more than one wave: slower, never wrong (the GEMV's blocks do not wait on one
// another). Anything outside 0-100 is -1.
constexpr int valid_l1_reader_carveout(int percent) {
  return percent >= 0 && percent <= 100 ? percent : -1;
}

// The carveout a launch asks for: -1 none (the driver's choice), else a percent of the largest
// shared memory (100: the largest split). Where the mode asks for the largest split it is that;
// else an L1 reader takes its own carveout, if one is set.
constexpr int launch_carveout(int mode, bool l1_reader, int l1_reader_percent) {
  return wants_max_shared(mode, l1_reader) ? 100 : l1_reader ? l1_reader_percent : -1;
}

}  // namespace kestrel::cuda
