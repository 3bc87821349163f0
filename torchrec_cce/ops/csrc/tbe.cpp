// torchrec_cce::tbe_forward / tbe_backward_update: a CPU training kernel for fbgemm's
// table-batched embedding bags (TBE) holding small tables, such as compressed-embedding
// codebooks.
//
// It reads and writes fbgemm's own state (SplitTableBatchedEmbeddingBagsCodegen's flat
// ``weights_host`` and ``momentum1_host`` with their per-feature offsets), so checkpoints,
// learning-rate changes and TorchRec's fused optimizer keep working unchanged; only the
// computation differs:
//
// * forward: pooled (SUM / MEAN, optionally weighted) lookups; tasks are blocks of bags of one
//   feature, rows prefetched a few lookups ahead;
// * backward + update (fbgemm's "exact" optimizers: each row's gradient is summed over all its
//   lookups, then the row is updated once): one task per table; the gradients are summed into
//   a buffer indexed by row with a bitmap of the rows touched (both per thread, kept zero
//   between calls), then the touched rows are updated in row order. fbgemm's CPU backward
//   instead sorts every table's lookups (csr2csc) and, for a table shared by several features
//   (every CCE/CE codebook: one feature per chunk), runs a single-threaded scalar loop. A table
//   with far more rows than lookups sorts its lookups here too (its unique rows are the
//   buffer's slots).
//
// Weights may be float32, float16 or bfloat16 (read as float32, each updated row rounded to
// nearest, like fbgemm's CPU kernels for float16; fbgemm has no CPU bfloat16 kernels at all);
// optimizer state is float32.
//
// Maths of the updates (fbgemm's CPU code, codegen/genscript/optimizers.py):
//   SGD:               w -= lr * g
//   Adagrad:           m += g * g (per element);  w -= lr * g / (sqrt(m) + eps)
//   row-wise Adagrad:  m += sum_d(g * g) / D;     w -= g * (lr / (sqrt(m) + eps))
// No weight decay: fbgemm's CPU row-wise Adagrad applies it to shared tables only, so the
// Python side leaves TBEs with weight decay to fbgemm. Results equal fbgemm's up to
// floating-point summation order (tests/test_tbe_kernel.py).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef __F16C__
#include <immintrin.h>
#endif

