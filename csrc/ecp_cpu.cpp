// Fused CPU kernels of the ecp ops (schemas in register.cpp, mathematics in docs/method.md).
//
// One pass over the samples, in bounded chunks. For each chunk the kernel writes, into two small
// reusable buffers,
//   xs  = [x - shift | (x - shift)^2 | 1]   (rows x (2 in + 1))   and   c = sum_p g_p^2   (rows x out)
// with at::parallel_for, then a single GEMM  acc += c^T xs  accumulates S1, S2 and S0 of the shifted
// inputs at once (the column of ones turns the sensitivity sum S0 into part of the same GEMM). The
// contraction is where the time goes, so it runs on ATen's BLAS (MKL/oneDNN) instead of a hand-rolled
// loop; everything element-wise is fused around it and nothing of size (N, in) or (N, out) is ever
// allocated. The epilogue turns the shifted sums into mean / m2 / importance / bias_delta row by row.
//
// Shifting by the column mean of the first chunk keeps m2 = S2 - S1^2 / S0 free of the catastrophic
// cancellation the raw sums suffer when an input's mean is large next to its spread.
//
// Non-finite results: float32 sums overflow for inputs near 1e19 and above, where the float64
// reference is still finite. When a float32 result holds a NaN or an infinity, the op recomputes in
// float64 and rounds to float32, which is exactly what the reference returns (an infinity where the
// float64 value exceeds float32's range). The uncompensated score sums c a^2 again without the shift
// (for float64 results too): an infinite input gives inf there, as in the reference, where the shifted
// form would give inf - inf = NaN. NaN inputs stay NaN through both passes: a neuron is "dead"
// (zero statistics) only when its s0 is exactly zero, never because its gradients are NaN.
#include "ecp_cpu.h"
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

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

// w^2 m as the float32 epilogue computes it, except where float32 loses it to underflow (w = 1e-25
// squares to 0 although w^2 m = 1e-13): there it is formed in double and rounded once, as the
// reference does. A normal product keeps its float32 bits.
template <typename T>
T weighted_square(T w, T m) {
  const T square = w * w;
  const T value = square * m;
  if constexpr (std::is_same_v<T, float>) {
    constexpr float smallest_normal = std::numeric_limits<float>::min();
    if ((square < smallest_normal || std::abs(value) < smallest_normal) && w != 0.0f && m != 0.0f) {
      return static_cast<float>(static_cast<double>(w) * static_cast<double>(w) * static_cast<double>(m));
    }
  }
  return value;
}

// Samples used to estimate the per-column shift; any shift is exact, a good one keeps sums small.
constexpr int64_t kShiftSamples = 256;
// Bytes of the two per-chunk buffers together; bounds the op's extra memory independently of N.
constexpr int64_t kChunkBytes = 16 << 20;
// Bytes of one block of accumulator rows when all samples fit one chunk: few enough blocks to keep
// the parallel regions few, small enough to stay in the last-level cache.
constexpr int64_t kBlockBytes = 8 << 20;
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kMaxChunkRows = 4096;

// ---- validation, worded like ecp_fast/ops/_checks.py ---------------------------------------------

struct LayerShape {
  int64_t n, p, fan_in, fan_out;
};

LayerShape check_layer_inputs(const char* op, const at::Tensor& x, const at::Tensor& g,
                              const at::Tensor* weight) {
  // Every argument's type before any device, in the order of ecp_fast/ops/_checks.py, so that two
  // bad arguments give the same error from both.
  check_floating(op, "x", x);
  check_floating(op, "g", g);
  if (weight != nullptr) check_floating(op, "weight", *weight);
  check_same_device(op, "x", x, "g", g);
  if (weight != nullptr) check_same_device(op, "x", x, "weight", *weight);
  check_samples_matrix(op, "x", x);
  LayerShape shape{};
  shape.fan_in = x.size(-1);
  shape.n = sample_count(x);
  TORCH_CHECK_VALUE(g.dim() == 2 || g.dim() == 3, op,
                    ": argument 'g' must have shape (N, out) or (P, N, out), got shape ",
                    shape_string(g.sizes()));
  shape.p = g.dim() == 2 ? 1 : g.size(0);
  TORCH_CHECK_VALUE(g.size(-2) == shape.n, op, ": argument 'g' must have N = ", shape.n,
                    " samples in dimension ", g.dim() - 2, " to match 'x' of shape ", shape_string(x.sizes()),
                    ", got shape ", shape_string(g.sizes()));
  shape.fan_out = g.size(-1);
  if (weight != nullptr) {
    TORCH_CHECK_VALUE(
        weight->dim() == 2 && weight->size(0) == shape.fan_out && weight->size(1) == shape.fan_in, op,
        ": argument 'weight' must have shape (out, in) = (", shape.fan_out, ", ", shape.fan_in,
        ") to match 'g' and 'x', got shape ", shape_string(weight->sizes()));
  }
  return shape;
}

