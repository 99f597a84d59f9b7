// CPU kernel of ecp::gram: H = sum_s w_s [a_s; 1] [b_s; 1]^T, the constant 1 last (METHOD.md,
// "compensation by reconstruction").
//
// One pass over the samples in bounded chunks. For each chunk at::parallel_for writes
//   left = [w_s a_s | w_s]                                     (rows x (in_a + 1))
// into a small reusable buffer, then one GEMM  H[:, :in_b] += left^T b_chunk  accumulates the chunk
// on ATen's BLAS, reading b (or a, when b is None) in place whenever BLAS can (same dtype as the
// sums, samples viewable as one dimension; otherwise its rows are copied into a second buffer). The
// column of ones in left makes its last row the weighted column sums of b, and the last column of H
// is left^T 1, the column sums of left. Nothing of size (N, in) is ever allocated.
//
// With b = None, H is symmetric, so only the upper part of each block row of H is multiplied (one
// GEMM per block row) and the lower triangle is mirrored at the end: about 5/8 of the
// multiplications of a full GEMM for in = 1024.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>

#include "checks.h"
#include "ecp_cpu.h"

namespace ecp_fast {
namespace {

using detail::all_finite;
using detail::check_floating;
using detail::check_same_device;
using detail::check_samples_matrix;
using detail::padded_row;
using detail::result_type;
using detail::sample_count;
using detail::SampleOffsets;
using detail::shape_string;
using detail::with_float64_rescue;

// Bytes of the per-chunk buffers together: bounds the extra memory independently of N, and large
// enough that each GEMM has a deep contraction (the read-modify-write of H is paid per chunk).
constexpr int64_t kChunkBytes = 16 << 20;
constexpr int64_t kMinChunkRows = 256;
constexpr int64_t kMaxChunkRows = 8192;
// Columns per block row of a symmetric H: narrow enough to skip most of the lower triangle, wide
// enough that every block GEMM still runs at full speed.
constexpr int64_t kSymmetricBlock = 256;

struct GramShape {
  int64_t n, in_a, in_b;
};

// Mirrors ecp_fast/ops/_checks.py check_gram_inputs, message for message and in the same order.
GramShape check_gram_inputs(const char* op, const at::Tensor& a, const std::optional<at::Tensor>& b,
                            const std::optional<at::Tensor>& weight) {
  check_floating(op, "a", a);
  if (b.has_value()) check_floating(op, "b", *b);
  if (weight.has_value()) check_floating(op, "weight", *weight);
  if (b.has_value()) check_same_device(op, "a", a, "b", *b);
  if (weight.has_value()) check_same_device(op, "a", a, "weight", *weight);
  check_samples_matrix(op, "a", a);
  GramShape shape{sample_count(a), a.size(-1), a.size(-1)};
  if (b.has_value()) {
    check_samples_matrix(op, "b", *b);
    TORCH_CHECK_VALUE(sample_count(*b) == shape.n, op, ": argument 'b' must have N = ", shape.n,
                      " samples (the product of its leading dimensions) to match 'a' of shape ",
                      shape_string(a.sizes()), ", got shape ", shape_string(b->sizes()));
    shape.in_b = b->size(-1);
  }
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == shape.n, op,
                      ": argument 'weight' must have shape (N,) = (", shape.n, ",) to match 'a' of shape ",
                      shape_string(a.sizes()), ", got shape ", shape_string(weight->sizes()));
  }
  return shape;
}

// Buffer rows r in [begin, end) = [w_s t_s | w_s] of sample s = start + r (w_s = 1 when `weight`
// is null), or just w_s t_s without `ones_column`. Runs inside the chunk's parallel region.
template <typename in_t, typename acc_t>
void fill_samples(const at::Tensor& t, const SampleOffsets& offsets, const acc_t* weight, bool ones_column,
                  int64_t start, int64_t begin, int64_t end, acc_t* buffer, int64_t ld) {
  const in_t* data = t.const_data_ptr<in_t>();
  const int64_t columns = t.size(-1), col_stride = t.stride(-1);
  for (int64_t r = begin; r < end; ++r) {
    const in_t* row = data + offsets(start + r);
    acc_t* out = buffer + r * ld;
    const acc_t w = weight != nullptr ? weight[start + r] : acc_t(1);
    if (weight == nullptr && col_stride == 1) {
      for (int64_t j = 0; j < columns; ++j) out[j] = static_cast<acc_t>(row[j]);
    } else if (col_stride == 1) {
      for (int64_t j = 0; j < columns; ++j) out[j] = w * static_cast<acc_t>(row[j]);
    } else {
      for (int64_t j = 0; j < columns; ++j) out[j] = w * static_cast<acc_t>(row[j * col_stride]);
    }
    if (ones_column) out[columns] = w;
  }
}

