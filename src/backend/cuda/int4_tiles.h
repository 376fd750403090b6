// The device layout of int4 weights (sym_int4, asym_int4): tiles of 16 rows x 128 columns
// stored in the order the decode GEMV's warps read them, so every 16-byte copy of a warp lands
// in one contiguous 512-byte run of memory.
//
// Why: in the host layout (quant/format.h) the 16 rows x 4 groups a warp consumes per step are
// 16 separate 64-byte pieces 2 KB apart (at 4096 columns); measured on the H200 the GEMV then
// streamed 1.4-2.7 TB/s of the 3.9 TB/s the SMs can copy. Here the same bytes are two 512-byte
// runs, one per copy instruction.
//
// Tile t (rows 16t .. 16t + 15), chunk j (groups 4j .. 4j + 3 of 32 columns) is 1024 bytes at
// (t * n_chunks + j) * 1024: half h (rows 16t + 8h .. + 7) at + 512 h, then lane l = 4 r + c
// (row 16t + 8h + r, group 4j + c) at + 16 l, holding that row's 16-byte group as in the host
// layout (byte i: weight i in the low nibble, weight i + 16 in the high one).
// Scales (and mins) of a tile and chunk are (32 >> s) 32-bit words, s = 1 for 64-weight blocks:
// word (c >> s) * 8 + r holds the fp16 scale of row 16t + r (low half) and of row 16t + 8 + r
// (high half) for the block of group 4j + c. Rows past the weight's last (to a multiple of 16)
// and groups past its last (to a multiple of 4) are zeros, scales and mins included.
//
// Plain C++ (host and device): the upload and the CPU-side layout test use it too.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "quant/format.h"

#if defined(__CUDACC__)
#define KS_HOST_DEVICE __host__ __device__
#else
#define KS_HOST_DEVICE
#endif

namespace kestrel::cuda {

constexpr int kTileRows = 16;
constexpr int kTileGroups = 4;  // groups of 32 columns in one chunk of a tile
constexpr int kTileChunkBytes = kTileRows * kTileGroups * 16;

struct Int4Tiles {
  int64_t n_tiles = 0;   // ceil(rows / 16)
  int64_t n_chunks = 0;  // ceil(cols / 32 / 4)
  int scale_shift = 0;   // 1 for 64-weight blocks

  KS_HOST_DEVICE static Int4Tiles of(int64_t rows, int64_t cols, int block) {
    Int4Tiles t;
    t.n_tiles = (rows + kTileRows - 1) / kTileRows;
    t.n_chunks = (cols / 32 + kTileGroups - 1) / kTileGroups;
    t.scale_shift = block == 64 ? 1 : 0;
    return t;
  }
  KS_HOST_DEVICE int64_t data_bytes() const { return n_tiles * n_chunks * kTileChunkBytes; }
  // 32-bit words of scales (and of mins) per chunk of a tile.
  KS_HOST_DEVICE int chunk_scale_words() const { return 32 >> scale_shift; }
  KS_HOST_DEVICE int64_t scale_halves() const {
    return n_tiles * n_chunks * chunk_scale_words() * 2;
  }
  // Byte offset of the 16 bytes of group `g` of row `row`.
  KS_HOST_DEVICE int64_t group_offset(int64_t row, int64_t g) const {
    const int64_t tile = row / kTileRows;
    const int r16 = int(row % kTileRows);
    return (tile * n_chunks + g / kTileGroups) * kTileChunkBytes + (r16 / 8) * 512 +
           ((r16 % 8) * 4 + int(g % kTileGroups)) * 16;
  }
  // Index (in fp16 values) of the scale, or min, of the block holding group `g` of row `row`.
  KS_HOST_DEVICE int64_t scale_index(int64_t row, int64_t g) const {
    const int64_t tile = row / kTileRows;
    const int r16 = int(row % kTileRows);
    const int64_t word = (tile * n_chunks + g / kTileGroups) * chunk_scale_words() +
                         (int(g % kTileGroups) >> scale_shift) * 8 + r16 % 8;
    return word * 2 + r16 / 8;
  }
};

// The tiled copy of host int4 weight `w` (sym_int4 or asym_int4, block 32 or 64, cols a multiple
// of 32): data, scales and, for asym_int4, mins (empty otherwise).
struct TiledInt4 {
  Int4Tiles tiles;
  std::vector<uint8_t> data;
  std::vector<uint16_t> scales;
  std::vector<uint16_t> mins;
};

inline TiledInt4 tile_int4(const QuantWeight& w) {
  TiledInt4 out;
  out.tiles = Int4Tiles::of(w.rows, w.cols, w.block);
  const Int4Tiles& t = out.tiles;
  out.data.assign(size_t(t.data_bytes()), 0);
  out.scales.assign(size_t(t.scale_halves()), 0);
  const bool asym = w.format == WeightFormat::asym_int4;
  if (asym) out.mins.assign(size_t(t.scale_halves()), 0);
  const int64_t groups = w.cols / 32;
  const size_t row_bytes = w.data_row_bytes();
  const int64_t blocks = w.blocks_per_row();
  const auto* scales = reinterpret_cast<const uint16_t*>(w.scales.data());
  const auto* mins = reinterpret_cast<const uint16_t*>(w.mins.data());
  for (int64_t row = 0; row < w.rows; ++row) {
    const uint8_t* src = w.data.data() + size_t(row) * row_bytes;
    for (int64_t g = 0; g < groups; ++g) {
      std::memcpy(&out.data[size_t(t.group_offset(row, g))], src + g * 16, 16);
      const int64_t s = row * blocks + g * 32 / w.block;
      out.scales[size_t(t.scale_index(row, g))] = scales[s];
      if (asym) out.mins[size_t(t.scale_index(row, g))] = mins[s];
    }
  }
  return out;
}

}  // namespace kestrel::cuda
