// torchrec_cce::nearest2 / nearest2_grouped: fused nearest-centroid search for small dimensions
// (CCE chunks: d = 1..16).
//
// For each row x of X [n, d] it scores every centroid as  bias[j] - 2 x.c_j  (bias = ||c||^2,
// +inf for padding) and returns the best and the second-best score and the best index, without
// ever writing the n x k distance matrix (what BLAS + a separate argmin must do: at d = 4 that
// matrix traffic, not the arithmetic, is the cost). Ties keep the lowest index. Single-threaded:
// the Python caller (clustering/kmeans.py) splits the rows over its worker threads, and the
// torch.ops call releases the GIL while the kernel runs.
//
// The AVX2 + FMA kernels (namespace avx2) are compiled for that target under a GCC target pragma
// (the rest of the op library stays at the baseline ISA) and chosen at run time where the CPU
// has both; elsewhere (or with clang) the scalar kernel runs. Every score is the same chain of fused
// multiply-adds on every path (std::fma in the scalar one), and the library is built with
// -ffp-contract=off (ops/__init__.py), so all paths return the same float32 bits.
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CCE_SIMD 1  // the AVX2 kernels below (GCC target pragma), chosen at run time
#include <immintrin.h>
#endif

namespace torchrec_cce {
namespace {

// Boxes per superbox of the grouped search (a second level of bounding boxes).
constexpr int64_t kBoxesPerSuper = 32;

#ifndef CCE_R
#define CCE_R 2
#endif
#ifndef CCE_J
#define CCE_J 4
#endif

// ct: [d, kp] (kp a multiple of 8), bias: [kp]. Scalar path (any CPU; inlined into the AVX2
// kernels for their remainder rows).
__attribute__((always_inline)) inline void scalar_rows(const float* x, int64_t n, int d, const float* ct, const float* bias,
                 int64_t kp, int64_t* idx, float* best, float* second) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * d;
    float b1 = std::numeric_limits<float>::infinity(), b2 = b1;
    int64_t bi = 0;
    for (int64_t j = 0; j < kp; ++j) {
      float s = bias[j];
      for (int t = 0; t < d; ++t) s = std::fma(-2.0f * xr[t], ct[t * kp + j], s);
      if (s < b1) {
        b2 = b1;
        b1 = s;
        bi = j;
      } else if (s < b2) {
        b2 = s;
      }
    }
    idx[r] = bi;
    best[r] = b1;
    second[r] = b2;
  }
}