// ---- chunk fills ---------------------------------------------------------------------------------

// Buffer rows r in [begin, end) = [x - shift | (x - shift)^2 | 1] of sample start + r. Called
// inside a parallel region: one region per chunk fills both buffers, so threads meet once a chunk.
template <typename in_t, typename acc_t>
void fill_shifted_inputs(const at::Tensor& x, const SampleOffsets& offsets, const acc_t* shift, int64_t start,
                         int64_t begin, int64_t end, int64_t fan_in, acc_t* buffer, int64_t ld) {
  const in_t* data = x.const_data_ptr<in_t>();
  const int64_t col_stride = x.stride(-1);
  for (int64_t r = begin; r < end; ++r) {
    const in_t* row = data + offsets(start + r);
    acc_t* centred = buffer + r * ld;
    acc_t* squared = centred + fan_in;
    if (col_stride == 1) {
      for (int64_t j = 0; j < fan_in; ++j) {
        const acc_t value = static_cast<acc_t>(row[j]) - shift[j];
        centred[j] = value;
        squared[j] = value * value;
      }
    } else {
      for (int64_t j = 0; j < fan_in; ++j) {
        const acc_t value = static_cast<acc_t>(row[j * col_stride]) - shift[j];
        centred[j] = value;
        squared[j] = value * value;
      }
    }
    squared[fan_in] = acc_t(1);
  }
}

// Buffer rows r in [begin, end) = sum_p g[p, start + r, :]^2.
template <typename g_t, typename acc_t>
void fill_sensitivities(const at::Tensor& g3, int64_t start, int64_t begin, int64_t end, acc_t* buffer,
                        int64_t ld) {
  const g_t* data = g3.const_data_ptr<g_t>();
  const int64_t probes = g3.size(0), fan_out = g3.size(2);
  const int64_t stride_p = g3.stride(0), stride_n = g3.stride(1), stride_o = g3.stride(2);
  for (int64_t r = begin; r < end; ++r) {
    acc_t* out = buffer + r * ld;
    std::fill(out, out + fan_out, acc_t(0));
    for (int64_t p = 0; p < probes; ++p) {
      const g_t* row = data + p * stride_p + (start + r) * stride_n;
      if (stride_o == 1) {
        for (int64_t i = 0; i < fan_out; ++i) {
          const acc_t value = static_cast<acc_t>(row[i]);
          out[i] += value * value;
        }
      } else {
        for (int64_t i = 0; i < fan_out; ++i) {
          const acc_t value = static_cast<acc_t>(row[i * stride_o]);
          out[i] += value * value;
        }
      }
    }
  }
}

template <typename in_t, typename acc_t>
void column_shift(const at::Tensor& x, const SampleOffsets& offsets, int64_t samples, int64_t fan_in,
                  acc_t* shift) {
  std::fill(shift, shift + fan_in, acc_t(0));
  if (samples == 0) return;
  const in_t* data = x.const_data_ptr<in_t>();
  const int64_t col_stride = x.stride(-1);
  for (int64_t s = 0; s < samples; ++s) {
    const in_t* row = data + offsets(s);
    for (int64_t j = 0; j < fan_in; ++j) shift[j] += static_cast<acc_t>(row[j * col_stride]);
  }
  for (int64_t j = 0; j < fan_in; ++j) shift[j] /= static_cast<acc_t>(samples);
}

