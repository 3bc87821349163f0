// torchrec_cce::pair_compose: the compose stage of a collection whose tables concatenate their
// pooled streams or combine two of them element-wise (QR-mult, QR-add), in one pass. The plan
// is a list of segments (out, a, b, c, n) of n contiguous columns:
//
//   out[:, out + k] = x[:, a + k] * (b >= 0 ? x[:, b + k] : 1) + (c >= 0 ? x[:, c + k] : 0)
//
// Every input column feeds at most one output column (checked on the Python side), so the
// backward pass writes each input-gradient column once: exact, no accumulation order. (ATen's
// per-feature ops, or index_select over columns and its index_add backward, cost several times
// more on CPU.)
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

namespace torchrec_cce {
namespace {

enum Seg { kOut = 0, kA = 1, kB = 2, kC = 3, kN = 4, kSegCols = 5 };

void check(const at::Tensor& x, const at::Tensor& segments) {
  TORCH_CHECK(x.dim() == 2 && x.dtype() == at::kFloat,
              "torchrec_cce::pair_compose: x must be a 2-D float32 tensor");
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == kSegCols &&
                  segments.dtype() == at::kLong && segments.is_contiguous(),
              "torchrec_cce::pair_compose: segments must be contiguous int64 [n, 5]");
}

at::Tensor pair_compose_cpu(const at::Tensor& x_in, const at::Tensor& segments,
                            int64_t out_cols) {
  check(x_in, segments);
  auto x = x_in.contiguous();
  const int64_t rows = x.size(0), in_cols = x.size(1), n_seg = segments.size(0);
  auto out = at::empty({rows, out_cols}, x.options());
  const float* xp = x.data_ptr<float>();
  const int64_t* sp = segments.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * in_cols;
      float* orow = op + r * out_cols;
      for (int64_t s = 0; s < n_seg; ++s) {
        const int64_t* seg = sp + s * kSegCols;
        float* __restrict__ o = orow + seg[kOut];
        const float* __restrict__ a = xr + seg[kA];
        const int64_t n = seg[kN];
        if (seg[kB] >= 0) {
          const float* __restrict__ b = xr + seg[kB];
          for (int64_t k = 0; k < n; ++k) o[k] = a[k] * b[k];
        } else {
          for (int64_t k = 0; k < n; ++k) o[k] = a[k];
        }
        if (seg[kC] >= 0) {
          const float* __restrict__ c = xr + seg[kC];
          for (int64_t k = 0; k < n; ++k) o[k] += c[k];
        }
      }
    }
  });
  return out;
}

at::Tensor pair_compose_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                     const at::Tensor& segments, bool every_column_used) {
  check(x_in, segments);
  auto x = x_in.contiguous();
  auto grad = grad_in.to(at::kFloat);
  // Any row stride is read in place (0: the expanded gradient of a sum); columns contiguous.
  if (grad.stride(1) != 1 && grad.size(1) > 1) grad = grad.contiguous();
  const int64_t rows = x.size(0), in_cols = x.size(1), n_seg = segments.size(0);
  const int64_t g_stride = grad.stride(0);
  // Columns no output reads get a zero gradient; when there are none, nothing to clear.
  auto grad_x = every_column_used ? at::empty_like(x) : at::zeros_like(x);
  const float *xp = x.data_ptr<float>(), *gp = grad.data_ptr<float>();
  const int64_t* sp = segments.data_ptr<int64_t>();
  float* gxp = grad_x.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * in_cols;
      const float* grow = gp + r * g_stride;
      float* gxr = gxp + r * in_cols;
      for (int64_t s = 0; s < n_seg; ++s) {
        const int64_t* seg = sp + s * kSegCols;
        const float* __restrict__ g = grow + seg[kOut];
        const int64_t n = seg[kN];
        float* __restrict__ ga = gxr + seg[kA];
        if (seg[kB] >= 0) {
          float* __restrict__ gb = gxr + seg[kB];
          const float* __restrict__ a = xr + seg[kA];
          const float* __restrict__ b = xr + seg[kB];
          for (int64_t k = 0; k < n; ++k) {
            ga[k] = g[k] * b[k];
            gb[k] = g[k] * a[k];
          }
        } else {
          for (int64_t k = 0; k < n; ++k) ga[k] = g[k];
        }
        if (seg[kC] >= 0) {
          float* __restrict__ gc = gxr + seg[kC];
          for (int64_t k = 0; k < n; ++k) gc[k] = g[k];
        }
      }
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchrec_cce, m) {
  m.def("pair_compose(Tensor x, Tensor segments, int out_cols) -> Tensor");
  m.def(
      "pair_compose_backward(Tensor grad, Tensor x, Tensor segments, bool every_column_used) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(torchrec_cce, CPU, m) {
  m.impl("pair_compose", &pair_compose_cpu);
  m.impl("pair_compose_backward", &pair_compose_backward_cpu);
}

}  // namespace torchrec_cce