#ifdef CCE_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
// R query rows x J vectors of 8 centroids per step: R * J independent FMA chains (one chain
// of d FMAs per row is latency-bound), then a running best / second-best / index per lane.
template <int D, int R, int J>
void avx2_block(const float* x, int d_runtime, const float* ct, const float* bias, int64_t kp,
                int64_t* idx, float* best, float* second) {
  const int d = D > 0 ? D : d_runtime;
  __m256 b1[R], b2[R];
  __m256i bi[R];
  float xm2[R][16];
  for (int r = 0; r < R; ++r) {
    b1[r] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    b2[r] = b1[r];
    bi[r] = _mm256_setzero_si256();
    for (int t = 0; t < d; ++t) xm2[r][t] = -2.0f * x[r * d + t];
  }
  __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  for (int64_t j = 0; j < kp; j += 8 * J) {
    __m256 acc[R][J];
    for (int q = 0; q < J; ++q) {
      const __m256 bv = _mm256_loadu_ps(bias + j + 8 * q);
      for (int r = 0; r < R; ++r) acc[r][q] = bv;
    }
    for (int t = 0; t < d; ++t) {
      for (int q = 0; q < J; ++q) {
        const __m256 cv = _mm256_loadu_ps(ct + t * kp + j + 8 * q);
        for (int r = 0; r < R; ++r)
          acc[r][q] = _mm256_fmadd_ps(_mm256_broadcast_ss(&xm2[r][t]), cv, acc[r][q]);
      }
    }
    for (int q = 0; q < J; ++q) {
      for (int r = 0; r < R; ++r) {
        const __m256 a = acc[r][q];
        const __m256 lt = _mm256_cmp_ps(a, b1[r], _CMP_LT_OQ);
        b2[r] = _mm256_min_ps(b2[r], _mm256_max_ps(a, b1[r]));
        b1[r] = _mm256_min_ps(b1[r], a);
        bi[r] = _mm256_castps_si256(
            _mm256_blendv_ps(_mm256_castsi256_ps(bi[r]), _mm256_castsi256_ps(lane), lt));
      }
      lane = _mm256_add_epi32(lane, eight);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float v1[8], v2[8];
    alignas(32) int32_t vi[8];
    _mm256_store_ps(v1, b1[r]);
    _mm256_store_ps(v2, b2[r]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(vi), bi[r]);
    int w = 0;
    for (int l = 1; l < 8; ++l)
      if (v1[l] < v1[w] || (v1[l] == v1[w] && vi[l] < vi[w])) w = l;
    float s2 = v2[w];
    for (int l = 0; l < 8; ++l) {
      if (l != w) s2 = std::min(s2, v1[l]);
    }
    idx[r] = vi[w];
    best[r] = v1[w];
    second[r] = s2;
  }
}

template <int D, int R = CCE_R, int J = CCE_J>
void avx2_rows(const float* x, int64_t n, int d, const float* ct, const float* bias, int64_t kp,
               int64_t* idx, float* best, float* second) {
  int64_t r = 0;
  if (kp % (8 * J) == 0) {
    for (; r + R <= n; r += R)
      avx2_block<D, R, J>(x + r * d, d, ct, bias, kp, idx + r, best + r, second + r);
  }
  if (r < n) scalar_rows(x + r * d, n - r, d, ct, bias, kp, idx + r, best + r, second + r);
}

// ---- grouped (pruned) search ------------------------------------------------------------
// Centroids are stored group by group (columns [goff[g], goff[g+1]) of ct, multiples of 8,
// padding columns have bias +inf) with each group's bounding box lo/hi ([d, gp], gp >= G).
// Per row: the squared distance from x to every box (a lower bound on the distance to any
// centroid in it), then the box nearest to x is scanned first and every other box only if
// its bound does not exceed  ||x||^2 + best + 2 * margin  (so every centroid whose float32
// score lies within margin of the best is scored: the caller's near-tie test stays valid).
// Scores and the lane-wise best / second-best updates are the same operations as the brute
// force, so both return the same float32 answers.
inline float hmin8(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Squared distance from x to 8 boxes [g, g + 8) of bounds lo/hi ([d, stride]).
template <int D>
inline __m256 box_bound8(const float* xr, int d, const float* lo, const float* hi,
                         int64_t stride, int64_t g) {
  __m256 acc = _mm256_setzero_ps();
  for (int t = 0; t < d; ++t) {
    const __m256 xv = _mm256_set1_ps(xr[t]);
    const __m256 below = _mm256_sub_ps(_mm256_loadu_ps(lo + t * stride + g), xv);
    const __m256 above = _mm256_sub_ps(xv, _mm256_loadu_ps(hi + t * stride + g));
    const __m256 v = _mm256_max_ps(_mm256_max_ps(below, above), _mm256_setzero_ps());
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  return acc;
}

template <int D>
void grouped_rows(const float* x, int64_t n, int d_runtime, const float* ct, const float* bias,
                  int64_t kp, const int64_t* goff, int64_t G, int64_t gp, const float* glo,
                  const float* ghi, int64_t S, int64_t sp, const float* slo, const float* shi,
                  const float* xn, const float* margin, const int64_t* perm,
                  int64_t* idx, float* best, float* second, int64_t* visited) {
  const int d = D > 0 ? D : d_runtime;
  float* lb = new float[gp];
  float* slb = new float[sp];
  int64_t* cand = new int64_t[gp];
  int64_t nvisit = 0;
  // the box bounds of superbox s (boxes [32 s, 32 s + 32)) into lb
  auto super_boxes = [&](const float* xr, int64_t s) {
    for (int64_t g = s * kBoxesPerSuper; g < (s + 1) * kBoxesPerSuper; g += 8)
      _mm256_storeu_ps(lb + g, box_bound8<D>(xr, d, glo, ghi, gp, g));
  };
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * d;
    // superbox lower bounds, the nearest superbox (lowest index on ties) and, in it, the
    // nearest box: scanned first
    int64_t sfirst = 0;
    for (int64_t s = 0; s < sp; s += 8) {
      _mm256_storeu_ps(slb + s, box_bound8<D>(xr, d, slo, shi, sp, s));
    }
    for (int64_t s = 1; s < S; ++s)
      if (slb[s] < slb[sfirst]) sfirst = s;
    super_boxes(xr, sfirst);
    int64_t first = sfirst * kBoxesPerSuper;
    for (int64_t g = first + 1; g < std::min(G, (sfirst + 1) * kBoxesPerSuper); ++g)
      if (lb[g] < lb[first]) first = g;
    float xm2[16];
    __m256 xb[16];
    for (int t = 0; t < d; ++t) {
      xm2[t] = -2.0f * xr[t];
      xb[t] = _mm256_set1_ps(xm2[t]);
    }
    __m256 b1 = _mm256_set1_ps(std::numeric_limits<float>::infinity()), b2 = b1;
    __m256i bi = _mm256_setzero_si256();
    const float slack = xn[r] + 2.0f * margin[r];
    float cur = std::numeric_limits<float>::infinity();
    auto scan = [&](int64_t g) {
      ++nvisit;
      int64_t j = goff[g];
      const int64_t end = goff[g + 1];
      for (; j + 32 <= end; j += 32) {
        __m256 a0 = _mm256_loadu_ps(bias + j), a1 = _mm256_loadu_ps(bias + j + 8);
        __m256 a2 = _mm256_loadu_ps(bias + j + 16), a3 = _mm256_loadu_ps(bias + j + 24);
        for (int t = 0; t < d; ++t) {
          const float* c = ct + t * kp + j;
          a0 = _mm256_fmadd_ps(xb[t], _mm256_loadu_ps(c), a0);
          a1 = _mm256_fmadd_ps(xb[t], _mm256_loadu_ps(c + 8), a1);
          a2 = _mm256_fmadd_ps(xb[t], _mm256_loadu_ps(c + 16), a2);
          a3 = _mm256_fmadd_ps(xb[t], _mm256_loadu_ps(c + 24), a3);
        }
        const __m256 as[4] = {a0, a1, a2, a3};
        for (int q = 0; q < 4; ++q) {
          const __m256 a = as[q];
          const __m256 lt = _mm256_cmp_ps(a, b1, _CMP_LT_OQ);
          b2 = _mm256_min_ps(b2, _mm256_max_ps(a, b1));
          b1 = _mm256_min_ps(b1, a);
          const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j + 8 * q)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
          bi = _mm256_castps_si256(
              _mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(lane), lt));
        }
      }
      for (; j < end; j += 8) {
        __m256 a = _mm256_loadu_ps(bias + j);
        for (int t = 0; t < d; ++t) a = _mm256_fmadd_ps(xb[t], _mm256_loadu_ps(ct + t * kp + j), a);
        const __m256 lt = _mm256_cmp_ps(a, b1, _CMP_LT_OQ);
        b2 = _mm256_min_ps(b2, _mm256_max_ps(a, b1));
        b1 = _mm256_min_ps(b1, a);
        const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        bi = _mm256_castps_si256(
            _mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(lane), lt));
      }
      cur = hmin8(b1);
    };
    scan(first);
    // the other boxes within reach, nearest first (re-checked as the best improves)
    // (only in the superboxes within reach)
    int64_t m = 0;
    {
      const float thr_f = (cur + slack) * 1.00001f;
      const __m256 thr = _mm256_set1_ps(thr_f);
      for (int64_t s = 0; s < S; ++s) {
        if (slb[s] > thr_f) continue;
        if (s != sfirst) super_boxes(xr, s);
        for (int64_t g = s * kBoxesPerSuper; g < (s + 1) * kBoxesPerSuper; g += 8) {
          unsigned bits = static_cast<unsigned>(
              _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(lb + g), thr, _CMP_LE_OQ)));
          while (bits) {
            const int64_t gg = g + __builtin_ctz(bits);
            bits &= bits - 1;
            if (gg != first && gg < G) cand[m++] = gg;
          }
        }
      }
    }
    // scan them in increasing bound order (lowest box index on equal bounds) until the next
    // bound is out of reach: each step selects the nearest remaining one and drops those out
    // of reach (O(m) per scanned box; sorting all m candidates cost O(m^2) per row)
    while (m > 0) {
      const float reach = (cur + slack) * 1.00001f;
      int64_t keep = 0, pick = -1;
      for (int64_t a = 0; a < m; ++a) {
        const int64_t g = cand[a];
        if (lb[g] > reach) continue;
        if (pick < 0 || lb[g] < lb[pick] || (lb[g] == lb[pick] && g < pick)) pick = g;
        cand[keep++] = g;
      }
      if (pick < 0) break;
      m = 0;
      for (int64_t a = 0; a < keep; ++a)
        if (cand[a] != pick) cand[m++] = cand[a];
      scan(pick);
    }
    alignas(32) float v1[8], v2[8];
    alignas(32) int32_t vi[8];
    _mm256_store_ps(v1, b1);
    _mm256_store_ps(v2, b2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(vi), bi);
    int w = 0;
    for (int l = 1; l < 8; ++l)
      if (v1[l] < v1[w] || (v1[l] == v1[w] && perm[vi[l]] < perm[vi[w]])) w = l;
    float s2 = v2[w];
    for (int l = 0; l < 8; ++l)
      if (l != w) s2 = std::min(s2, v1[l]);
    idx[r] = perm[vi[w]];
    best[r] = v1[w];
    second[r] = s2;
  }
  delete[] lb;
  delete[] slb;
  delete[] cand;
  *visited += nvisit;
}

