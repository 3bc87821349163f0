// Fused nearest-centroid search for small dimensions (CCE chunks: d = 1..16).
//
// For each row x of X [n, d] it scores every centroid as  bias[j] - 2 x.c_j  (bias = ||c||^2,
// +inf for padding) and returns the best and the second-best score and the best index, without
// ever writing the n x k distance matrix (what BLAS + a separate argmin must do: at d = 4 that
// matrix traffic, not the arithmetic, is the cost). Ties keep the lowest index. Single-threaded
// and plain C ABI (loaded with ctypes, which releases the GIL): the Python caller splits the
// rows over its worker threads. No torch headers, so it builds in about a second.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CCE_AVX2 1
#endif

namespace {

// Boxes per superbox of the grouped search (a second level of bounding boxes).
constexpr int64_t kBoxesPerSuper = 32;

#ifndef CCE_R
#define CCE_R 2
#endif
#ifndef CCE_J
#define CCE_J 4
#endif

// ct: [d, kp] (kp a multiple of 8), bias: [kp]. Scalar reference path (any CPU).
void scalar_rows(const float* x, int64_t n, int d, const float* ct, const float* bias,
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

#ifdef CCE_AVX2
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
#endif

// ---- grouped (pruned) search ------------------------------------------------------------
// Centroids are stored group by group (columns [goff[g], goff[g+1]) of ct, multiples of 8,
// padding columns have bias +inf) with each group's bounding box lo/hi ([d, gp], gp >= G).
// Per row: the squared distance from x to every box (a lower bound on the distance to any
// centroid in it), then the box nearest to x is scanned first and every other box only if
// its bound does not exceed  ||x||^2 + best + 2 * margin  (so every centroid whose float32
// score lies within margin of the best is scored: the caller's near-tie test stays valid).
// Scores and the lane-wise best / second-best updates are the same operations as the brute
// force, so both return the same float32 answers.
#ifdef CCE_AVX2
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
    for (int64_t a = 1; a < m; ++a) {
      const int64_t v = cand[a];
      int64_t b = a;
      for (; b > 0 && lb[cand[b - 1]] > lb[v]; --b) cand[b] = cand[b - 1];
      cand[b] = v;
    }
    for (int64_t a = 0; a < m; ++a) {
      if (lb[cand[a]] > (cur + slack) * 1.00001f) break;
      scan(cand[a]);
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
#endif

}  // namespace

// x [n, d], ct [d, kp] (kp % 8 == 0, 1 <= d <= 16), bias [kp], all float32 contiguous.
// Writes idx [n], best [n], second [n] (scores ||c||^2 - 2 x.c). Returns 0, or -1 on bad sizes.
extern "C" int cce_nearest2(const float* x, int64_t n, int64_t d, const float* ct,
                            const float* bias, int64_t kp, int64_t* idx, float* best,
                            float* second) {
  if (d < 1 || d > 16 || kp % 8 != 0 || kp <= 0) return -1;
  const int dd = static_cast<int>(d);
#ifdef CCE_AVX2
  switch (dd) {
    case 1: avx2_rows<1>(x, n, dd, ct, bias, kp, idx, best, second); break;
    case 2: avx2_rows<2>(x, n, dd, ct, bias, kp, idx, best, second); break;
    case 4: avx2_rows<4>(x, n, dd, ct, bias, kp, idx, best, second); break;
    case 8: avx2_rows<8>(x, n, dd, ct, bias, kp, idx, best, second); break;
    case 16: avx2_rows<16>(x, n, dd, ct, bias, kp, idx, best, second); break;
    default: avx2_rows<0>(x, n, dd, ct, bias, kp, idx, best, second);
  }
#else
  scalar_rows(x, n, dd, ct, bias, kp, idx, best, second);
#endif
  return 0;
}

// Grouped search (see grouped_rows): centroids in group order, ct [d, kp], bias [kp], goff
// [G + 1] (multiples of 8, goff[G] <= kp), box bounds glo/ghi [d, gp] (gp % 32 == 0,
// gp >= 32 S, padding boxes +inf), superbox bounds slo/shi [d, sp] (superbox s bounds the
// boxes [32 s, 32 s + 32); S = ceil(G / 32), sp % 8 == 0, sp >= S, padding +inf), xn / margin
// [n], perm [kp] (group-order column -> centroid index).
// Writes idx (centroid indices), best, second, and adds the number of boxes scanned to
// *visited. Returns 0, -1 on bad sizes, -2 without AVX2 (the caller uses cce_nearest2).
extern "C" int cce_nearest2_grouped(const float* x, int64_t n, int64_t d, const float* ct,
                                    const float* bias, int64_t kp, const int64_t* goff,
                                    int64_t G, int64_t gp, const float* glo, const float* ghi,
                                    int64_t S, int64_t sp, const float* slo, const float* shi,
                                    const float* xn, const float* margin, const int64_t* perm,
                                    int64_t* idx, float* best, float* second,
                                    int64_t* visited) {
  if (d < 1 || d > 16 || kp % 8 != 0 || kp <= 0 || G < 1 || gp % kBoxesPerSuper != 0 ||
      S != (G + kBoxesPerSuper - 1) / kBoxesPerSuper || gp < S * kBoxesPerSuper || sp < S ||
      sp % 8 != 0)
    return -1;
#ifdef CCE_AVX2
  const int dd = static_cast<int>(d);
  switch (dd) {
    case 2: grouped_rows<2>(x, n, dd, ct, bias, kp, goff, G, gp, glo, ghi, S, sp, slo, shi, xn, margin, perm, idx, best, second, visited); break;
    case 4: grouped_rows<4>(x, n, dd, ct, bias, kp, goff, G, gp, glo, ghi, S, sp, slo, shi, xn, margin, perm, idx, best, second, visited); break;
    case 8: grouped_rows<8>(x, n, dd, ct, bias, kp, goff, G, gp, glo, ghi, S, sp, slo, shi, xn, margin, perm, idx, best, second, visited); break;
    default: grouped_rows<0>(x, n, dd, ct, bias, kp, goff, G, gp, glo, ghi, S, sp, slo, shi, xn, margin, perm, idx, best, second, visited);
  }
  return 0;
#else
  return -2;
#endif
}

// 1 if this build has the grouped kernel (AVX2 + FMA), else 0.
extern "C" int cce_grouped_available() {
#ifdef CCE_AVX2
  return 1;
#else
  return 0;
#endif
}
