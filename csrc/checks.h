// Input validation and small helpers shared by the CPU kernels of the ecp ops.
//
// The messages are worded exactly like ecp_fast/ops/_checks.py, so an error reads the same whichever
// backend raised it: it names the argument, what was expected and what arrived.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

namespace ecp_fast {
namespace detail {

// "(5,)", "(3, 4)": Python's tuple notation, as the Python checks print shapes.
std::string shape_string(at::IntArrayRef sizes);

// TypeError unless t is defined (not None) and has one of the supported floating dtypes.
void check_floating(const char* op, const char* name, const at::Tensor& t);

// ValueError when t lives on another device than ref.
void check_same_device(const char* op, const char* ref_name, const at::Tensor& ref, const char* name,
                       const at::Tensor& t);

// ValueError unless t has at least two dimensions (samples..., features).
void check_samples_matrix(const char* op, const char* name, const at::Tensor& t);

// Product of all dimensions but the last: the number of samples of a (samples..., features) tensor.
int64_t sample_count(const at::Tensor& t);

// float64 when any input is float64, float32 otherwise (half inputs accumulate in float32).
at::ScalarType result_type(std::initializer_list<at::Tensor> tensors);

// True when every element of every tensor is finite (no NaN, no infinity). Reads in place.
bool all_finite(std::initializer_list<at::Tensor> tensors);

// Runs compute(out_type); a float32 result holding a NaN or an infinity is recomputed in float64 and
// rounded to float32. float32 sums overflow for inputs near 1e19 and above, where the float64
// reference is still finite; rounding the float64 result is exactly what the reference returns (an
// infinity only where the float64 value exceeds float32's range). float64 results are returned as
// they are: they overflow only for inputs beyond about 1e150, like the reference does.
template <typename Result>
Result with_float64_rescue(at::ScalarType out_type, const std::function<Result(at::ScalarType)>& compute,
                           const std::function<bool(const Result&)>& finite) {
  Result result = compute(out_type);
  if (out_type != at::kFloat || finite(result)) return result;
  Result wide = compute(at::kDouble);
  std::apply([](auto&... t) { ((t = t.to(at::kFloat)), ...); }, wide);
  return wide;
}

// Maps a flat sample index to an element offset, for tensors whose leading dimensions are samples
// (any rank, any strides), so that no reshape ever copies the input.
class SampleOffsets {
 public:
  // All dimensions of t but the last are sample dimensions.
  explicit SampleOffsets(const at::Tensor& t);

  int64_t operator()(int64_t sample) const {
    if (single_dim_) return sample * single_stride_;
    int64_t offset = 0;
    for (int64_t d = static_cast<int64_t>(sizes_.size()) - 1; d >= 0; --d) {
      offset += (sample % sizes_[d]) * strides_[d];
      sample /= sizes_[d];
    }
    return offset;
  }

 private:
  std::vector<int64_t> sizes_, strides_;
  bool single_dim_ = false;
  int64_t single_stride_ = 0;
};

// Leading dimension of a buffer row: padded to whole cache lines, and off powers of two, whose
// strides make consecutive rows collide in the cache sets during the GEMM.
int64_t padded_row(int64_t columns);

}  // namespace detail
}  // namespace ecp_fast