// Brute force at any d in [1, 16] (specialised for the usual chunk dims).
void brute(const float* x, int64_t n, int d, const float* ct, const float* bias, int64_t kp,
           int64_t* idx, float* best, float* second) {
  switch (d) {
    case 1: avx2_rows<1>(x, n, d, ct, bias, kp, idx, best, second); break;
    case 2: avx2_rows<2>(x, n, d, ct, bias, kp, idx, best, second); break;
    case 4: avx2_rows<4>(x, n, d, ct, bias, kp, idx, best, second); break;
    case 8: avx2_rows<8>(x, n, d, ct, bias, kp, idx, best, second); break;
    case 16: avx2_rows<16>(x, n, d, ct, bias, kp, idx, best, second); break;
    default: avx2_rows<0>(x, n, d, ct, bias, kp, idx, best, second);
  }
}

// Grouped search at any d in [1, 16].
void grouped(const float* x, int64_t n, int d, const float* ct, const float* bias, int64_t kp,
             const int64_t* goff, int64_t G, int64_t gp, const float* glo, const float* ghi,
             int64_t S, int64_t sp, const float* slo, const float* shi, const float* xn,
             const float* margin, const int64_t* perm, int64_t* idx, float* best, float* second,
             int64_t* visited) {
  switch (d) {
    case 2: grouped_rows<2>(x, n, d, ct, bias, kp, goff, G, gp, glo, ghi, S, sp, slo, shi, xn, margin, perm, idx, best, second, visited); break;
    case 4: grouped_rows<4>(x, n, d, ct, bias, kp, goff, G, gp, glo, ghi, S, sp, slo, shi, xn, margin, perm, idx, best, second, visited); break;
    case 8: grouped_rows<8>(x, n, d, ct, bias, kp, goff, G, gp, glo, ghi, S, sp, slo, shi, xn, margin, perm, idx, best, second, visited); break;
    default: grouped_rows<0>(x, n, d, ct, bias, kp, goff, G, gp, glo, ghi, S, sp, slo, shi, xn, margin, perm, idx, best, second, visited);
  }
}
}  // namespace avx2
#pragma GCC pop_options
#endif



