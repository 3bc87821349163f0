// Shared definitions of the fused remap op (CPU and CUDA).
//
// One row of the int64 ``spec`` tensor describes one output stream (one key of the codebook
// KJT); see torchrec_cce/ops/__init__.py for the Python side that builds it.
#pragma once
#include <cstdint>

namespace torchrec_cce {

enum SpecColumn : int64_t {
  kFeature = 0,    // index of the input feature (KJT key order)
  kKind = 1,       // StreamKind
  kRows = 2,       // hash modulus / QR collisions m / V for the identity range check
  kOffset = 3,     // added to every value of the stream
  kKey = 4,        // hash key (kHash) or p's fallback hash key (kCCEPair)
  kHKey = 5,       // CCE: h's base key, combined with generations[kGen] (or final if kGen < 0)
  kGen = 6,        // CCE: index into the generations list, -1: kHKey is the final key
  kAssign = 7,     // CCE: index into the packed assignment list (int32 words), -1: none
  kAssignLo = 8,   // CCE: first id stored in that assignment
  kPre = 9,        // CCE: index into the precomputed-p list, -1: none
  kColumn = 10,    // CCE: chunk column of the assignment / precomputed p
  kNumIds = 11,    // V: QR reduces ids mod V
  kAssignCount = 12,  // CCE: ids stored in the packed assignment ([lo, lo + count))
  kBits = 13,      // CCE: bits per packed entry (0..31)
  kChunks = 14,    // CCE: entries per id in the packed assignment
  kQRMul = 15,     // CCE init="qr": a of x' = (a (x mod V) + b) mod V; 0: hashed init
  kQRAdd = 16,     // CCE init="qr": b
  kKeepRemainder = 17,  // CCE init="qr": 1: h stays x' mod rows after re-clustering
  kSpecCols = 18,
};

enum StreamKind : int64_t {
  kIdentity = 0,      // x (must lie in [0, rows))
  kHash = 1,          // h(x) mod rows
  kCCEPair = 2,       // two values per id: p(x), rows + h(x)
  kQRQuotient = 3,    // (x mod V) / m
  kQRRemainder = 4,   // (x mod V) % m
};

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMul1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMul2 = 0x94D049BB133111EBULL;
constexpr uint64_t kMask63 = (1ULL << 63) - 1;

#ifdef __CUDACC__
#define TRCCE_HD __host__ __device__ __forceinline__
#else
#define TRCCE_HD inline
#endif

// splitmix64 finaliser: torchrec_cce.hashing.mix64 on the same 64 bits.
TRCCE_HD uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * kMul1;
  x = (x ^ (x >> 27)) * kMul2;
  return x ^ (x >> 31);
}

// torchrec_cce.hashing.hash_ids for one id.
TRCCE_HD int64_t hash_id(int64_t id, int64_t key, int64_t rows) {
  uint64_t x = static_cast<uint64_t>(id) + static_cast<uint64_t>(key) * kGolden;
  x = mix64(mix64(x) + kGolden);
  const uint64_t r = static_cast<uint64_t>(rows);
  // (x & kMask63) % r; for a power of two r (< 2**63) that is x & (r - 1), without a division.
  return static_cast<int64_t>((r & (r - 1)) == 0 ? x & (r - 1) : (x & kMask63) % r);
}

// torchrec_cce.hashing.combine_keys.
TRCCE_HD int64_t combine_key(int64_t base, int64_t generation) {
  return static_cast<int64_t>(
      mix64(static_cast<uint64_t>(generation) * kGolden + static_cast<uint64_t>(base)) & kMask63);
}

TRCCE_HD int64_t floor_mod(int64_t x, int64_t m) {
  int64_t r = x % m;
  return r < 0 ? r + m : r;
}

// Entry (local, col) of a bit-packed [n, chunks] array (torchrec_cce/methods/packed.py): one
// little-endian bit stream in int32 words, entry (i, j) at bits [(i * chunks + j) * bits, +bits).
// An entry spans at most two words (bits <= 31).
TRCCE_HD int64_t packed_entry(const int32_t* words, int64_t num_words, int64_t local,
                              int64_t chunks, int64_t col, int64_t bits) {
  if (bits == 0) return 0;
  const int64_t off = (local * chunks + col) * bits;
  const int64_t k = off >> 5, shift = off & 31;
  uint64_t w = static_cast<uint32_t>(words[k]);
  if (shift + bits > 32 && k + 1 < num_words)
    w |= static_cast<uint64_t>(static_cast<uint32_t>(words[k + 1])) << 32;
  return static_cast<int64_t>((w >> shift) & ((1ULL << bits) - 1));
}

// int32 words of a packed [n, chunks] array of ``bits``-bit entries.
TRCCE_HD int64_t packed_num_words(int64_t n, int64_t chunks, int64_t bits) {
  return (n * chunks * bits + 31) / 32;
}

// CCEConfig(init="qr"): the chunk's bijection x' = (a (x mod V) + b) mod V, with the product
// wrapping around in 64 bits exactly like torch's int64 arithmetic.
TRCCE_HD int64_t qr_permute(int64_t x, int64_t a, int64_t b, int64_t V) {
  const uint64_t y = static_cast<uint64_t>(a) * static_cast<uint64_t>(floor_mod(x, V)) +
                     static_cast<uint64_t>(b);
  return floor_mod(static_cast<int64_t>(y), V);
}

TRCCE_HD int64_t values_per_id(int64_t kind) { return kind == kCCEPair ? 2 : 1; }

}  // namespace torchrec_cce
