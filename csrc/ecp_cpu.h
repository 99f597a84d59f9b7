// CPU kernels of the ecp ops, for C++ users who link the library directly.
//
// The same library registers them as the CPU kernels of torch.ops.ecp.{moments,score,finalize,gram}
// and declares those ops' schemas (register.cpp), so loading it is enough to call the ops from C++,
// TorchScript or Python. See docs/method.md for the mathematics: all results are sums over samples,
// float32 (float64 when an input is float64).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace ecp_fast {

// x: (..., in) layer inputs; g: (N, out) or (P, N, out) output gradients, c = sum_p g_p^2.
// Returns s0 (out,), mean (out, in), m2 (out, in).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moments_cpu(const at::Tensor& x, const at::Tensor& g);

// Returns importance (out, in) and bias_delta (out, in); compensate=false gives the uncompensated
// importance w^2 sum_s c a^2 and a zero bias_delta.
std::tuple<at::Tensor, at::Tensor> score_cpu(const at::Tensor& x, const at::Tensor& g,
                                             const at::Tensor& weight, bool compensate);

// importance = max(w^2 m2, 0), bias_delta = w mean; rows with s0 == 0 give zeros.
std::tuple<at::Tensor, at::Tensor> finalize_cpu(const at::Tensor& s0, const at::Tensor& mean,
                                                const at::Tensor& m2, const at::Tensor& weight);

// H = sum_s w_s [a_s; 1] [b_s; 1]^T, (in_a + 1, in_b + 1), the constant 1 last. a: (..., in_a);
// b: samples of the same N, (..., in_b), or none for b = a; weight: (N,) or none for w = 1.
// float32, or float64 when an input is float64 or float64 = true. Grams of disjoint samples add.
at::Tensor gram_cpu(const at::Tensor& a, const std::optional<at::Tensor>& b,
                    const std::optional<at::Tensor>& weight, bool float64);

}  // namespace ecp_fast