template <typename acc_t>
void fill_rows(const at::Tensor& t, const SampleOffsets& offsets, const acc_t* weight, bool ones_column,
               int64_t start, int64_t begin, int64_t end, acc_t* buffer, int64_t ld) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "ecp_gram_fill", [&] {
    fill_samples<scalar_t, acc_t>(t, offsets, weight, ones_column, start, begin, end, buffer, ld);
  });
}

// H[r, c] = H[c, r] for c < r, in cache-sized tiles: completes a symmetric H from its upper part.
template <typename acc_t>
void mirror_upper(acc_t* h, int64_t size, int64_t ld) {
  constexpr int64_t kTile = 64;
  at::parallel_for(0, (size + kTile - 1) / kTile, 1, [&](int64_t tile_begin, int64_t tile_end) {
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t row0 = tile * kTile, row1 = std::min(size, row0 + kTile);
      for (int64_t col0 = 0; col0 < row1; col0 += kTile) {
        const int64_t col1 = std::min(size, col0 + kTile);
        for (int64_t r = row0; r < row1; ++r)
          for (int64_t c = col0; c < std::min(col1, r); ++c) h[r * ld + c] = h[c * ld + r];
      }
    }
  });
}

// H[:, :in_b] (+)= left^T right and H[:, in_b] (+)= the column sums of left, where left = [w a | w]
// (rows x in_a + 1) and right = b (rows x in_b): the last column of H is left^T 1, so right never
// needs its column of ones. beta = 0 overwrites. Symmetric H: only the upper part of each block row
// is multiplied; mirror_upper fills in the rest at the end.
void accumulate(at::Tensor& h, const at::Tensor& left, const at::Tensor& right, bool symmetric, int beta) {
  const int64_t in_b = right.size(1);
  at::Tensor last_column = h.select(1, in_b);
  at::Tensor column_sums = left.sum(0);
  beta == 0 ? last_column.copy_(column_sums) : last_column.add_(column_sums);
  if (!symmetric) {
    h.narrow(1, 0, in_b).addmm_(left.t(), right, beta, 1);
    return;
  }
  for (int64_t row = 0; row < in_b; row += kSymmetricBlock) {
    const int64_t rows = std::min(kSymmetricBlock, h.size(0) - row);
    at::Tensor block = h.narrow(0, row, rows).narrow(1, row, in_b - row);
    block.addmm_(left.narrow(1, row, rows).t(), right.narrow(1, row, in_b - row), beta, 1);
  }
}

// Rows per chunk: at most max_rows, and the chunks of one pass equally long, so that N = 4096 with
// room for 4032 rows makes two chunks of 2048 instead of a full one and a 64-row GEMM.
int64_t balanced_chunk(int64_t n, int64_t max_rows) {
  if (n <= 0) return 1;
  const int64_t chunks = (n + max_rows - 1) / max_rows;
  return (n + chunks - 1) / chunks;
}

// `t` as an (n, in) matrix the GEMM can read in place (same dtype as the sums, samples viewable as
// one dimension), or an undefined tensor when its rows must be copied into a buffer first.
at::Tensor direct_matrix(const at::Tensor& t, int64_t n, at::ScalarType acc_type) {
  if (t.scalar_type() != acc_type) return {};
  if (t.dim() == 2) return t;
  return t.is_contiguous() ? t.view({n, t.size(-1)}) : at::Tensor();
}

