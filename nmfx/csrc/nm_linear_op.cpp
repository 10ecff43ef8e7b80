// nmfx_cpu::nm_linear: the packed linear of nmfx::nm_linear with its per-call choice made in C++.
//
// Why: nmfx::nm_linear is a Python custom op. Called from a compiled graph, every call went
// through its Python wrapper (~100 us against ~27 us for the kernel at one row of x, dozens of
// calls per decoded token). This op is what compiled graphs call instead (its fake kernel is
// registered from Python, nmfx/kernels/_cpp_linear.py): it looks up the layer's tuned choice for
// the call's rows of x in the dispatch code (4 bits per bucket of rows) and calls nm_gemm or
// nm_dense through the dispatcher, with no Python on the way.
//
// Python owns the tables (buckets, choice index -> nm_gemm isa argument), so they are defined
// once (nmfx/kernels/_autotune.py) and pushed here by set_linear_table. Whatever the tables do
// not settle in C++ goes to nmfx::nm_linear itself, the same answer by the Python route: an
// untuned layer (dispatch -1), a choice this CPU cannot run (Python warns and picks the nearest),
// an override in force (NMFX_DISPATCH, NMFX_ISA, force_dispatch, use_isa/set_isa: Python counts
// them into set_linear_overrides), or no table pushed yet.
//
// No backward: the Autograd kernel refuses inputs that require grad (compiled graphs call this op
// only where none does) and otherwise runs the CPU kernel below autograd.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace nmfx {
namespace {

constexpr int64_t kChoiceDense = -1;   // the dense branch (nm_dense)
constexpr int64_t kChoicePython = -2;  // not settled here: nmfx::nm_linear decides

struct LinearTable {
  std::vector<int64_t> bucket_hi;  // inclusive upper bound per bucket of rows of x; < 0: open
  std::vector<int64_t> codes;      // per choice index: nm_gemm's isa argument, or the above
};

std::mutex g_table_mutex;
std::vector<std::unique_ptr<LinearTable>> g_tables;  // every table pushed stays alive
std::atomic<const LinearTable*> g_table{nullptr};
std::atomic<int64_t> g_overrides{0};

void set_linear_table(c10::ArrayRef<int64_t> bucket_hi, c10::ArrayRef<int64_t> codes) {
  TORCH_CHECK(!bucket_hi.empty() && bucket_hi.size() <= 16,
              "nmfx: set_linear_table needs 1-16 buckets (4 bits each in a 64-bit code), got ",
              bucket_hi.size());
  TORCH_CHECK(!codes.empty() && codes.size() <= 16, "nmfx: set_linear_table needs 1-16 choices, got ",
              codes.size());
  auto table = std::make_unique<LinearTable>();
  table->bucket_hi.assign(bucket_hi.begin(), bucket_hi.end());
  table->codes.assign(codes.begin(), codes.end());
  std::lock_guard<std::mutex> lock(g_table_mutex);
  g_table.store(table.get(), std::memory_order_release);
  g_tables.push_back(std::move(table));  // a concurrent call may still read an older one
}

void set_linear_overrides(int64_t count) {
  TORCH_CHECK(count >= 0, "nmfx: override count must be >= 0, got ", count);
  g_overrides.store(count, std::memory_order_release);
}

bool env_set(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0';
}

// nm_gemm's isa argument for this call, kChoiceDense, or kChoicePython.
int64_t settle(int64_t dispatch, int64_t rows_of_x) {
  const LinearTable* table = g_table.load(std::memory_order_acquire);
  if (dispatch < 0 || table == nullptr || g_overrides.load(std::memory_order_acquire) != 0 ||
      env_set("NMFX_DISPATCH") || env_set("NMFX_ISA")) {
    return kChoicePython;
  }
  const auto& hi = table->bucket_hi;
  size_t bucket = 0;
  while (bucket + 1 < hi.size() && hi[bucket] >= 0 && rows_of_x > hi[bucket]) ++bucket;
  const uint64_t index = (static_cast<uint64_t>(dispatch) >> (4 * bucket)) & 0xF;
  return index < table->codes.size() ? table->codes[index] : kChoicePython;
}

using LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t,
                             int64_t);
using DenseSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t);

at::Tensor nm_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias, int64_t rows, int64_t cols,
                         int64_t n, int64_t m, int64_t dispatch) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == cols, "nmfx_cpu::nm_linear: x's last dim must be ",
              "cols=", cols, ", got x of shape ", x.sizes());
  const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, cols});
  const int64_t code = settle(dispatch, x2.size(0));
  at::Tensor y;
  if (code == kChoicePython) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("nmfx::nm_linear", "")
                               .typed<LinearSig>();
    return op.call(x, values, mask, bias, rows, cols, n, m, dispatch);
  }
  if (code == kChoiceDense) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("nmfx_cpu::nm_dense", "")
                               .typed<DenseSig>();
    y = op.call(x2, values, mask, bias, rows, cols, n, m, 0, 0);
  } else {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("nmfx_cpu::nm_gemm", "")
                               .typed<LinearSig>();
    y = op.call(x2, values, mask, bias, rows, cols, n, m, code);
  }
  if (x.dim() == 2) return y;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(rows);
  return y.reshape(shape);
}

using GroupSig = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList,
                                         at::IntArrayRef, int64_t, int64_t, int64_t, int64_t);

