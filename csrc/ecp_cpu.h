// CPU kernels of the ecp ops, for C++ users who link the library directly.
//
// From Python the same functions are reached as torch.ops.ecp.{moments,score,finalize}; the op
// schemas are declared once, in ecp_fast/ops.py. See METHOD.md for the mathematics: all results are
// sums over samples, float32 (float64 when an input is float64).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace ecp_fast {

// x: (..., in) layer inputs; g: (N, out) or (P, N, out) output gradients, c = sum_p g_p^2.
// Returns s0 (out,), mean (out, in), m2 (out, in).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moments_cpu(const at::Tensor& x, const at::Tensor& g);

// Returns importance (out, in) and bias_delta (out, in); compensate=false gives the uncompensated
// importance w^2 sum_s c a^2 and a zero bias_delta.
std::tuple<at::Tensor, at::Tensor> score_cpu(
    const at::Tensor& x, const at::Tensor& g, const at::Tensor& weight, bool compensate);

// importance = max(w^2 m2, 0), bias_delta = w mean; rows with s0 == 0 give zeros.
std::tuple<at::Tensor, at::Tensor> finalize_cpu(
    const at::Tensor& s0, const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& weight);

}  // namespace ecp_fast
