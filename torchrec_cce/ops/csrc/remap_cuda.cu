// CUDA kernels of torchrec_cce::remap / remap_weight_grad (compiled only where CUDA exists;
// untested on the CPU-only development machine). Same semantics as remap.cpp: one thread per
// (stream, id) pair, the stream found by binary search over the streams' cumulative id counts.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "remap.h"

namespace torchrec_cce {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTables = 64;  // packed assignments / precomputed p per call (device pointers)

struct DeviceTables {
  const int32_t* assign[kMaxTables];  // packed p words (torchrec_cce/methods/packed.py)
  int64_t assign_words[kMaxTables];
  const int64_t* pre[kMaxTables];
  int64_t pre_stride[kMaxTables];
  const int64_t* gens[kMaxTables];
};

__device__ int64_t find_stream(const int64_t* seg_in, int64_t num_streams, int64_t i) {
  int64_t lo = 0, hi = num_streams;  // seg_in[lo] <= i < seg_in[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (seg_in[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

__global__ void remap_kernel(const int64_t* ids, const int64_t* spec, int64_t num_streams,
                             const int64_t* feat_off, const int64_t* seg_in,
                             const int64_t* seg_out, DeviceTables t, int64_t* values,
                             int64_t* bad, int64_t total) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t s = find_stream(seg_in, num_streams, i);
  const int64_t* row = spec + s * kSpecCols;
  const int64_t j = i - seg_in[s];
  const int64_t x = ids[feat_off[row[kFeature]] + j];
  const int64_t kind = row[kKind], rows = row[kRows], offset = row[kOffset];
  int64_t* out = values + seg_out[s];
  switch (kind) {
    case kIdentity:
      if (x < 0 || x >= rows) atomicCAS(reinterpret_cast<unsigned long long*>(bad), 0ULL, 1ULL);
      out[j] = x + offset;
      break;
    case kHash:
      out[j] = hash_id(x, row[kKey], rows) + offset;
      break;
    case kQRQuotient:
    case kQRRemainder: {
      const int64_t y = floor_mod(x, row[kNumIds]);
      out[j] = (kind == kQRQuotient ? y / rows : y % rows) + offset;
      break;
    }
    case kCCEPair: {
      const int64_t col = row[kColumn];
      const int64_t qa = row[kQRMul];  // init="qr" (0: hashed init)
      const int64_t xq = qa != 0 ? qr_permute(x, qa, row[kQRAdd], row[kNumIds]) : 0;
      int64_t p;
      if (row[kPre] >= 0) {
        p = t.pre[row[kPre]][j * t.pre_stride[row[kPre]] + col];
      } else {
        const int64_t a = row[kAssign], local = x - row[kAssignLo];
        if (a >= 0 && local >= 0 && local < row[kAssignCount]) {
          p = packed_entry(t.assign[a], t.assign_words[a], local, row[kChunks], col, row[kBits]);
        } else {
          p = qa != 0 ? (xq / rows) % rows : hash_id(x, row[kKey], rows);
        }
      }
      const int64_t gen = row[kGen] >= 0 ? *t.gens[row[kGen]] : 1;
      const int64_t hkey = row[kGen] >= 0 ? combine_key(row[kHKey], gen) : row[kHKey];
      const bool remainder_h = qa != 0 && (row[kKeepRemainder] != 0 || gen == 0);
      out[2 * j] = p + offset;
      out[2 * j + 1] = rows + (remainder_h ? xq % rows : hash_id(x, hkey, rows)) + offset;
      break;
    }
    default:
      break;
  }
}

template <typename scalar_t>
__global__ void weights_kernel(const scalar_t* w, const int64_t* spec, int64_t num_streams,
                               const int64_t* feat_off, const int64_t* seg_in,
                               const int64_t* seg_out, scalar_t* out, int64_t total) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t s = find_stream(seg_in, num_streams, i);
  const int64_t* row = spec + s * kSpecCols;
  const int64_t j = i - seg_in[s];
  const int64_t k = values_per_id(row[kKind]);
  const scalar_t v = w[feat_off[row[kFeature]] + j];
  for (int64_t r = 0; r < k; ++r) out[seg_out[s] + j * k + r] = v;
}

