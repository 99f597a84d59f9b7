// The ecp op library: schemas (TORCH_LIBRARY), CPU kernels and the autograd policy.
//
// The library describes itself, as pytorch/extension-cpp does: loading it (torch.ops.load_library,
// or linking it from C++) defines torch.ops.ecp.* without any Python. ecp_fast/ops/__init__.py keeps
// the same schema strings in SCHEMAS, used only when this library is not loaded; a test checks that
// the two agree. The fake (meta) kernels live in Python, in the module named by set_python_module.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>

#include "ecp_cpu.h"

namespace {

// "ecp::score" -> "ecp.score", as the checks name the ops.
std::string op_label(const c10::OperatorHandle& op) {
  std::string name = op.schema().name();
  const auto colons = name.find("::");
  return colons == std::string::npos ? name : name.replace(colons, 2, ".");
}

// Autograd kernel of every ecp op. The ops have no derivative (their outputs are statistics of the
// inputs, not functions anyone trains through), so an input that requires grad while grad mode is
// on is refused, naming it, instead of silently giving outputs that gradients cannot flow through.
// Otherwise the call goes on to the backend kernel.
void refuse_grad_inputs(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& arguments = op.schema().arguments();
    const size_t first = stack->size() - arguments.size();
    for (size_t i = 0; i < arguments.size(); ++i) {
      const c10::IValue& value = (*stack)[first + i];
      TORCH_CHECK(!(value.isTensor() && value.toTensor().requires_grad()), op_label(op), ": argument '",
                  arguments[i].name(), "' requires grad, but the ecp ops have no derivative; pass ",
                  arguments[i].name(), ".detach() or call the op under torch.no_grad()");
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY(ecp, m) {
  m.set_python_module("ecp_fast.ops");
  m.def("moments(Tensor x, Tensor g) -> (Tensor s0, Tensor mean, Tensor m2)");
  m.def(
      "score(Tensor x, Tensor g, Tensor weight, bool compensate=True) -> (Tensor importance, Tensor "
      "bias_delta)");
  m.def(
      "finalize(Tensor s0, Tensor mean, Tensor m2, Tensor weight) -> (Tensor importance, Tensor bias_delta)");
  m.def("gram(Tensor a, Tensor? b=None, Tensor? weight=None, bool float64=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(ecp, CPU, m) {
  m.impl("moments", &ecp_fast::moments_cpu);
  m.impl("score", &ecp_fast::score_cpu);
  m.impl("finalize", &ecp_fast::finalize_cpu);
  m.impl("gram", &ecp_fast::gram_cpu);
}

TORCH_LIBRARY_IMPL(ecp, Autograd, m) {
  for (const char* name : {"moments", "score", "finalize", "gram"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_grad_inputs>());
  }
}
