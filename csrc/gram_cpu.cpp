// CPU kernel of ecp::gram: H = sum_s w_s [a_s; 1] [b_s; 1]^T, the constant 1 last (docs/method.md,
// "compensation by reconstruction").
//
// One pass over the samples in bounded chunks. For each chunk
//   left = [w_s a_s | w_s]                                     (rows x (in_a + 1))
// is written into a small reusable buffer, then one GEMM  H[:, :in_b] += left^T b_chunk  accumulates
// the chunk on ATen's BLAS, reading b (or a, when b is None) in place whenever BLAS can (same dtype
// as the sums, samples viewable as one dimension; otherwise its rows are copied into a second
// buffer). The column of ones in left makes its last row the weighted column sums of b; the last
// column of H, left^T 1, is summed while the buffer is filled. Nothing of size (N, in) is allocated.
//
// With b = None, H is symmetric, so only the upper part of each block row of H is multiplied (one
// GEMM per block row) and the lower triangle is mirrored at the end: about 5/8 of the
// multiplications of a full GEMM for in = 1024.
//
// Threads: each takes every workers-th chunk and accumulates them into its own H (serial fill,
// single-threaded GEMMs), all inside one parallel region, and the private H are added at the end in
// worker order. The schedule is fixed, never taken from a shared counter, so H is the same bits on
// every run with the same thread count (a counter balanced a busy machine better, but made the sums
// depend on which thread got which chunk).
// On a busy machine each parallel region waits for its slowest thread, so this keeps the op within a
// few percent of one torch.mm where a parallel fill and parallel GEMMs per chunk lost 20-50%. When
// the private H would not fit kPrivateSumsBytes (wide layers, many threads) or there are too few
// samples, the threads share one H, with a parallel fill and parallel GEMMs instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

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
// Bytes of the threads' private sums together (one H each): below it, each thread accumulates its
// own chunks (see gram_pass); above it (wide layers, many threads) the threads share one H.
constexpr int64_t kPrivateSumsBytes = 64 << 20;

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
// is null), added into `sums` (the thread's column sums); just w_s t_s when `sums` is null. Runs
// inside the chunk's parallel region.
template <typename in_t, typename acc_t>
void fill_samples(const at::Tensor& t, const SampleOffsets& offsets, const acc_t* weight, acc_t* sums,
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
    if (sums != nullptr) {
      out[columns] = w;
      for (int64_t j = 0; j <= columns; ++j) sums[j] += out[j];
    }
  }
}

template <typename acc_t>
void fill_rows(const at::Tensor& t, const SampleOffsets& offsets, const acc_t* weight, acc_t* sums,
               int64_t start, int64_t begin, int64_t end, acc_t* buffer, int64_t ld) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "ecp_gram_fill", [&] {
    fill_samples<scalar_t, acc_t>(t, offsets, weight, sums, start, begin, end, buffer, ld);
  });
}

