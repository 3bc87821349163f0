// torchrec_cce::remap: a logical KJT's ids -> every codebook stream in one pass (CPU kernel,
// op schema). The CUDA kernel lives in remap_cuda.cu and is compiled only where CUDA exists.
//
// Output (one key per row of ``spec``, in spec order):
//   values:  int64, stream s holds k_s values per id of its input feature (k = 2 for CCE's
//            (p, rows + h) pair, else 1), id by id;
//   lengths: [S * B], k_s * the feature's bag lengths (same dtype as the input lengths);
//   weights: the input weight of each value's id (empty when no weights are given).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "remap.h"

namespace torchrec_cce {
namespace {

struct Layout {
  int64_t num_features = 0;
  std::vector<int64_t> feat_off;   // [F + 1] value offset of each input feature
  std::vector<int64_t> seg_in;     // [S + 1] cumulative input ids over streams (work split)
  std::vector<int64_t> seg_out;    // [S + 1] value offset of each output stream
};

template <typename index_t>
Layout make_layout(const index_t* len, int64_t num_lengths, int64_t batch, const int64_t* spec,
                   int64_t num_streams) {
  Layout l;
  l.num_features = batch > 0 ? num_lengths / batch : 0;
  const int64_t F = l.num_features;
  std::vector<int64_t> counts(F, 0);
  at::parallel_for(0, F, 1, [&](int64_t b, int64_t e) {
    for (int64_t f = b; f < e; ++f) {
      int64_t n = 0;
      for (int64_t i = 0; i < batch; ++i) n += static_cast<int64_t>(len[f * batch + i]);
      counts[f] = n;
    }
  });
  l.feat_off.assign(F + 1, 0);
  for (int64_t f = 0; f < F; ++f) l.feat_off[f + 1] = l.feat_off[f] + counts[f];
  l.seg_in.assign(num_streams + 1, 0);
  l.seg_out.assign(num_streams + 1, 0);
  for (int64_t s = 0; s < num_streams; ++s) {
    const int64_t* row = spec + s * kSpecCols;
    const int64_t f = row[kFeature];
    TORCH_CHECK(f >= 0 && f < F, "torchrec_cce::remap: stream ", s, " reads feature ", f,
                " but the KJT has ", F, " features");
    const int64_t n = counts[f];
    l.seg_in[s + 1] = l.seg_in[s] + n;
    l.seg_out[s + 1] = l.seg_out[s] + values_per_id(row[kKind]) * n;
  }
  return l;
}

struct PackedView {
  const int32_t* words = nullptr;
  int64_t num_words = 0;
};

// Whether streams s - 1 and s are chunks of one CCE table read for one feature: they are then
// computed together, id by id, so each id's packed p (its chunks are adjacent bits) is fetched
// from memory once, not once per chunk.
bool same_cce_group(const int64_t* prev, const int64_t* row) {
  return prev[kKind] == kCCEPair && row[kKind] == kCCEPair && prev[kFeature] == row[kFeature] &&
         prev[kAssign] == row[kAssign] && prev[kPre] == row[kPre] && prev[kGen] == row[kGen] &&
         prev[kRows] == row[kRows];
}

constexpr int64_t kMaxGroup = 64;

// Values of ids [j0, j1) (feature-local positions) of the CCE streams ``rows[0..g)`` (one
// table's chunks, one feature) into ``outs[c]``: per id, (p_c(x), rows + h_c(x)) + offset_c.
void fill_cce_group(const int64_t* const* rows, int64_t g, const int64_t* ids, int64_t j0,
                    int64_t j1, int64_t* const* outs, const std::vector<int64_t>& gen_values,
                    const std::vector<PackedView>& assigns,
                    const std::vector<at::Tensor>& pres) {
  const int64_t* r0 = rows[0];
  const int64_t nrows = r0[kRows];
  int64_t pkey[kMaxGroup], hkey[kMaxGroup], offset[kMaxGroup], col[kMaxGroup];
  int64_t qa[kMaxGroup], qb[kMaxGroup];
  bool remainder_h[kMaxGroup];
  for (int64_t c = 0; c < g; ++c) {
    const int64_t* row = rows[c];
    pkey[c] = row[kKey];
    hkey[c] = row[kGen] >= 0 ? combine_key(row[kHKey], gen_values[row[kGen]]) : row[kHKey];
    offset[c] = row[kOffset];
    col[c] = row[kColumn];
    qa[c] = row[kQRMul];
    qb[c] = row[kQRAdd];
    // init="qr": h is the remainder before the first re-clustering, and always if kept.
    const int64_t gen = row[kGen] >= 0 ? gen_values[row[kGen]] : 1;
    remainder_h[c] = qa[c] != 0 && (row[kKeepRemainder] != 0 || gen == 0);
  }
  const int64_t num_ids = r0[kNumIds];
  const int64_t* pre = nullptr;
  int64_t pre_stride = 0;
  if (r0[kPre] >= 0) {
    pre = pres[r0[kPre]].data_ptr<int64_t>();
    pre_stride = pres[r0[kPre]].size(1);
  }
  const PackedView* a = (pre == nullptr && r0[kAssign] >= 0) ? &assigns[r0[kAssign]] : nullptr;
  const int64_t lo = r0[kAssignLo], count = a != nullptr ? r0[kAssignCount] : 0;
  const int64_t bits = r0[kBits], chunks = r0[kChunks];
  // Blocks of ids: first prefetch every packed p of the block (independent loads, so their
  // cache misses overlap), then compute.
  constexpr int64_t kBlock = 64;
  for (int64_t b0 = j0; b0 < j1; b0 += kBlock) {
    const int64_t b1 = std::min(j1, b0 + kBlock);
    if (a != nullptr && bits > 0) {
      for (int64_t j = b0; j < b1; ++j) {
        const int64_t y = ids[j] - lo;
        if (y >= 0 && y < count) __builtin_prefetch(a->words + ((y * chunks * bits) >> 5));
      }
    }
    for (int64_t j = b0; j < b1; ++j) {
      const int64_t x = ids[j];
      const bool inside = x - lo >= 0 && x - lo < count;
      for (int64_t c = 0; c < g; ++c) {
        const int64_t xq = qa[c] != 0 ? qr_permute(x, qa[c], qb[c], num_ids) : 0;
        int64_t p;
        if (pre != nullptr) {
          p = pre[j * pre_stride + col[c]];
        } else if (inside) {
          p = packed_entry(a->words, a->num_words, x - lo, chunks, col[c], bits);
        } else {
          p = qa[c] != 0 ? (xq / nrows) % nrows : hash_id(x, pkey[c], nrows);
        }
        const int64_t h = remainder_h[c] ? xq % nrows : hash_id(x, hkey[c], nrows);
        outs[c][2 * j] = p + offset[c];
        outs[c][2 * j + 1] = nrows + h + offset[c];
      }
    }
  }
}

// Values of ids [j0, j1) (feature-local positions) of stream ``row`` into ``out``.
void fill_stream(const int64_t* row, const int64_t* ids, int64_t j0, int64_t j1, int64_t* out,
                 std::atomic<int64_t>* bad_id,
                 std::atomic<int64_t>* bad_stream, int64_t stream) {
  const int64_t kind = row[kKind], rows = row[kRows], offset = row[kOffset];
  switch (kind) {
    case kIdentity:
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t x = ids[j];
        if (x < 0 || x >= rows) {
          int64_t expected = -1;
          if (bad_stream->compare_exchange_strong(expected, stream)) bad_id->store(x);
        }
        out[j] = x + offset;
      }
      break;
    case kHash: {
      const int64_t key = row[kKey];
      for (int64_t j = j0; j < j1; ++j) out[j] = hash_id(ids[j], key, rows) + offset;
      break;
    }
    case kQRQuotient:
    case kQRRemainder: {
      const int64_t V = row[kNumIds];
      const bool quotient = kind == kQRQuotient;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t x = floor_mod(ids[j], V);
        out[j] = (quotient ? x / rows : x % rows) + offset;
      }
      break;
    }
    default:
      TORCH_CHECK(false, "torchrec_cce::remap: unknown stream kind ", kind);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> remap_cpu(
    const at::Tensor& ids_in, const at::Tensor& lengths_in,
    const c10::optional<at::Tensor>& weights_in, int64_t batch, const at::Tensor& spec_in,
    at::TensorList generations, at::TensorList assignments, at::TensorList precomputed) {
  TORCH_CHECK(ids_in.scalar_type() == at::kLong, "torchrec_cce::remap: ids must be int64");
  TORCH_CHECK(batch >= 0, "torchrec_cce::remap: negative batch size");
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const at::Tensor spec = spec_in.to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(spec.dim() == 2 && spec.size(1) == kSpecCols,
              "torchrec_cce::remap: spec must be [streams, ", kSpecCols, "]");
  TORCH_CHECK(batch == 0 || lengths.numel() % batch == 0,
              "torchrec_cce::remap: lengths (", lengths.numel(), ") is not features x batch ",
              batch);
  const int64_t S = spec.size(0);
  const int64_t* sp = spec.data_ptr<int64_t>();

  std::vector<int64_t> gen_values;
  for (const auto& g : generations) gen_values.push_back(g.item<int64_t>());
  std::vector<at::Tensor> keep;
  std::vector<PackedView> assigns;
  for (const auto& a : assignments) {
    TORCH_CHECK(a.dim() == 1 && a.scalar_type() == at::kInt && a.device().is_cpu(),
                "torchrec_cce::remap: a packed assignment must be a 1-D int32 CPU tensor");
    at::Tensor c = a.contiguous();
    keep.push_back(c);
    assigns.push_back({c.data_ptr<int32_t>(), c.numel()});
  }
  std::vector<at::Tensor> pres;
  for (const auto& p : precomputed) pres.push_back(p.to(at::kLong).contiguous());

  Layout l;
  AT_DISPATCH_INDEX_TYPES(lengths.scalar_type(), "torchrec_cce_remap_layout", [&] {
    l = make_layout<index_t>(lengths.data_ptr<index_t>(), lengths.numel(), batch, sp, S);
  });
  TORCH_CHECK(l.feat_off.back() == ids.numel(), "torchrec_cce::remap: lengths sum to ",
              l.feat_off.back(), " but there are ", ids.numel(), " ids");
  for (int64_t s = 0; s < S; ++s) {
    const int64_t* row = sp + s * kSpecCols;
    const int64_t n = l.feat_off[row[kFeature] + 1] - l.feat_off[row[kFeature]];
    TORCH_CHECK(row[kRows] > 0, "torchrec_cce::remap: stream ", s, " has rows <= 0");
    if (row[kPre] >= 0) {
      TORCH_CHECK(row[kPre] < static_cast<int64_t>(pres.size()) &&
                      pres[row[kPre]].dim() == 2 && pres[row[kPre]].size(0) == n &&
                      row[kColumn] < pres[row[kPre]].size(1),
                  "torchrec_cce::remap: precomputed p of stream ", s, " must be [", n,
                  ", chunks]");
    }
    TORCH_CHECK(row[kAssign] < static_cast<int64_t>(assigns.size()),
                "torchrec_cce::remap: bad assignment index in stream ", s);
    if (row[kKind] == kCCEPair && row[kAssign] >= 0) {
      TORCH_CHECK(row[kBits] >= 0 && row[kBits] < 32 && row[kChunks] > 0 &&
                      row[kColumn] >= 0 && row[kColumn] < row[kChunks] &&
                      row[kAssignCount] >= 0 && (row[kBits] == 0 || (1LL << row[kBits]) >= row[kRows]),
                  "torchrec_cce::remap: bad packed assignment layout in stream ", s);
      TORCH_CHECK(assigns[row[kAssign]].num_words >=
                      packed_num_words(row[kAssignCount], row[kChunks], row[kBits]),
                  "torchrec_cce::remap: packed assignment of stream ", s, " has ",
                  assigns[row[kAssign]].num_words, " words, fewer than ", row[kAssignCount],
                  " ids need");
    }
    TORCH_CHECK(row[kGen] < static_cast<int64_t>(gen_values.size()),
                "torchrec_cce::remap: bad generation index in stream ", s);
  }

  at::Tensor out_lengths = at::empty({S * batch}, lengths.options());
  AT_DISPATCH_INDEX_TYPES(lengths.scalar_type(), "torchrec_cce_remap_lengths", [&] {
    const index_t* len = lengths.data_ptr<index_t>();
    index_t* out = out_lengths.data_ptr<index_t>();
    at::parallel_for(0, S, std::max<int64_t>(1, 16384 / std::max<int64_t>(batch, 1)),
                     [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) {
        const int64_t* row = sp + s * kSpecCols;
        const index_t k = static_cast<index_t>(values_per_id(row[kKind]));
        const index_t* in = len + row[kFeature] * batch;
        index_t* o = out + s * batch;
        for (int64_t i = 0; i < batch; ++i) o[i] = k * in[i];
      }
    });
  });