namespace torchrec_cce {
namespace {

enum Optimizer : int64_t { kSGD = 0, kAdagrad = 1, kRowwiseAdagrad = 2 };
enum Pooling : int64_t { kSum = 0, kMean = 1 };
// What the per-sample weights do: none, scale each lookup, scale and get a gradient.
enum class Weights { kNone, kScale, kScaleAndGrad };

// fbgemm's per-feature layout: feature f reads rows of D = D_offsets[f+1] - D_offsets[f] floats
// at weights + weights_offsets[f], writes output columns [D_offsets[f], D_offsets[f+1]), and its
// bag b holds ids [offsets[f*B + b], offsets[f*B + b + 1]).
struct TBELayout {
  int64_t T = 0;  // features
  int64_t B = 0;  // bags per feature
  int64_t total_D = 0;
  const int64_t* weights_offsets = nullptr;
  const int32_t* D_offsets = nullptr;
  int64_t dim(int64_t f) const { return D_offsets[f + 1] - D_offsets[f]; }
};

TBELayout make_layout(const at::Tensor& weights_offsets, const at::Tensor& D_offsets,
                      int64_t total_D, const at::Tensor& offsets) {
  TORCH_CHECK(weights_offsets.dtype() == at::kLong && weights_offsets.is_contiguous(),
              "torchrec_cce::tbe: weights_offsets must be contiguous int64");
  TORCH_CHECK(D_offsets.dtype() == at::kInt && D_offsets.is_contiguous(),
              "torchrec_cce::tbe: D_offsets must be contiguous int32");
  TBELayout l;
  l.T = D_offsets.numel() - 1;
  TORCH_CHECK(l.T > 0 && weights_offsets.numel() == l.T,
              "torchrec_cce::tbe: weights_offsets and D_offsets disagree on the feature count");
  TORCH_CHECK((offsets.numel() - 1) % l.T == 0, "torchrec_cce::tbe: offsets has ",
              offsets.numel(), " entries, not features x batch + 1 (", l.T, " features)");
  l.B = (offsets.numel() - 1) / l.T;
  l.total_D = total_D;
  l.weights_offsets = weights_offsets.data_ptr<int64_t>();
  l.D_offsets = D_offsets.data_ptr<int32_t>();
  return l;
}

[[noreturn]] void out_of_range(int64_t feature, int64_t id, int64_t rows) {
  TORCH_CHECK(false, "torchrec_cce::tbe: feature ", feature, " looks up row ", id,
              " of a table with ", rows, " rows (codebook ids must lie in [0, rows))");
}

// Calls fn.template operator()<kD>() with kD = D for the common dims, else kD = 0 (runtime D).
template <typename Fn>
void dispatch_dim(int64_t D, Fn&& fn) {
  switch (D) {
    case 4: fn.template operator()<4>(); break;
    case 8: fn.template operator()<8>(); break;
    case 16: fn.template operator()<16>(); break;
    case 32: fn.template operator()<32>(); break;
    case 64: fn.template operator()<64>(); break;
    default: fn.template operator()<0>();
  }
}

constexpr int64_t kPrefetchAhead = 48;  // lookups

// Rows of the dispatched dims (kD > 0) are handled 4 floats at a time with GCC/Clang vector
// extensions (plain SSE on x86-64); kD = 0 (any other dim) runs scalar loops.
using v4 = float __attribute__((vector_size(16)));
inline v4 load4(const float* p) {
  v4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store4(float* p, v4 v) { std::memcpy(p, &v, sizeof(v)); }
// Weights are float32 or float16 (computed in float32; stored back rounded to nearest, as
// fbgemm's CPU kernels do).
// With F16C (built with -mf16c where the CPU has it) the conversions are one instruction for 4
// values; both ways round to nearest even, like c10::Half.
#ifdef __F16C__
inline v4 load4(const at::Half* p) {
  __m128i h;
  std::memcpy(&h, p, 8);
  return reinterpret_cast<v4>(_mm_cvtph_ps(h));
}
inline void store4(at::Half* p, v4 v) {
  const __m128i h = _mm_cvtps_ph(reinterpret_cast<__m128>(v), _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(p, &h, 8);
}
#else
inline v4 load4(const at::Half* p) {
  return v4{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]),
            static_cast<float>(p[3])};
}
inline void store4(at::Half* p, v4 v) {
  for (int k = 0; k < 4; ++k) p[k] = static_cast<at::Half>(v[k]);
}
#endif
inline v4 load4(const at::BFloat16* p) {
  return v4{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]),
            static_cast<float>(p[3])};
}
inline void store4(at::BFloat16* p, v4 v) {
  for (int k = 0; k < 4; ++k) p[k] = static_cast<at::BFloat16>(v[k]);
}

// ---------------------------------------------------------------- forward
// Bags [b0, b1) of feature f into their output columns.
template <int kD, bool kWeighted, typename W, typename index_t>
void pool_feature(const TBELayout& l, int64_t f, int64_t b0, int64_t b1,
                  const W* __restrict__ weights, int64_t rows,
                  const index_t* __restrict__ idx, const index_t* __restrict__ off,
                  const float* __restrict__ psw, bool mean, float* __restrict__ out) {
  const int64_t D = kD > 0 ? kD : l.dim(f);
  const W* __restrict__ table = weights + l.weights_offsets[f];
  const index_t* bag_off = off + f * l.B;
  const int64_t last = bag_off[b1], col = l.D_offsets[f], stride = l.total_D;
  constexpr int kV = kD > 0 ? kD / 4 : 1;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = bag_off[b], end = bag_off[b + 1];
    float* o = out + b * stride + col;
    v4 acc[kV] = {};
    if constexpr (kD == 0) std::fill(o, o + D, 0.f);
    for (int64_t i = begin; i < end; ++i) {
      if (i + kPrefetchAhead < last) {
        __builtin_prefetch(table + static_cast<int64_t>(idx[i + kPrefetchAhead]) * D);
      }
      const int64_t r = static_cast<int64_t>(idx[i]);
      if (r < 0 || r >= rows) out_of_range(f, r, rows);
      const W* row = table + r * D;
      const float w = kWeighted ? psw[i] : 1.0f;
      if constexpr (kD > 0) {
        for (int v = 0; v < kV; ++v) {
          acc[v] += kWeighted ? w * load4(row + 4 * v) : load4(row + 4 * v);
        }
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] += w * static_cast<float>(row[d]);
      }
    }
    const float scale = (mean && end > begin) ? 1.0f / static_cast<float>(end - begin) : 1.0f;
    if constexpr (kD > 0) {
      for (int v = 0; v < kV; ++v) store4(o + 4 * v, acc[v] * scale);
    } else if (scale != 1.0f) {
      for (int64_t d = 0; d < D; ++d) o[d] *= scale;
    }
  }
}

