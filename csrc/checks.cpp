// Validation and helpers shared by the CPU kernels (see checks.h).
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <sstream>

namespace ecp_fast {
namespace detail {

std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t d = 0; d < sizes.size(); ++d) {
    out << (d ? ", " : "") << sizes[d];
  }
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

namespace {

std::string dtype_string(at::ScalarType type) {
  return "torch." + std::string(c10::getDtypeNames(type).first);
}

template <typename scalar_t>
bool finite_elements(const at::Tensor& t) {
  // Contiguous copies of small outputs only: the kernels call this on their (out, in) results.
  const at::Tensor c = t.contiguous();
  const scalar_t* data = c.const_data_ptr<scalar_t>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, c.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    bool local = true;
    for (int64_t k = begin; k < end; ++k) local &= std::isfinite(static_cast<double>(data[k]));
    if (!local) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  // None passed for a `Tensor` of the schema reaches the kernel as an undefined tensor, whose
  // scalar_type() would throw "Unimplemented scalar type" without naming the op or the argument.
  TORCH_CHECK_TYPE(t.defined(), op, ": argument '", name, "' must be a torch.Tensor, got NoneType");
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
                   op, ": argument '", name, "' must have dtype float32, float64, bfloat16 or float16, got ",
                   dtype_string(type));
}

void check_same_device(const char* op, const char* ref_name, const at::Tensor& ref, const char* name,
                       const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": argument '", name, "' must be on the same device as '",
                    ref_name, "' (", ref.device(), "), got ", t.device());
}

void check_samples_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() >= 2, op, ": argument '", name,
                    "' must have at least 2 dimensions (samples..., in), got shape ",
                    shape_string(t.sizes()));
}

int64_t sample_count(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) n *= t.size(d);
  return n;
}

at::ScalarType result_type(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors) {
    if (t.defined() && t.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

bool all_finite(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors) {
    if (!t.defined() || t.numel() == 0) continue;
    bool finite = true;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "ecp_all_finite",
                                    [&] { finite = finite_elements<scalar_t>(t); });
    if (!finite) return false;
  }
  return true;
}

SampleOffsets::SampleOffsets(const at::Tensor& t)
    : sizes_(t.sizes().begin(), t.sizes().end() - 1), strides_(t.strides().begin(), t.strides().end() - 1) {
  if (sizes_.size() == 1) {
    single_dim_ = true;
    single_stride_ = strides_[0];
  }
}

int64_t padded_row(int64_t columns) {
  int64_t ld = (std::max<int64_t>(columns, 1) + 15) / 16 * 16;
  if (ld % 512 == 0) ld += 16;
  return ld;
}

}  // namespace detail
}  // namespace ecp_fast