// ---- the fused pass ------------------------------------------------------------------------------

// Turns the shifted sums of output rows [row_begin, row_end) into moments: calls
// f(i, j, s0, mean, m2, s2) for every weight of those rows, in parallel over rows. Row r of `acc` holds
// [S1 (in) | S2 (in) | S0] of output row row_begin + r; s2 is S2 itself, sum_s c (a - shift)^2.
template <typename acc_t, typename F>
void for_each_moment(const acc_t* acc, int64_t ld, const acc_t* shift, int64_t row_begin, int64_t row_end,
                     int64_t fan_in, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(fan_in, 1));
  at::parallel_for(row_begin, row_end, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* s1 = acc + (i - row_begin) * ld;
      const acc_t* s2 = s1 + fan_in;
      const acc_t s0 = s2[fan_in];
      if (s0 <= acc_t(0)) {
        // docs/method.md: a neuron that never affects the output has zero importance and no shift.
        // A NaN s0 (NaN gradients) is not "never affects": it falls through and stays NaN.
        for (int64_t j = 0; j < fan_in; ++j) f(i, j, acc_t(0), acc_t(0), acc_t(0), acc_t(0));
        continue;
      }
      for (int64_t j = 0; j < fan_in; ++j) {
        const acc_t shifted_mean = s1[j] / s0;
        const acc_t m2 = std::max(s2[j] - s1[j] * shifted_mean, acc_t(0));
        f(i, j, s0, shift[j] + shifted_mean, m2, s2[j]);
      }
    }
  });
}

// One pass over the samples of a layer; calls f(i, j, s0, mean, m2, s2) once for every weight.
// shift_inputs = false sums the inputs unshifted (shift 0), so that s2 is the raw sum_s c a^2.
//
// When all samples fit one chunk (few samples, wide layers), the buffers are filled once and the
// GEMM and the epilogue run block by block over output rows, so the accumulator of a block stays in
// cache and the op never holds an (out, 2 in) accumulator. Otherwise the chunks stream through one
// full accumulator, and the epilogue runs once at the end.
template <typename acc_t, typename F>
void shifted_pass(const at::Tensor& x, const at::Tensor& g3, const LayerShape& shape, bool shift_inputs,
                  const F& f) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const auto options = x.options().dtype(acc_type);
  const int64_t fan_in = shape.fan_in, fan_out = shape.fan_out, n = shape.n;
  const int64_t gemm_cols = 2 * fan_in + 1;
  const int64_t ld_inputs = padded_row(gemm_cols), ld_sens = padded_row(fan_out);
  if (fan_out == 0 || fan_in == 0) return;

  const SampleOffsets offsets(x);
  at::Tensor shift_tensor = at::empty({fan_in}, options);
  acc_t* shift = shift_tensor.mutable_data_ptr<acc_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ecp_column_shift", [&] {
    column_shift<scalar_t, acc_t>(x, offsets, shift_inputs ? std::min(n, kShiftSamples) : 0, fan_in, shift);
  });
  if (n == 0) {
    // No samples: every neuron has s0 = 0, so every weight gets the dead-neuron zeros.
    at::parallel_for(0, fan_out, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < fan_in; ++j) f(i, j, acc_t(0), acc_t(0), acc_t(0), acc_t(0));
    });
    return;
  }

  const int64_t row_bytes = (ld_inputs + ld_sens) * static_cast<int64_t>(sizeof(acc_t));
  const int64_t chunk = std::min(n, std::clamp(kChunkBytes / row_bytes, kMinChunkRows, kMaxChunkRows));
  at::Tensor inputs_buffer = at::empty({chunk, ld_inputs}, options);
  at::Tensor sens_buffer = at::empty({chunk, ld_sens}, options);
  acc_t* inputs_data = inputs_buffer.mutable_data_ptr<acc_t>();
  acc_t* sens_data = sens_buffer.mutable_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(fan_in + fan_out * shape.p, 1));
  auto fill_chunk = [&](int64_t start, int64_t rows) {
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ecp_fill_x", [&] {
        fill_shifted_inputs<scalar_t, acc_t>(x, offsets, shift, start, begin, end, fan_in, inputs_data,
                                             ld_inputs);
      });
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g3.scalar_type(), "ecp_fill_g", [&] {
        fill_sensitivities<scalar_t, acc_t>(g3, start, begin, end, sens_data, ld_sens);
      });
    });
  };

  if (n <= chunk) {
    fill_chunk(0, n);
    const at::Tensor inputs = inputs_buffer.narrow(0, 0, n).narrow(1, 0, gemm_cols);
    const int64_t block_rows = std::clamp<int64_t>(kBlockBytes / (ld_inputs * sizeof(acc_t)), 16, fan_out);
    at::Tensor block_acc = at::empty({block_rows, ld_inputs}, options);
    for (int64_t row = 0; row < fan_out; row += block_rows) {
      const int64_t rows = std::min(block_rows, fan_out - row);
      const at::Tensor sens = sens_buffer.narrow(0, 0, n).narrow(1, row, rows);
      // beta = 0: the block's previous contents are ignored, so it needs no zeroing.
      block_acc.narrow(0, 0, rows).narrow(1, 0, gemm_cols).addmm_(sens.t(), inputs, /*beta=*/0, /*alpha=*/1);
      for_each_moment<acc_t>(block_acc.const_data_ptr<acc_t>(), ld_inputs, shift, row, row + rows, fan_in, f);
    }
    return;
  }

  // acc[:, 0:in] = S1, acc[:, in:2in] = S2, acc[:, 2in] = S0 of the shifted inputs.
  at::Tensor acc = at::empty({fan_out, ld_inputs}, options);
  at::Tensor acc_view = acc.narrow(1, 0, gemm_cols);
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    fill_chunk(start, rows);
    // acc (out x 2in+1) += c^T (out x rows) @ xs (rows x 2in+1); BLAS reads both transposed views
    // in place through their leading dimensions. The first chunk overwrites (beta = 0).
    const at::Tensor sens = sens_buffer.narrow(0, 0, rows).narrow(1, 0, fan_out);
    const at::Tensor inputs = inputs_buffer.narrow(0, 0, rows).narrow(1, 0, gemm_cols);
    acc_view.addmm_(sens.t(), inputs, /*beta=*/start == 0 ? 0 : 1, /*alpha=*/1);
  }
  for_each_moment<acc_t>(acc.const_data_ptr<acc_t>(), ld_inputs, shift, 0, fan_out, fan_in, f);
}

}  // namespace