// Whether this CPU runs the AVX2 + FMA kernels (decided once per process).
bool simd_available() {
#ifdef CCE_SIMD
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim &&
                  t.is_contiguous(),
              "torchrec_cce::nearest2: ", name, " must be a contiguous CPU float32 tensor of ",
              dim, " dims, got ", t.scalar_type(), " ", t.sizes());
}

void check_i64(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 &&
                  t.is_contiguous() && t.numel() >= numel,
              "torchrec_cce::nearest2_grouped: ", name,
              " must be a contiguous CPU int64 vector of at least ", numel, " entries, got ",
              t.scalar_type(), " ", t.sizes());
}

// x [n, d], ct [d, kp] (kp % 8 == 0, 1 <= d <= 16), bias [kp]: (best index int64 [n], best
// score [n], second-best score [n]). simd=False runs the scalar kernel (tests; same answers).
std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest2_cpu(const at::Tensor& x,
                                                           const at::Tensor& ct,
                                                           const at::Tensor& bias, bool simd) {
  check_f32(x, "x", 2);
  check_f32(ct, "ct", 2);
  check_f32(bias, "bias", 1);
  const int64_t n = x.size(0), d = x.size(1), kp = ct.size(1);
  TORCH_CHECK(d >= 1 && d <= 16 && ct.size(0) == d && kp > 0 && kp % 8 == 0 &&
                  bias.size(0) == kp,
              "torchrec_cce::nearest2: unsupported shapes x ", x.sizes(), ", ct ", ct.sizes(),
              ", bias ", bias.sizes(), " (1 <= d <= 16, ct [d, kp] with kp % 8 == 0)");
  auto idx = at::empty({n}, x.options().dtype(at::kLong));
  auto best = at::empty({n}, x.options());
  auto second = at::empty({n}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = ct.data_ptr<float>(), *bp = bias.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  float *b1 = best.data_ptr<float>(), *b2 = second.data_ptr<float>();
  const int dd = static_cast<int>(d);
#ifdef CCE_SIMD
  if (simd && simd_available()) {
    avx2::brute(xp, n, dd, cp, bp, kp, ip, b1, b2);
    return {idx, best, second};
  }
#endif
  scalar_rows(xp, n, dd, cp, bp, kp, ip, b1, b2);
  return {idx, best, second};
}

// Grouped search (see grouped_rows; AVX2 + FMA only, see nearest2_simd): centroids in group
// order, ct [d, kp], bias [kp], offsets [G + 1] (multiples of 8, offsets[G] <= kp), box bounds
// lo/hi [d, gp] (gp % 32 == 0, gp >= 32 S, padding boxes +inf), superbox bounds super_lo /
// super_hi [d, sp] (superbox s bounds the boxes [32 s, 32 s + 32); S = ceil(G / 32),
// sp % 8 == 0, sp >= S, padding +inf), xn / margin [n], perm [kp] (group-order column ->
// centroid index). Returns (centroid index [n], best [n], second [n], boxes scanned (0-d)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nearest2_grouped_cpu(
    const at::Tensor& x, const at::Tensor& ct, const at::Tensor& bias,
    const at::Tensor& offsets, int64_t num_groups, const at::Tensor& lo, const at::Tensor& hi,
    int64_t num_supers, const at::Tensor& super_lo, const at::Tensor& super_hi,
    const at::Tensor& xn, const at::Tensor& margin, const at::Tensor& perm) {
  TORCH_CHECK(simd_available(),
              "torchrec_cce::nearest2_grouped: needs a CPU with AVX2 and FMA (see nearest2_simd)");
  check_f32(x, "x", 2);
  check_f32(ct, "ct", 2);
  check_f32(bias, "bias", 1);
  for (const auto* t : {&lo, &hi, &super_lo, &super_hi}) check_f32(*t, "box bounds", 2);
  check_f32(xn, "xn", 1);
  check_f32(margin, "margin", 1);
  const int64_t n = x.size(0), d = x.size(1), kp = ct.size(1), G = num_groups, S = num_supers;
  const int64_t gp = lo.size(1), sp = super_lo.size(1);
  TORCH_CHECK(d >= 1 && d <= 16 && ct.size(0) == d && kp > 0 && kp % 8 == 0 &&
                  bias.size(0) == kp && G >= 1 && gp % kBoxesPerSuper == 0 &&
                  S == (G + kBoxesPerSuper - 1) / kBoxesPerSuper && gp >= S * kBoxesPerSuper &&
                  sp >= S && sp % 8 == 0 && lo.size(0) == d && hi.sizes() == lo.sizes() &&
                  super_lo.size(0) == d && super_hi.sizes() == super_lo.sizes() &&
                  xn.size(0) == n && margin.size(0) == n,
              "torchrec_cce::nearest2_grouped: unsupported shapes x ", x.sizes(), ", ct ",
              ct.sizes(), ", boxes ", lo.sizes(), ", superboxes ", super_lo.sizes());
  check_i64(offsets, "offsets", G + 1);
  check_i64(perm, "perm", kp);
  auto idx = at::empty({n}, x.options().dtype(at::kLong));
  auto best = at::empty({n}, x.options());
  auto second = at::empty({n}, x.options());
  auto visited = at::zeros({}, x.options().dtype(at::kLong));
#ifdef CCE_SIMD
  const int dd = static_cast<int>(d);
  const float *xp = x.data_ptr<float>(), *cp = ct.data_ptr<float>(), *bp = bias.data_ptr<float>();
  const float *glo = lo.data_ptr<float>(), *ghi = hi.data_ptr<float>();
  const float *slo = super_lo.data_ptr<float>(), *shi = super_hi.data_ptr<float>();
  const int64_t *goff = offsets.data_ptr<int64_t>(), *pp = perm.data_ptr<int64_t>();
  int64_t* ip = idx.data_ptr<int64_t>();
  float *b1 = best.data_ptr<float>(), *b2 = second.data_ptr<float>();
  int64_t* vp = visited.data_ptr<int64_t>();
  const float *xnp = xn.data_ptr<float>(), *mp = margin.data_ptr<float>();
  avx2::grouped(xp, n, dd, cp, bp, kp, goff, G, gp, glo, ghi, S, sp, slo, shi, xnp, mp, pp, ip,
                  b1, b2, vp);
#endif
  return {idx, best, second, visited};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchrec_cce, m) {
  m.def("nearest2(Tensor x, Tensor ct, Tensor bias, bool simd=True) -> (Tensor, Tensor, Tensor)");
  m.def(
      "nearest2_grouped(Tensor x, Tensor ct, Tensor bias, Tensor offsets, int num_groups, "
      "Tensor lo, Tensor hi, int num_supers, Tensor super_lo, Tensor super_hi, Tensor xn, "
      "Tensor margin, Tensor perm) -> (Tensor, Tensor, Tensor, Tensor)");
  // Whether this CPU runs the AVX2 + FMA kernels (and so has nearest2_grouped).
  m.def("nearest2_simd() -> bool", [] { return simd_available(); });
}

TORCH_LIBRARY_IMPL(torchrec_cce, CPU, m) {
  m.impl("nearest2", &nearest2_cpu);
  m.impl("nearest2_grouped", &nearest2_grouped_cpu);
}

}  // namespace torchrec_cce