template <typename W, typename index_t>
void forward_kernel(const TBELayout& l, const W* weights, const int64_t* rows,
                    const index_t* idx, const index_t* off, const float* psw, bool mean,
                    float* out) {
  // Tasks: blocks of kBlock bags of one feature, feature by feature, so a table's rows stay in
  // cache (measured faster than blocks of samples over every feature, which walk every table
  // in each block, and than writing a shared table's features sample by sample).
  constexpr int64_t kBlock = 512;
  const int64_t blocks = (l.B + kBlock - 1) / kBlock;
  at::parallel_for(0, l.T * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t f = task / blocks, b0 = (task % blocks) * kBlock;
      const int64_t b1 = std::min(l.B, b0 + kBlock);
      dispatch_dim(l.dim(f), [&]<int kD>() {
        if (psw) {
          pool_feature<kD, true>(l, f, b0, b1, weights, rows[f], idx, off, psw, mean, out);
        } else {
          pool_feature<kD, false>(l, f, b0, b1, weights, rows[f], idx, off, psw, mean, out);
        }
      });
    }
  });
}

at::Tensor tbe_forward_cpu(const at::Tensor& weights, const at::Tensor& weights_offsets,
                           const at::Tensor& D_offsets, int64_t total_D,
                           const at::Tensor& rows_per_feature, const at::Tensor& indices,
                           const at::Tensor& offsets,
                           const c10::optional<at::Tensor>& per_sample_weights,
                           int64_t pooling_mode) {
  TORCH_CHECK((weights.dtype() == at::kFloat || weights.dtype() == at::kHalf ||
               weights.dtype() == at::kBFloat16) && weights.is_contiguous(),
              "torchrec_cce::tbe_forward: weights must be contiguous float32, float16 or "
              "bfloat16");
  auto out = at::empty({(offsets.numel() - 1) / std::max<int64_t>(D_offsets.numel() - 1, 1),
                        total_D}, weights.options().dtype(at::kFloat));
  TORCH_CHECK(indices.scalar_type() == offsets.scalar_type(),
              "torchrec_cce::tbe_forward: indices and offsets must have the same dtype");
  TORCH_CHECK(rows_per_feature.dtype() == at::kLong && rows_per_feature.is_contiguous(),
              "torchrec_cce::tbe_forward: rows_per_feature must be contiguous int64");
  const TBELayout l = make_layout(weights_offsets, D_offsets, total_D, offsets);
  at::Tensor psw;
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    psw = per_sample_weights->to(at::kFloat).contiguous();
  }
  const float* psw_ptr = psw.defined() ? psw.data_ptr<float>() : nullptr;
  const bool mean = pooling_mode == kMean;
  auto idx = indices.contiguous();
  auto off = offsets.contiguous();
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "torchrec_cce::tbe_forward: indices must be int32 or int64");
  const int64_t* rows = rows_per_feature.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  auto run = [&](const auto* w) {
    if (indices.scalar_type() == at::kLong) {
      forward_kernel(l, w, rows, idx.data_ptr<int64_t>(), off.data_ptr<int64_t>(), psw_ptr,
                     mean, o);
    } else {
      forward_kernel(l, w, rows, idx.data_ptr<int32_t>(), off.data_ptr<int32_t>(), psw_ptr,
                     mean, o);
    }
  };
  if (weights.dtype() == at::kHalf) {
    run(weights.data_ptr<at::Half>());
  } else if (weights.dtype() == at::kBFloat16) {
    run(weights.data_ptr<at::BFloat16>());
  } else {
    run(weights.data_ptr<float>());
  }
  return out;
}