// ---- the ops -------------------------------------------------------------------------------------

namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Triple moments_in(const at::Tensor& x, const at::Tensor& g3, const LayerShape& shape, at::ScalarType type) {
  const auto options = x.options().dtype(type);
  at::Tensor s0 = at::empty({shape.fan_out}, options);
  at::Tensor mean = at::empty({shape.fan_out, shape.fan_in}, options);
  at::Tensor m2 = at::empty({shape.fan_out, shape.fan_in}, options);
  AT_DISPATCH_FLOATING_TYPES(type, "ecp_moments", [&] {
    using acc_t = scalar_t;
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* m2_out = m2.mutable_data_ptr<acc_t>();
    acc_t* s0_out = s0.mutable_data_ptr<acc_t>();
    const int64_t fan_in = shape.fan_in;
    shifted_pass<acc_t>(x, g3, shape, /*shift_inputs=*/true,
                        [&](int64_t i, int64_t j, acc_t row_s0, acc_t row_mean, acc_t row_m2, acc_t /*s2*/) {
                          if (j == 0) s0_out[i] = row_s0;
                          mean_out[i * fan_in + j] = row_mean;
                          m2_out[i * fan_in + j] = row_m2;
                        });
  });
  if (shape.fan_in == 0) {
    // No weight to visit: s0 is still the sensitivity sum of each neuron.
    s0.copy_(g3.to(type).square().sum(at::IntArrayRef{0, 1}));
  }
  return {s0, mean, m2};
}