  at::Tensor values = at::empty({l.seg_out[S]}, ids.options());
  const int64_t* idp = ids.data_ptr<int64_t>();
  int64_t* vp = values.data_ptr<int64_t>();
  std::atomic<int64_t> bad_id{0}, bad_stream{-1};
  // Work units: single streams, or a CCE table's chunk streams for one feature (a group).
  std::vector<int64_t> group_first{0}, group_in{0};
  for (int64_t s = 1; s <= S; ++s) {
    if (s < S && s - group_first.back() < kMaxGroup &&
        same_cce_group(sp + (s - 1) * kSpecCols, sp + s * kSpecCols))
      continue;
    group_first.push_back(s);
    group_in.push_back(group_in.back() + l.seg_in[s] - l.seg_in[s - 1]);
  }
  const int64_t G = static_cast<int64_t>(group_first.size()) - 1;
  at::parallel_for(0, group_in[G], 2048, [&](int64_t begin, int64_t end) {
    int64_t q = std::upper_bound(group_in.begin(), group_in.end(), begin) - group_in.begin() - 1;
    int64_t pos = begin;
    while (pos < end && q < G) {
      const int64_t stop = std::min(end, group_in[q + 1]);
      const int64_t s0 = group_first[q], g = group_first[q + 1] - s0;
      const int64_t* row = sp + s0 * kSpecCols;
      const int64_t f0 = l.feat_off[row[kFeature]];
      // Outputs are indexed by the feature-local position j (k values per id).
      const int64_t j0 = pos - group_in[q], j1 = stop - group_in[q];
      if (row[kKind] == kCCEPair) {
        const int64_t* rows[kMaxGroup];
        int64_t* outs[kMaxGroup];
        for (int64_t c = 0; c < g; ++c) {
          rows[c] = sp + (s0 + c) * kSpecCols;
          outs[c] = vp + l.seg_out[s0 + c];
        }
        fill_cce_group(rows, g, idp + f0, j0, j1, outs, gen_values, assigns, pres);
      } else {
        fill_stream(row, idp + f0, j0, j1, vp + l.seg_out[s0], &bad_id, &bad_stream, s0);
      }
      pos = stop;
      ++q;
    }
  });
  TORCH_CHECK(bad_stream.load() < 0, "torchrec_cce::remap: id ", bad_id.load(),
              " is outside [0, ",
              bad_stream.load() >= 0 ? sp[bad_stream.load() * kSpecCols + kRows] : 0,
              ") in stream ", bad_stream.load());