// ---------------------------------------------------------------- backward + update
// Reusable per-thread buffers, all zero between uses: a gradient row per table row (or per
// unique row on the sorted path) and a bitmap of the slots touched.
struct Scratch {
  std::vector<float> grad;
  std::vector<uint64_t> touched;
  std::vector<int64_t> order;  // the sorted path's unique rows
};
thread_local Scratch tls_scratch;

// Tables of up to this many floats, or with at most 8x more rows than lookups, accumulate
// into a row-indexed buffer; the others sort their lookups.
constexpr int64_t kDenseFloats = int64_t{1} << 22;

// One table's view for its backward task.
template <typename W>
struct TableTask {
  const std::vector<int64_t>* features;
  int64_t D, rows;
  W* table;
  const int64_t* order = nullptr;  // sorted path: slot k holds row order[k]
  int64_t slots = 0;
  float* grad = nullptr;
  uint64_t* touched = nullptr;
};

// Sum every lookup's output gradient into its row's slot (lookup order: deterministic) and
// mark the slot; with kScaleAndGrad also the per-sample weights' gradient (output gradient .
// row, before any update).
template <int kD, Weights kW, typename W, typename index_t>
void accumulate(const TBELayout& l, const TableTask<W>& t, const float* __restrict__ grad_out,
                int64_t go_stride, const index_t* __restrict__ idx,
                const index_t* __restrict__ off, const float* __restrict__ psw, bool mean,
                float* __restrict__ grad_psw) {
  // Locals, so the stores below cannot make the compiler reload them.
  const int64_t D = kD > 0 ? kD : t.D, rows = t.rows, slots = t.slots;
  const W* const table = t.table;
  const int64_t* const order = t.order;
  float* const grad = t.grad;
  uint64_t* const touched = t.touched;
  constexpr int kV = kD > 0 ? kD / 4 : 1;
  for (int64_t f : *t.features) {
    const int64_t col = l.D_offsets[f];
    const index_t* bag_off = off + f * l.B;
    const int64_t last = bag_off[l.B];
    for (int64_t b = 0; b < l.B; ++b) {
      const int64_t begin = bag_off[b], end = bag_off[b + 1];
      if (begin == end) continue;
      const float scale = mean ? 1.0f / static_cast<float>(end - begin) : 1.0f;
      const float* go = grad_out + b * go_stride + col;
      v4 go4[kV];
      if constexpr (kD > 0) {
        for (int v = 0; v < kV; ++v) go4[v] = load4(go + 4 * v) * scale;
      }
      for (int64_t i = begin; i < end; ++i) {
        if (!order && i + kPrefetchAhead < last) {
          __builtin_prefetch(grad + static_cast<int64_t>(idx[i + kPrefetchAhead]) * D, 1);
        }
        const int64_t r = static_cast<int64_t>(idx[i]);
        if (r < 0 || r >= rows) out_of_range(f, r, rows);
        if constexpr (kW == Weights::kScaleAndGrad) {
          const W* w = table + r * D;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += go[d] * static_cast<float>(w[d]);
          grad_psw[i] = dot * scale;
        }
        const int64_t k = order ? std::lower_bound(order, order + slots, r) - order : r;
        float* g = grad + k * D;
        if constexpr (kD > 0) {
          const float c = kW != Weights::kNone ? psw[i] : 1.0f;
          for (int v = 0; v < kV; ++v) {
            store4(g + 4 * v, load4(g + 4 * v) + (kW != Weights::kNone ? c * go4[v] : go4[v]));
          }
        } else {
          const float c = kW != Weights::kNone ? psw[i] * scale : scale;
          for (int64_t d = 0; d < D; ++d) g[d] += c * go[d];
        }
        touched[k >> 6] |= uint64_t{1} << (k & 63);
      }
    }
  }
}