template <typename acc_t>
void gram_pass(const at::Tensor& a, const std::optional<at::Tensor>& b,
               const std::optional<at::Tensor>& weight, const GramShape& shape, at::Tensor& h) {
  const auto acc_type = h.scalar_type();
  const auto options = a.options().dtype(acc_type);
  const at::Tensor& right_source = b.has_value() ? *b : a;
  const bool symmetric = !b.has_value();
  // The right factor is read in place whenever BLAS can; only [w a | w] is always written.
  const at::Tensor right_direct = direct_matrix(right_source, shape.n, acc_type);
  const bool copy_right = !right_direct.defined();
  const int64_t cols_a = shape.in_a + 1;
  const int64_t ld_a = padded_row(cols_a), ld_b = padded_row(shape.in_b);
  const int64_t row_bytes = (ld_a + (copy_right ? ld_b : 0)) * static_cast<int64_t>(sizeof(acc_t));
  const int64_t chunk =
      balanced_chunk(shape.n, std::clamp(kChunkBytes / row_bytes, kMinChunkRows, kMaxChunkRows));
  // (N,) weights in the accumulation type: small next to the inputs, and read once per row.
  const at::Tensor w = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  const acc_t* w_data = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
  at::Tensor left_buffer = at::empty({chunk, ld_a}, options);
  at::Tensor right_buffer = copy_right ? at::empty({chunk, ld_b}, options) : at::Tensor();
  acc_t* left_data = left_buffer.mutable_data_ptr<acc_t>();
  acc_t* right_data = copy_right ? right_buffer.mutable_data_ptr<acc_t>() : nullptr;
  // The sums go to rows padded to whole cache lines: BLAS writes an (in + 1)-wide H with odd row
  // starts about 15% slower. H gets a copy at the end.
  at::Tensor acc = at::empty({cols_a, padded_row(shape.in_b + 1)}, options);
  const SampleOffsets offsets_a(a), offsets_b(right_source);
  const int64_t grain = std::max<int64_t>(1, 16384 / (cols_a + (copy_right ? shape.in_b : 0)));
  for (int64_t start = 0; start < shape.n; start += chunk) {
    const int64_t rows = std::min(chunk, shape.n - start);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      fill_rows<acc_t>(a, offsets_a, w_data, true, start, begin, end, left_data, ld_a);
      if (copy_right)
        fill_rows<acc_t>(right_source, offsets_b, nullptr, false, start, begin, end, right_data, ld_b);
    });
    const at::Tensor left = left_buffer.narrow(0, 0, rows).narrow(1, 0, cols_a);
    const at::Tensor right = copy_right ? right_buffer.narrow(0, 0, rows).narrow(1, 0, shape.in_b)
                                        : right_direct.narrow(0, start, rows);
    accumulate(acc, left, right, symmetric, start == 0 ? 0 : 1);
  }
  if (symmetric) mirror_upper<acc_t>(acc.mutable_data_ptr<acc_t>(), cols_a, acc.stride(0));
  h.copy_(acc.narrow(1, 0, shape.in_b + 1));
}

at::Tensor gram_in(const at::Tensor& a, const std::optional<at::Tensor>& b,
                   const std::optional<at::Tensor>& weight, const GramShape& shape, at::ScalarType type) {
  at::Tensor h = at::zeros({shape.in_a + 1, shape.in_b + 1}, a.options().dtype(type));
  if (shape.n == 0) return h;  // no samples: an empty sum
  AT_DISPATCH_FLOATING_TYPES(type, "ecp_gram", [&] { gram_pass<scalar_t>(a, b, weight, shape, h); });
  return h;
}

}  // namespace

at::Tensor gram_cpu(const at::Tensor& a, const std::optional<at::Tensor>& b,
                    const std::optional<at::Tensor>& weight, bool float64) {
  const auto shape = check_gram_inputs("ecp.gram", a, b, weight);
  at::ScalarType type = result_type({a, b.value_or(at::Tensor()), weight.value_or(at::Tensor())});
  if (float64) type = at::kDouble;
  auto result = with_float64_rescue<std::tuple<at::Tensor>>(
      type, [&](at::ScalarType t) { return std::make_tuple(gram_in(a, b, weight, shape, t)); },
      [](const std::tuple<at::Tensor>& r) { return all_finite({std::get<0>(r)}); });
  return std::get<0>(result);
}

}  // namespace ecp_fast