  at::Tensor out_weights;
  if (weights_in.has_value() && weights_in->defined()) {
    const at::Tensor w = weights_in->contiguous();
    TORCH_CHECK(w.numel() == ids.numel(), "torchrec_cce::remap: weights and ids differ in size");
    out_weights = at::empty({l.seg_out[S]}, w.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(),
                                    "torchrec_cce_remap_weights", [&] {
      const scalar_t* wp = w.data_ptr<scalar_t>();
      scalar_t* op = out_weights.data_ptr<scalar_t>();
      at::parallel_for(0, S, 1, [&](int64_t b, int64_t e) {
        for (int64_t s = b; s < e; ++s) {
          const int64_t* row = sp + s * kSpecCols;
          const int64_t f0 = l.feat_off[row[kFeature]];
          const int64_t n = l.feat_off[row[kFeature] + 1] - f0;
          const int64_t k = values_per_id(row[kKind]);
          scalar_t* o = op + l.seg_out[s];
          for (int64_t j = 0; j < n; ++j)
            for (int64_t r = 0; r < k; ++r) o[j * k + r] = wp[f0 + j];
        }
      });
    });
  } else {
    out_weights = at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  }
  return {values, out_lengths, out_weights};
}

// Gradient of remap's weights output w.r.t. its weights input: every value's gradient goes back
// to the id it came from (summed over streams and over CCE's pair).
at::Tensor remap_weight_grad_cpu(const at::Tensor& grad_in, const at::Tensor& lengths_in,
                                 int64_t batch, const at::Tensor& spec_in, int64_t num_ids) {
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const at::Tensor spec = spec_in.to(at::kCPU, at::kLong).contiguous();
  const int64_t S = spec.size(0);
  const int64_t* sp = spec.data_ptr<int64_t>();
  Layout l;
  AT_DISPATCH_INDEX_TYPES(lengths.scalar_type(), "torchrec_cce_remap_grad_layout", [&] {
    l = make_layout<index_t>(lengths.data_ptr<index_t>(), lengths.numel(), batch, sp, S);
  });
  TORCH_CHECK(l.feat_off.back() == num_ids && grad.numel() == l.seg_out[S],
              "torchrec_cce::remap_weight_grad: sizes do not match the forward");
  at::Tensor out = at::zeros({num_ids}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "torchrec_cce_remap_grad", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // Parallel over features: streams of one feature are summed by one thread, no races.
    at::parallel_for(0, l.num_features, 1, [&](int64_t b, int64_t e) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t* row = sp + s * kSpecCols;
        const int64_t f = row[kFeature];
        if (f < b || f >= e) continue;
        const int64_t f0 = l.feat_off[f], n = l.feat_off[f + 1] - f0;
        const int64_t k = values_per_id(row[kKind]);
        const scalar_t* g = gp + l.seg_out[s];
        for (int64_t j = 0; j < n; ++j) {
          scalar_t acc = op[f0 + j];
          for (int64_t r = 0; r < k; ++r) acc += g[j * k + r];
          op[f0 + j] = acc;
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(torchrec_cce, m) {
  m.def(
      "remap(Tensor ids, Tensor lengths, Tensor? weights, int batch_size, Tensor spec, "
      "Tensor[] generations, Tensor[] assignments, Tensor[] precomputed) -> "
      "(Tensor values, Tensor lengths, Tensor weights)");
  m.def(
      "remap_weight_grad(Tensor grad, Tensor lengths, int batch_size, Tensor spec, "
      "int num_ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchrec_cce, CPU, m) {
  m.impl("remap", &remap_cpu);
  m.impl("remap_weight_grad", &remap_weight_grad_cpu);
}

}  // namespace torchrec_cce