// nmfx_cpu::nm_linear_group: nm_linear of several bias-free packed weights on the same x (a
// decoder's q/k/v or gate/up projections), one output each. The members whose tuned choices for
// these rows of x settle to the same nm_gemm call run as one nm_gemm_group (x staged once, one
// parallel region); any other member runs its own nm_linear. Each output equals that member's
// nm_linear (bit for bit: the same kernel, the same chunks of rows).
std::vector<at::Tensor> nm_linear_group_cpu(const at::Tensor& x, at::TensorList values,
                                            at::TensorList masks, at::IntArrayRef rows,
                                            int64_t cols, int64_t n, int64_t m,
                                            at::IntArrayRef dispatch) {
  const size_t count = values.size();
  TORCH_CHECK(count > 0 && masks.size() == count && rows.size() == count &&
                  dispatch.size() == count,
              "nmfx_cpu::nm_linear_group needs as many values, masks, rows and dispatch codes (at "
              "least one), got ", count, ", ", masks.size(), ", ", rows.size(), ", ",
              dispatch.size());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == cols, "nmfx_cpu::nm_linear_group: x's last dim must ",
              "be cols=", cols, ", got x of shape ", x.sizes());
  const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, cols});
  std::vector<at::Tensor> out(count);
  std::vector<bool> done(count, false);
  static const auto group = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("nmfx_cpu::nm_gemm_group", "")
                                .typed<GroupSig>();
  for (size_t i = 0; i < count; ++i) {
    if (done[i]) continue;
    const int64_t code = settle(dispatch[i], x2.size(0));
    std::vector<size_t> same;  // members after i settling to the same nm_gemm call
    for (size_t j = i + 1; j < count && code >= 0; ++j) {
      if (!done[j] && settle(dispatch[j], x2.size(0)) == code) same.push_back(j);
    }
    if (same.empty()) {
      out[i] = nm_linear_cpu(x, values[i], masks[i], std::nullopt, rows[i], cols, n, m,
                             dispatch[i]);
      done[i] = true;
      continue;
    }
    same.insert(same.begin(), i);
    std::vector<at::Tensor> vs, ms;
    std::vector<int64_t> rs;
    for (size_t j : same) {
      vs.push_back(values[j]);
      ms.push_back(masks[j]);
      rs.push_back(rows[j]);
    }
    std::vector<at::Tensor> ys = group.call(x2, vs, ms, rs, cols, n, m, code);
    for (size_t k = 0; k < same.size(); ++k) {
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
      shape.push_back(rs[k]);
      out[same[k]] = x.dim() == 2 ? ys[k] : ys[k].reshape(shape);
      done[same[k]] = true;
    }
  }
  return out;
}

std::vector<at::Tensor> nm_linear_group_autograd(const at::Tensor& x, at::TensorList values,
                                                 at::TensorList masks, at::IntArrayRef rows,
                                                 int64_t cols, int64_t n, int64_t m,
                                                 at::IntArrayRef dispatch) {
  TORCH_CHECK(!at::GradMode::is_enabled() || !x.requires_grad(),
              "nmfx_cpu::nm_linear_group has no backward: x requires grad; call "
              "torch.ops.nmfx.nm_linear per layer where gradients are needed, or run under "
              "torch.no_grad()");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nmfx_cpu::nm_linear_group", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList,
                                                            at::TensorList, at::IntArrayRef,
                                                            int64_t, int64_t, int64_t,
                                                            at::IntArrayRef)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, values, masks, rows, cols, n, m, dispatch);
}

at::Tensor nm_linear_autograd(const at::Tensor& x, const at::Tensor& values,
                              const at::Tensor& mask, const std::optional<at::Tensor>& bias,
                              int64_t rows, int64_t cols, int64_t n, int64_t m, int64_t dispatch) {
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !(x.requires_grad() || (bias.has_value() && bias->defined() &&
                                          bias->requires_grad())),
              "nmfx_cpu::nm_linear has no backward: x or bias requires grad; call "
              "torch.ops.nmfx.nm_linear where gradients are needed, or run under torch.no_grad()");
  // Through the dispatcher (a fake tensor mode, a tracer, or the CPU kernel below autograd).
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nmfx_cpu::nm_linear", "")
                             .typed<LinearSig>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, values, mask, bias, rows, cols, n, m, dispatch);
}

}  // namespace
}  // namespace nmfx

TORCH_LIBRARY_FRAGMENT(nmfx_cpu, lib) {
  lib.def(
      "nm_linear(Tensor x, Tensor values, Tensor mask, Tensor? bias, int rows, int cols, int n, "
      "int m, int dispatch) -> Tensor");
  lib.def(
      "nm_linear_group(Tensor x, Tensor[] values, Tensor[] masks, int[] rows, int cols, int n, "
      "int m, int[] dispatch) -> Tensor[]");
  lib.def("set_linear_table(int[] bucket_hi, int[] codes) -> ()", &nmfx::set_linear_table);
  lib.def("set_linear_overrides(int count) -> ()", &nmfx::set_linear_overrides);
}

TORCH_LIBRARY_IMPL(nmfx_cpu, CPU, lib) {
  lib.impl("nm_linear", &nmfx::nm_linear_cpu);
  lib.impl("nm_linear_group", &nmfx::nm_linear_group_cpu);
}

TORCH_LIBRARY_IMPL(nmfx_cpu, Autograd, lib) {
  lib.impl("nm_linear", &nmfx::nm_linear_autograd);
  lib.impl("nm_linear_group", &nmfx::nm_linear_group_autograd);
}