template <typename scalar_t>
__global__ void weight_grad_kernel(const scalar_t* g, const int64_t* spec, int64_t num_streams,
                                   const int64_t* feat_off, const int64_t* seg_in,
                                   const int64_t* seg_out, float* out, int64_t total) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t s = find_stream(seg_in, num_streams, i);
  const int64_t* row = spec + s * kSpecCols;
  const int64_t j = i - seg_in[s];
  const int64_t k = values_per_id(row[kKind]);
  float acc = 0;
  for (int64_t r = 0; r < k; ++r) acc += static_cast<float>(g[seg_out[s] + j * k + r]);
  atomicAdd(out + feat_off[row[kFeature]] + j, acc);
}

// One thread per (stream, id) pair: launches ``kernel`` over ``total`` threads (none if 0).
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t total, Args... args) {
  if (total <= 0) return;
  const int blocks = static_cast<int>((total + kThreads - 1) / kThreads);
  kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args..., total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaLayout {
  at::Tensor spec, feat_off, seg_in, seg_out;  // on the device
  std::vector<int64_t> host_seg_in, host_seg_out;
};

CudaLayout cuda_layout(const at::Tensor& lengths, int64_t batch, const at::Tensor& spec_cpu) {
  const int64_t S = spec_cpu.size(0);
  const int64_t F = batch > 0 ? lengths.numel() / batch : 0;
  at::Tensor counts = lengths.view({F, batch}).sum(1).to(at::kLong).cpu();  // one sync
  std::vector<int64_t> feat(F + 1, 0);
  for (int64_t f = 0; f < F; ++f) feat[f + 1] = feat[f] + counts[f].item<int64_t>();
  CudaLayout l;
  l.host_seg_in.assign(S + 1, 0);
  l.host_seg_out.assign(S + 1, 0);
  const int64_t* sp = spec_cpu.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t f = sp[s * kSpecCols + kFeature];
    TORCH_CHECK(f >= 0 && f < F, "torchrec_cce::remap: stream ", s, " reads a missing feature");
    const int64_t n = feat[f + 1] - feat[f];
    l.host_seg_in[s + 1] = l.host_seg_in[s] + n;
    l.host_seg_out[s + 1] = l.host_seg_out[s] + values_per_id(sp[s * kSpecCols + kKind]) * n;
  }
  auto opts = lengths.options().dtype(at::kLong);
  auto to_dev = [&](const std::vector<int64_t>& v) {
    return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(opts.device(), true);
  };
  l.spec = spec_cpu.to(opts.device(), true);
  l.feat_off = to_dev(feat);
  l.seg_in = to_dev(l.host_seg_in);
  l.seg_out = to_dev(l.host_seg_out);
  return l;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> remap_cuda(
    const at::Tensor& ids_in, const at::Tensor& lengths_in,
    const c10::optional<at::Tensor>& weights_in, int64_t batch, const at::Tensor& spec_in,
    at::TensorList generations, at::TensorList assignments, at::TensorList precomputed) {
  c10::cuda::CUDAGuard guard(ids_in.device());
  TORCH_CHECK(ids_in.scalar_type() == at::kLong, "torchrec_cce::remap: ids must be int64");
  TORCH_CHECK(assignments.size() <= kMaxTables && precomputed.size() <= kMaxTables &&
                  generations.size() <= kMaxTables,
              "torchrec_cce::remap (CUDA): at most ", kMaxTables, " CCE tables per call");
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const at::Tensor spec_cpu = spec_in.to(at::kCPU, at::kLong).contiguous();
  const int64_t S = spec_cpu.size(0);
  CudaLayout l = cuda_layout(lengths, batch, spec_cpu);
  DeviceTables t{};
  std::vector<at::Tensor> keep;
  for (size_t i = 0; i < assignments.size(); ++i) {
    TORCH_CHECK(assignments[i].dim() == 1 && assignments[i].scalar_type() == at::kInt,
                "torchrec_cce::remap: a packed assignment must be a 1-D int32 tensor");
    at::Tensor a = assignments[i].to(ids.device()).contiguous();
    keep.push_back(a);
    t.assign[i] = a.data_ptr<int32_t>();
    t.assign_words[i] = a.numel();
  }
  const int64_t* spec_host = spec_cpu.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t* row = spec_host + s * kSpecCols;
    TORCH_CHECK(row[kAssign] < static_cast<int64_t>(assignments.size()),
                "torchrec_cce::remap: bad assignment index in stream ", s);
    if (row[kKind] == kCCEPair && row[kAssign] >= 0) {
      TORCH_CHECK(row[kBits] >= 0 && row[kBits] < 32 && row[kChunks] > 0 &&
                      row[kColumn] >= 0 && row[kColumn] < row[kChunks] &&
                      t.assign_words[row[kAssign]] >=
                          packed_num_words(row[kAssignCount], row[kChunks], row[kBits]),
                  "torchrec_cce::remap: bad packed assignment layout in stream ", s);
    }
  }
  for (size_t i = 0; i < precomputed.size(); ++i) {
    at::Tensor p = precomputed[i].to(ids.device(), at::kLong).contiguous();  // host p too
    keep.push_back(p);
    t.pre[i] = p.data_ptr<int64_t>();
    t.pre_stride[i] = p.size(1);
  }
  for (size_t i = 0; i < generations.size(); ++i) {
    at::Tensor g = generations[i].to(ids.device(), at::kLong).contiguous();
    keep.push_back(g);
    t.gens[i] = g.data_ptr<int64_t>();
  }
  const int64_t total = l.host_seg_in[S];
  at::Tensor values = at::empty({l.host_seg_out[S]}, ids.options());
  at::Tensor bad = at::zeros({1}, ids.options());
  launch(remap_kernel, total, ids.data_ptr<int64_t>(), l.spec.data_ptr<int64_t>(), S,
         l.feat_off.data_ptr<int64_t>(), l.seg_in.data_ptr<int64_t>(),
         l.seg_out.data_ptr<int64_t>(), t, values.data_ptr<int64_t>(), bad.data_ptr<int64_t>());
  // Output lengths: k_s * the stream's feature lengths (torch ops on the device).
  std::vector<at::Tensor> parts;
  at::Tensor lens2d = lengths.view({-1, batch});
  const int64_t* sp = spec_cpu.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    parts.push_back(lens2d[sp[s * kSpecCols + kFeature]] *
                    values_per_id(sp[s * kSpecCols + kKind]));
  }
  at::Tensor out_lengths = S > 0 ? at::cat(parts) : at::empty({0}, lengths.options());
  TORCH_CHECK(bad.item<int64_t>() == 0,
              "torchrec_cce::remap: an id is outside [0, num_embeddings) of a full table");
  at::Tensor out_weights = at::empty({0}, at::TensorOptions().dtype(at::kFloat).device(ids.device()));
  if (weights_in.has_value() && weights_in->defined()) {
    const at::Tensor w = weights_in->contiguous();
    out_weights = at::empty({l.host_seg_out[S]}, w.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(),
                                    "torchrec_cce_remap_weights_cuda", [&] {
      launch(weights_kernel<scalar_t>, total, w.data_ptr<scalar_t>(),
             l.spec.data_ptr<int64_t>(), S, l.feat_off.data_ptr<int64_t>(),
             l.seg_in.data_ptr<int64_t>(), l.seg_out.data_ptr<int64_t>(),
             out_weights.data_ptr<scalar_t>());
    });
  }
  return {values, out_lengths, out_weights};
}

at::Tensor remap_weight_grad_cuda(const at::Tensor& grad_in, const at::Tensor& lengths_in,
                                  int64_t batch, const at::Tensor& spec_in, int64_t num_ids) {
  c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor spec_cpu = spec_in.to(at::kCPU, at::kLong).contiguous();
  const int64_t S = spec_cpu.size(0);
  CudaLayout l = cuda_layout(lengths_in.contiguous(), batch, spec_cpu);
  const int64_t total = l.host_seg_in[S];
  at::Tensor out = at::zeros({num_ids}, grad.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "torchrec_cce_remap_grad_cuda", [&] {
    launch(weight_grad_kernel<scalar_t>, total, grad.data_ptr<scalar_t>(),
           l.spec.data_ptr<int64_t>(), S, l.feat_off.data_ptr<int64_t>(),
           l.seg_in.data_ptr<int64_t>(), l.seg_out.data_ptr<int64_t>(), out.data_ptr<float>());
  });
  return out.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_cce, CUDA, m) {
  m.impl("remap", &remap_cuda);
  m.impl("remap_weight_grad", &remap_weight_grad_cuda);
}

}  // namespace torchrec_cce