// What score_in computes for each weight.
enum class Importance {
  kCompensated,    // w^2 m2 and w mean (ECP)
  kUncompensated,  // w^2 (m2 + s0 mean^2) of the shifted sums, and zeros
  // w^2 sum_s c a^2 summed without a shift, and zeros: an infinite input then gives inf, where the
  // shifted form gives inf - inf = NaN (m2 of an infinite column is NaN, its raw sum is not).
  kUncompensatedRaw,
};

Pair score_in(const at::Tensor& x, const at::Tensor& g3, const at::Tensor& weight, Importance kind,
              const LayerShape& shape, at::ScalarType type) {
  const auto options = x.options().dtype(type);
  at::Tensor importance = at::empty({shape.fan_out, shape.fan_in}, options);
  at::Tensor bias_delta = at::empty({shape.fan_out, shape.fan_in}, options);
  // (out, in) is small next to (N, in); a contiguous copy of the weight keeps the epilogue simple.
  const at::Tensor w = weight.to(type).contiguous();
  AT_DISPATCH_FLOATING_TYPES(type, "ecp_score", [&] {
    using acc_t = scalar_t;
    const acc_t* w_data = w.const_data_ptr<acc_t>();
    acc_t* importance_out = importance.mutable_data_ptr<acc_t>();
    acc_t* delta_out = bias_delta.mutable_data_ptr<acc_t>();
    const int64_t fan_in = shape.fan_in;
    const bool shift_inputs = kind != Importance::kUncompensatedRaw;
    shifted_pass<acc_t>(x, g3, shape, shift_inputs,
                        [&](int64_t i, int64_t j, acc_t s0, acc_t mean, acc_t m2, acc_t s2) {
                          const int64_t k = i * fan_in + j;
                          const acc_t w_ij = w_data[k];
                          if (s0 <= acc_t(0)) {
                            // A dead neuron's zeros must not become NaN through a NaN or infinite weight (0 *
                            // inf).
                            importance_out[k] = acc_t(0);
                            delta_out[k] = acc_t(0);
                          } else if (kind == Importance::kCompensated) {
                            importance_out[k] = weighted_square(w_ij, m2);
                            delta_out[k] = w_ij * mean;
                          } else if (kind == Importance::kUncompensated) {
                            // sum_s c a^2 = m2 + s0 mean^2: both terms are non-negative, so nothing cancels.
                            importance_out[k] = weighted_square(w_ij, m2 + s0 * mean * mean);
                            delta_out[k] = acc_t(0);
                          } else {
                            importance_out[k] = weighted_square(w_ij, s2);  // unshifted: s2 = sum_s c a^2
                            delta_out[k] = acc_t(0);
                          }
                        });
  });
  return {importance, bias_delta};
}

void check_finalize_inputs(const char* op, const at::Tensor& s0, const at::Tensor& mean, const at::Tensor& m2,
                           const at::Tensor& weight) {
  check_floating(op, "s0", s0);
  check_floating(op, "mean", mean);
  check_floating(op, "m2", m2);
  check_floating(op, "weight", weight);
  check_same_device(op, "weight", weight, "s0", s0);
  check_same_device(op, "weight", weight, "mean", mean);
  check_same_device(op, "weight", weight, "m2", m2);
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": argument 'weight' must have shape (out, in), got shape ",
                    shape_string(weight.sizes()));
  const int64_t fan_out = weight.size(0), fan_in = weight.size(1);
  TORCH_CHECK_VALUE(s0.dim() == 1 && s0.size(0) == fan_out, op, ": argument 's0' must have shape (out,) = (",
                    fan_out, ",) to match 'weight', got shape ", shape_string(s0.sizes()));
  TORCH_CHECK_VALUE(mean.sizes() == weight.sizes(), op, ": argument 'mean' must have shape (out, in) = (",
                    fan_out, ", ", fan_in, ") to match 'weight', got shape ", shape_string(mean.sizes()));
  TORCH_CHECK_VALUE(m2.sizes() == weight.sizes(), op, ": argument 'm2' must have shape (out, in) = (",
                    fan_out, ", ", fan_in, ") to match 'weight', got shape ", shape_string(m2.sizes()));
}