// Update every touched row once, in row order, clearing its gradient and bit on the way.
template <int kD, Optimizer kOpt, typename W>
void update_touched(const TableTask<W>& t, float* __restrict__ momentum, float lr, float eps) {
  const int64_t D = kD > 0 ? kD : t.D;
  const int64_t words = (t.slots + 63) / 64;
  const int64_t* const order = t.order;
  float* const grad = t.grad;
  W* const table = t.table;
  uint64_t* const touched = t.touched;
  constexpr int kV = kD > 0 ? kD / 4 : 1;
  for (int64_t word = 0; word < words; ++word) {
    for (uint64_t bits = touched[word]; bits; bits &= bits - 1) {
      const int64_t k = word * 64 + __builtin_ctzll(bits);
      const int64_t r = order ? order[k] : k;
      float* g = grad + k * D;
      W* w = table + r * D;
      if constexpr (kOpt == kSGD) {
        for (int64_t d = 0; d < D; ++d) {
          w[d] = static_cast<W>(static_cast<float>(w[d]) - lr * g[d]);
        }
      } else if constexpr (kOpt == kAdagrad) {
        float* m = momentum + r * D;
        for (int64_t d = 0; d < D; ++d) {
          m[d] += g[d] * g[d];
          w[d] = static_cast<W>(static_cast<float>(w[d]) - lr * g[d] / (std::sqrt(m[d]) + eps));
        }
      } else if constexpr (kD > 0) {
        v4 sq = {};
        for (int v = 0; v < kV; ++v) sq += load4(g + 4 * v) * load4(g + 4 * v);
        const float sum_sq = (sq[0] + sq[1]) + (sq[2] + sq[3]);
        const float m = momentum[r] + sum_sq / static_cast<float>(D);
        momentum[r] = m;
        const float mult = lr / (std::sqrt(m) + eps);
        for (int v = 0; v < kV; ++v) {
          store4(w + 4 * v, load4(w + 4 * v) - load4(g + 4 * v) * mult);
        }
      } else {
        float sum_sq = 0.f;
        for (int64_t d = 0; d < D; ++d) sum_sq += g[d] * g[d];
        const float m = momentum[r] + sum_sq / static_cast<float>(D);
        momentum[r] = m;
        const float mult = lr / (std::sqrt(m) + eps);
        for (int64_t d = 0; d < D; ++d) {
          w[d] = static_cast<W>(static_cast<float>(w[d]) - g[d] * mult);
        }
      }
      std::fill(g, g + D, 0.f);
    }
    touched[word] = 0;
  }
}

struct UpdateArgs {
  Optimizer optimizer = kSGD;
  float lr = 0.f, eps = 0.f;
  float* momentum = nullptr;
  const int64_t* momentum_offsets = nullptr;
};

