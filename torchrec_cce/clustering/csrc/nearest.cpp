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