// H[r, c] = H[c, r] for c < r, in cache-sized tiles: completes a symmetric H from its upper part.
template <typename acc_t>
void mirror_upper(acc_t* h, int64_t size, int64_t ld) {
  constexpr int64_t kTile = 64;
  // Up to 2048 columns in one go: a parallel region costs more than the copy on a busy machine.
  at::parallel_for(0, (size + kTile - 1) / kTile, 32, [&](int64_t tile_begin, int64_t tile_end) {
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

// H[:, :in_b] (+)= left^T right, where left = [w a | w] (rows x in_a + 1) and right = b (rows x
// in_b); beta = 0 overwrites. The last column of H, left^T 1, comes from the fills' column sums, so
// right never needs a column of ones. Symmetric H: only the upper part of each block row is
// multiplied; mirror_upper fills in the rest at the end.
void accumulate(at::Tensor& h, const at::Tensor& left, const at::Tensor& right, bool symmetric, int beta) {
  const int64_t in_b = right.size(1);
  if (!symmetric) {
    h.narrow(1, 0, in_b).addmm_(left.t(), right, beta, 1);
    return;
  }
  // Block rows of about kSymmetricBlock, equally tall (whole cache lines), so no sliver of a GEMM
  // is left at the end (in = 784 makes three blocks of 272 rows, not 256, 256, 256 and 17).
  const int64_t size = h.size(0);
  const int64_t blocks = std::max<int64_t>(1, (in_b + kSymmetricBlock / 2) / kSymmetricBlock);
  const int64_t block_rows = ((size + blocks - 1) / blocks + 15) / 16 * 16;
  for (int64_t row = 0; row < in_b; row += block_rows) {
    const int64_t rows = std::min(block_rows, size - row);
    at::Tensor block = h.narrow(0, row, rows).narrow(1, row, in_b - row);
    block.addmm_(left.narrow(1, row, rows).t(), right.narrow(1, row, in_b - row), beta, 1);
  }
}

// Calls fill(begin, end, slot) over [0, rows) in blocks of `grain` rows, block k going to slot
// k mod slots (slots = the thread count): a fixed schedule, so each slot's partial sums, and their
// total in slot order, are the same bits on every run whichever thread runs which slot. (A shared
// counter balanced a busy machine better, but made the sums depend on the timing.)
template <typename F>
void parallel_rows(int64_t rows, int64_t grain, const F& fill) {
  const int64_t slots = at::get_num_threads();
  if (rows <= grain || slots == 1 || at::in_parallel_region()) {
    fill(0, rows, 0);
    return;
  }
  at::parallel_for(0, slots, 1, [&](int64_t first, int64_t last) {
    for (int64_t slot = first; slot < last; ++slot)
      for (int64_t begin = slot * grain; begin < rows; begin += slots * grain)
        fill(begin, std::min(rows, begin + grain), slot);
  });
}

// totals[j] += sum over rows of per_thread[:, j] (a few rows of cols_a: serial).
template <typename acc_t>
void add_rows(const at::Tensor& per_thread, std::vector<acc_t>& totals) {
  const acc_t* data = per_thread.const_data_ptr<acc_t>();
  const int64_t columns = per_thread.size(1);
  for (int64_t t = 0; t < per_thread.size(0); ++t)
    for (int64_t j = 0; j < columns; ++j) totals[j] += data[t * columns + j];
}

// `t` as an (n, in) matrix the GEMM can read in place (same dtype as the sums, samples viewable as
// one dimension), or an undefined tensor when its rows must be copied into a buffer first.
at::Tensor direct_matrix(const at::Tensor& t, int64_t n, at::ScalarType acc_type) {
  if (t.scalar_type() != acc_type) return {};
  if (t.dim() == 2) return t;
  return t.is_contiguous() ? t.view({n, t.size(-1)}) : at::Tensor();
}

// How one pass splits the work, decided once per call.
struct GramPlan {
  at::Tensor right_direct;  // b (or a) read in place by the GEMM, or undefined: copied per chunk
  bool symmetric;           // b is None: multiply the upper block triangle only
  int64_t cols_a, ld_a, ld_b, ld_acc;
  int64_t chunk;    // samples per chunk
  int64_t workers;  // private accumulators, one per thread, or 1 (then fills and GEMMs are parallel)
  int64_t grain;    // rows per block of a parallel fill
};

GramPlan make_plan(const at::Tensor& a, const std::optional<at::Tensor>& b, const GramShape& shape,
                   at::ScalarType acc_type) {
  GramPlan plan;
  plan.right_direct = direct_matrix(b.has_value() ? *b : a, shape.n, acc_type);
  plan.symmetric = !b.has_value();
  const bool copy_right = !plan.right_direct.defined();
  plan.cols_a = shape.in_a + 1;
  plan.ld_a = padded_row(plan.cols_a);
  plan.ld_b = padded_row(shape.in_b);
  plan.ld_acc = padded_row(shape.in_b + 1);
  const int64_t element = static_cast<int64_t>(c10::elementSize(acc_type));
  const int64_t row_bytes = (plan.ld_a + (copy_right ? plan.ld_b : 0)) * element;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const bool private_sums = threads > 1 &&
                            threads * plan.cols_a * plan.ld_acc * element <= kPrivateSumsBytes &&
                            shape.n >= threads * kMinChunkRows;
  plan.workers = private_sums ? threads : 1;
  const int64_t max_rows = std::clamp(kChunkBytes / (plan.workers * row_bytes), kMinChunkRows, kMaxChunkRows);
  // Equal chunks, a multiple of the workers in number: N = 4096 with room for 4032 rows makes two
  // chunks of 2048 rather than a full one and a 64-row GEMM, and no worker waits for a last chunk.
  int64_t chunks = (shape.n + max_rows - 1) / max_rows;
  chunks = (chunks + plan.workers - 1) / plan.workers * plan.workers;
  plan.chunk = (shape.n + chunks - 1) / chunks;
  plan.grain = std::max<int64_t>(1, 16384 / (plan.cols_a + (copy_right ? shape.in_b : 0)));
  return plan;
}

// One worker's buffers and sums: it accumulates its chunks of samples into its own H, so the threads
// of a worker pool never wait for each other until the end.
template <typename acc_t>
struct Worker {
  at::Tensor left, right, acc;  // [w a | w] and b rows (chunk x ld), sums (in_a + 1 x ld_acc)
  at::Tensor thread_sums;       // column sums of left per thread of a parallel fill
  std::vector<acc_t> column_sums;
  bool used = false;

  Worker(const GramPlan& plan, const at::TensorOptions& options)
      : left(at::empty({plan.chunk, plan.ld_a}, options)),
        right(plan.right_direct.defined() ? at::Tensor() : at::empty({plan.chunk, plan.ld_b}, options)),
        acc(at::empty({plan.cols_a, plan.ld_acc}, options)),
        thread_sums(at::empty({at::get_num_threads(), plan.cols_a}, options)),
        column_sums(plan.cols_a, acc_t(0)) {}
};

// Accumulates chunks index, index + workers, ... into `worker` (a fixed schedule: the same sums on
// every run).
template <typename acc_t>
void run_worker(Worker<acc_t>& worker, int64_t index, const GramPlan& plan, const at::Tensor& a,
                const at::Tensor& right_source, const acc_t* w_data, const GramShape& shape) {
  const SampleOffsets offsets_a(a), offsets_b(right_source);
  acc_t* left_data = worker.left.template mutable_data_ptr<acc_t>();
  acc_t* right_data = worker.right.defined() ? worker.right.template mutable_data_ptr<acc_t>() : nullptr;
  acc_t* thread_sums = worker.thread_sums.template mutable_data_ptr<acc_t>();
  for (int64_t start = index * plan.chunk; start < shape.n; start += plan.workers * plan.chunk) {
    const int64_t rows = std::min(plan.chunk, shape.n - start);
    std::fill(thread_sums, thread_sums + worker.thread_sums.numel(), acc_t(0));
    parallel_rows(rows, plan.grain, [&](int64_t begin, int64_t end, int64_t slot) {
      acc_t* sums = thread_sums + slot * plan.cols_a;
      fill_rows<acc_t>(a, offsets_a, w_data, sums, start, begin, end, left_data, plan.ld_a);
      if (right_data != nullptr)
        fill_rows<acc_t>(right_source, offsets_b, nullptr, nullptr, start, begin, end, right_data, plan.ld_b);
    });
    add_rows(worker.thread_sums, worker.column_sums);
    const at::Tensor left = worker.left.narrow(0, 0, rows).narrow(1, 0, plan.cols_a);
    const at::Tensor right = right_data != nullptr ? worker.right.narrow(0, 0, rows).narrow(1, 0, shape.in_b)
                                                   : plan.right_direct.narrow(0, start, rows);
    accumulate(worker.acc, left, right, plan.symmetric, worker.used ? 1 : 0);
    worker.used = true;
  }
}

// H = the sum of the workers' sums, last column = their column sums, lower triangle mirrored. The
// first worker's sums become H itself: its padded rows are closed up in place (each row moves to
// an address at or before its own), so no second matrix of H's size is ever held.
template <typename acc_t>
at::Tensor combine(std::vector<Worker<acc_t>>& workers, const GramPlan& plan, const GramShape& shape) {
  Worker<acc_t>* total = nullptr;
  for (auto& worker : workers) {
    if (!worker.used) continue;
    if (total == nullptr) {
      total = &worker;
      continue;
    }
    // Symmetric: the lower triangles were never written; what they hold is overwritten by the mirror.
    total->acc.narrow(1, 0, shape.in_b).add_(worker.acc.narrow(1, 0, shape.in_b));
    for (int64_t i = 0; i < plan.cols_a; ++i) total->column_sums[i] += worker.column_sums[i];
  }
  acc_t* acc_data = total->acc.template mutable_data_ptr<acc_t>();
  for (int64_t i = 0; i < plan.cols_a; ++i) acc_data[i * plan.ld_acc + shape.in_b] = total->column_sums[i];
  if (plan.symmetric) mirror_upper<acc_t>(acc_data, plan.cols_a, plan.ld_acc);
  // A serial row move: H is small next to the GEMMs, and a parallel region is not free. Row i goes
  // from i * ld_acc to i * (in_b + 1) <= i * ld_acc, rows in order, so no row is overwritten before
  // it has moved; memmove, since a row may overlap its own new place.
  const int64_t columns = shape.in_b + 1;
  for (int64_t i = 1; i < plan.cols_a; ++i)
    std::memmove(acc_data + i * columns, acc_data + i * plan.ld_acc, columns * sizeof(acc_t));
  return total->acc.view({-1}).narrow(0, 0, plan.cols_a * columns).view({plan.cols_a, columns});
}

// One pass over the samples. With several workers, each thread runs its own chunks (serial fills,
// single-threaded GEMMs) into private sums inside ONE parallel region: on a busy machine every
// parallel region waits for its slowest thread, and the chunked pass would otherwise open two or
// more per chunk. With one worker (one thread, or private sums too large), fills and GEMMs are
// parallel themselves.
template <typename acc_t>
at::Tensor gram_pass(const at::Tensor& a, const std::optional<at::Tensor>& b,
                     const std::optional<at::Tensor>& weight, const GramShape& shape,
                     at::ScalarType acc_type) {
  const auto options = a.options().dtype(acc_type);
  const GramPlan plan = make_plan(a, b, shape, acc_type);
  // (N,) weights in the accumulation type: small next to the inputs, and read once per row.
  const at::Tensor w = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  const acc_t* w_data = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
  const at::Tensor& right_source = b.has_value() ? *b : a;
  std::vector<Worker<acc_t>> workers;
  workers.reserve(plan.workers);
  for (int64_t i = 0; i < plan.workers; ++i) workers.emplace_back(plan, options);
  if (plan.workers == 1) {
    run_worker<acc_t>(workers[0], 0, plan, a, right_source, w_data, shape);
  } else {
    at::parallel_for(0, plan.workers, 1, [&](int64_t first, int64_t last) {
      for (int64_t index = first; index < last; ++index)
        run_worker<acc_t>(workers[index], index, plan, a, right_source, w_data, shape);
    });
  }
  return combine<acc_t>(workers, plan, shape);
}

at::Tensor gram_in(const at::Tensor& a, const std::optional<at::Tensor>& b,
                   const std::optional<at::Tensor>& weight, const GramShape& shape, at::ScalarType type) {
  const auto options = a.options().dtype(type);
  if (shape.n == 0) return at::zeros({shape.in_a + 1, shape.in_b + 1}, options);  // an empty sum
  at::Tensor h;
  AT_DISPATCH_FLOATING_TYPES(type, "ecp_gram", [&] { h = gram_pass<scalar_t>(a, b, weight, shape, type); });
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