template <typename W, typename index_t>
void backward_table(const std::vector<int64_t>& features, const TBELayout& l,
                    const float* grad_out, int64_t go_stride, W* weights,
                    const int64_t* rows_per_feature, const index_t* idx, const index_t* off,
                    const float* psw, bool mean, float* grad_psw, const UpdateArgs& u) {
  const int64_t f0 = features[0];
  TableTask<W> t;
  t.features = &features;
  t.D = l.dim(f0);
  t.rows = rows_per_feature[f0];
  t.table = weights + l.weights_offsets[f0];
  int64_t lookups = 0;
  for (int64_t f : features) lookups += off[(f + 1) * l.B] - off[f * l.B];
  if (lookups == 0) return;
  Scratch& s = tls_scratch;
  t.slots = t.rows;
  if (t.rows * t.D > kDenseFloats && t.rows > 8 * lookups) {  // sorted path
    s.order.clear();
    for (int64_t f : features) {
      for (int64_t i = off[f * l.B]; i < off[(f + 1) * l.B]; ++i) {
        const int64_t r = static_cast<int64_t>(idx[i]);
        if (r < 0 || r >= t.rows) out_of_range(f, r, t.rows);
        s.order.push_back(r);
      }
    }
    std::sort(s.order.begin(), s.order.end());
    s.order.erase(std::unique(s.order.begin(), s.order.end()), s.order.end());
    t.order = s.order.data();
    t.slots = static_cast<int64_t>(s.order.size());
  }
  const int64_t words = (t.slots + 63) / 64;
  if (static_cast<int64_t>(s.grad.size()) < t.slots * t.D) s.grad.resize(t.slots * t.D, 0.f);
  if (static_cast<int64_t>(s.touched.size()) < words) s.touched.resize(words, 0);
  t.grad = s.grad.data();
  t.touched = s.touched.data();
  struct Restore {  // all zero again if a bad id throws mid-way
    const TableTask<W>& t;
    bool done = false;
    ~Restore() {
      if (done) return;
      for (int64_t word = 0; word < (t.slots + 63) / 64; ++word) {
        for (uint64_t bits = t.touched[word]; bits; bits &= bits - 1) {
          const int64_t k = word * 64 + __builtin_ctzll(bits);
          std::fill(t.grad + k * t.D, t.grad + (k + 1) * t.D, 0.f);
        }
        t.touched[word] = 0;
      }
    }
  } restore{t};
  float* momentum = u.optimizer == kSGD ? nullptr : u.momentum + u.momentum_offsets[f0];
  dispatch_dim(t.D, [&]<int kD>() {
    if (!psw) {
      accumulate<kD, Weights::kNone>(l, t, grad_out, go_stride, idx, off, psw, mean, grad_psw);
    } else if (!grad_psw) {
      accumulate<kD, Weights::kScale>(l, t, grad_out, go_stride, idx, off, psw, mean, grad_psw);
    } else {
      accumulate<kD, Weights::kScaleAndGrad>(l, t, grad_out, go_stride, idx, off, psw, mean,
                                             grad_psw);
    }
    switch (u.optimizer) {
      case kSGD: update_touched<kD, kSGD>(t, momentum, u.lr, u.eps); break;
      case kAdagrad: update_touched<kD, kAdagrad>(t, momentum, u.lr, u.eps); break;
      default: update_touched<kD, kRowwiseAdagrad>(t, momentum, u.lr, u.eps);
    }
  });
  restore.done = true;
}