Pair finalize_in(const at::Tensor& s0, const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& weight,
                 at::ScalarType type) {
  const int64_t fan_out = weight.size(0), fan_in = weight.size(1);
  const auto options = weight.options().dtype(type);
  at::Tensor importance = at::empty({fan_out, fan_in}, options);
  at::Tensor bias_delta = at::empty({fan_out, fan_in}, options);
  const at::Tensor s0_c = s0.to(type).contiguous(), mean_c = mean.to(type).contiguous();
  const at::Tensor m2_c = m2.to(type).contiguous(), w_c = weight.to(type).contiguous();
  AT_DISPATCH_FLOATING_TYPES(type, "ecp_finalize", [&] {
    using acc_t = scalar_t;
    const acc_t* s0_data = s0_c.const_data_ptr<acc_t>();
    const acc_t* mean_data = mean_c.const_data_ptr<acc_t>();
    const acc_t* m2_data = m2_c.const_data_ptr<acc_t>();
    const acc_t* w_data = w_c.const_data_ptr<acc_t>();
    acc_t* importance_out = importance.mutable_data_ptr<acc_t>();
    acc_t* delta_out = bias_delta.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(fan_in, 1));
    at::parallel_for(0, fan_out, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // Dead only when s0 <= 0: a NaN s0 keeps its row NaN, as in the reference.
        const bool dead = s0_data[i] <= acc_t(0);
        for (int64_t j = 0; j < fan_in; ++j) {
          const int64_t k = i * fan_in + j;
          const acc_t w_ij = w_data[k];
          // std::max(value, 0) keeps a NaN value (the comparison is false, the first argument wins).
          importance_out[k] = dead ? acc_t(0) : std::max(weighted_square(w_ij, m2_data[k]), acc_t(0));
          delta_out[k] = dead ? acc_t(0) : w_ij * mean_data[k];
        }
      }
    });
  });
  return {importance, bias_delta};
}

bool finite_pair(const Pair& pair) { return all_finite({std::get<0>(pair), std::get<1>(pair)}); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moments_cpu(const at::Tensor& x, const at::Tensor& g) {
  const auto shape = check_layer_inputs("ecp.moments", x, g, nullptr);
  const at::Tensor g3 = g.dim() == 2 ? g.unsqueeze(0) : g;
  return with_float64_rescue<Triple>(
      result_type({x, g}), [&](at::ScalarType type) { return moments_in(x, g3, shape, type); },
      [](const Triple& t) { return all_finite({std::get<0>(t), std::get<1>(t), std::get<2>(t)}); });
}

std::tuple<at::Tensor, at::Tensor> score_cpu(const at::Tensor& x, const at::Tensor& g,
                                             const at::Tensor& weight, bool compensate) {
  const auto shape = check_layer_inputs("ecp.score", x, g, &weight);
  const at::Tensor g3 = g.dim() == 2 ? g.unsqueeze(0) : g;
  const auto type = result_type({x, g, weight});
  if (compensate) {
    return with_float64_rescue<Pair>(
        type, [&](at::ScalarType t) { return score_in(x, g3, weight, Importance::kCompensated, shape, t); },
        finite_pair);
  }
  Pair result = score_in(x, g3, weight, Importance::kUncompensated, shape, type);
  if (finite_pair(result)) return result;
  // Overflow or an infinite input: sum c a^2 again in float64 without the shift, as the reference
  // does, and round once (float32 sums overflow near 1e19; inf - inf of the shifted form is NaN).
  Pair wide = score_in(x, g3, weight, Importance::kUncompensatedRaw, shape, at::kDouble);
  return {std::get<0>(wide).to(type), std::get<1>(wide).to(type)};
}

std::tuple<at::Tensor, at::Tensor> finalize_cpu(const at::Tensor& s0, const at::Tensor& mean,
                                                const at::Tensor& m2, const at::Tensor& weight) {
  check_finalize_inputs("ecp.finalize", s0, mean, m2, weight);
  return with_float64_rescue<Pair>(
      result_type({s0, mean, m2, weight}),
      [&](at::ScalarType type) { return finalize_in(s0, mean, m2, weight, type); }, finite_pair);
}

}  // namespace ecp_fast