at::Tensor tbe_backward_update_cpu(
    const at::Tensor& grad_output, at::Tensor weights, const at::Tensor& weights_offsets,
    const at::Tensor& D_offsets, int64_t total_D, const at::Tensor& rows_per_feature,
    const at::Tensor& feature_table, const at::Tensor& indices, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& per_sample_weights, int64_t pooling_mode,
    bool per_sample_weights_grad, int64_t optimizer, at::Tensor momentum,
    const at::Tensor& momentum_offsets, double learning_rate, double eps) {
  TORCH_CHECK((weights.dtype() == at::kFloat || weights.dtype() == at::kHalf ||
               weights.dtype() == at::kBFloat16) && weights.is_contiguous(),
              "torchrec_cce::tbe_backward_update: weights must be contiguous float32, float16 or "
              "bfloat16");
  TORCH_CHECK(optimizer == kSGD || optimizer == kAdagrad || optimizer == kRowwiseAdagrad,
              "torchrec_cce::tbe_backward_update: unknown optimizer ", optimizer);
  TORCH_CHECK(optimizer == kSGD || (momentum.dtype() == at::kFloat && momentum.is_contiguous()),
              "torchrec_cce::tbe_backward_update: momentum must be contiguous float32");
  TORCH_CHECK(indices.scalar_type() == offsets.scalar_type(),
              "torchrec_cce::tbe_backward_update: indices and offsets must have the same dtype");
  const TBELayout l = make_layout(weights_offsets, D_offsets, total_D, offsets);
  auto go = grad_output.to(at::kFloat);
  TORCH_CHECK(go.dim() == 2 && go.size(0) == l.B && go.size(1) == total_D,
              "torchrec_cce::tbe_backward_update: grad_output must be [", l.B, ", ", total_D,
              "]");
  // Any row stride is read in place (e.g. 0: the expanded gradient of a sum); columns must
  // be contiguous.
  if (go.stride(1) != 1 && total_D > 1) go = go.contiguous();
  const int64_t go_stride = go.stride(0);
  at::Tensor psw, grad_psw;
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    psw = per_sample_weights->to(at::kFloat).contiguous();
  }
  if (per_sample_weights_grad) {
    TORCH_CHECK(psw.defined(),
                "torchrec_cce::tbe_backward_update: per-sample weight gradient without weights");
    grad_psw = at::zeros({indices.numel()}, go.options());
  }
  // The features of each table (fbgemm's feature_table_map), in feature order.
  auto ft = feature_table.to(at::kLong).contiguous();
  const int64_t* ftp = ft.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> tables;
  std::vector<int64_t> table_task;
  for (int64_t f = 0; f < l.T; ++f) {
    const int64_t t = ftp[f];
    if (t >= static_cast<int64_t>(table_task.size())) table_task.resize(t + 1, -1);
    if (table_task[t] < 0) {
      table_task[t] = static_cast<int64_t>(tables.size());
      tables.emplace_back();
    }
    tables[table_task[t]].push_back(f);
  }
  UpdateArgs u;
  u.optimizer = static_cast<Optimizer>(optimizer);
  u.lr = static_cast<float>(learning_rate);
  u.eps = static_cast<float>(eps);
  if (optimizer != kSGD) {
    u.momentum = momentum.data_ptr<float>();
    u.momentum_offsets = momentum_offsets.data_ptr<int64_t>();
  }
  const bool mean = pooling_mode == kMean;
  const float* psw_ptr = psw.defined() ? psw.data_ptr<float>() : nullptr;
  float* grad_psw_ptr = per_sample_weights_grad ? grad_psw.data_ptr<float>() : nullptr;
  auto run = [&](auto* w, auto* idx, auto* off) {
    at::parallel_for(0, static_cast<int64_t>(tables.size()), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        backward_table(tables[t], l, go.data_ptr<float>(), go_stride, w,
                       rows_per_feature.data_ptr<int64_t>(), idx, off, psw_ptr, mean,
                       grad_psw_ptr, u);
      }
    });
  };
  auto with_weights = [&](auto* idx, auto* off) {
    if (weights.dtype() == at::kHalf) {
      run(weights.data_ptr<at::Half>(), idx, off);
    } else if (weights.dtype() == at::kBFloat16) {
      run(weights.data_ptr<at::BFloat16>(), idx, off);
    } else {
      run(weights.data_ptr<float>(), idx, off);
    }
  };
  auto idx = indices.contiguous();
  auto off = offsets.contiguous();
  if (indices.scalar_type() == at::kLong) {
    with_weights(idx.data_ptr<int64_t>(), off.data_ptr<int64_t>());
  } else {
    TORCH_CHECK(indices.scalar_type() == at::kInt,
                "torchrec_cce::tbe_backward_update: indices must be int32 or int64");
    with_weights(idx.data_ptr<int32_t>(), off.data_ptr<int32_t>());
  }
  return per_sample_weights_grad ? grad_psw : at::empty({0}, go.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchrec_cce, m) {
  m.def(
      "tbe_forward(Tensor weights, Tensor weights_offsets, Tensor D_offsets, int total_D, "
      "Tensor rows_per_feature, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "int pooling_mode) -> Tensor");
  m.def(
      "tbe_backward_update(Tensor grad_output, Tensor(a!) weights, Tensor weights_offsets, "
      "Tensor D_offsets, int total_D, Tensor rows_per_feature, Tensor feature_table, "
      "Tensor indices, Tensor offsets, Tensor? per_sample_weights, int pooling_mode, "
      "bool per_sample_weights_grad, int optimizer, Tensor(b!) momentum, "
      "Tensor momentum_offsets, float learning_rate, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchrec_cce, CPU, m) {
  m.impl("tbe_forward", &tbe_forward_cpu);
  m.impl("tbe_backward_update", &tbe_backward_update_cpu);
}

}  // namespace torchrec_cce
