// Torch binding of the QUICK GEMM: checks every tensor (the message names it), allocates the
// output and the split-K workspace from PyTorch's allocator (so CUDA-graph capture works), and
// launches on the current stream. Exposed to Python as vllm_quick._C.gemm, which
// vllm_quick/ops.py (kernel_gemm) calls for the CUDA implementation of the quick::gemm custom op.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "quick_gemm.h"
#include "quick_layout.cuh"

namespace {

// Errors are returned, not thrown: gemm() and dequantize() give Python (result, "") or
// (None, message) and vllm_quick/ops.py raises. The message is built from strings and
// std::to_string only, never with an iostream: on the H100 image (torch 2.11, this extension built
// with its g++), formatting an integer through std::ostream (c10::str, TORCH_CHECK's message)
// crashed the process. cuda-gdb showed std::ostream::_M_insert<long>, instantiated inside this
// .so, calling through the locale's num_put facet into an unrelated libstdc++ function
// (codecvt<char16_t>::do_unshift): our copy of the template and the process's libstdc++ disagree
// on the facet's layout. Strings alone never reached the facet, which is why some errors worked.
void append(std::string& out, const char* v) { out += v; }
template <typename I>
  requires std::is_integral_v<I>
void append(std::string& out, I v) {
  out += std::to_string(v);
}
void append(std::string& out, c10::IntArrayRef v) {
  out += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(v[i]);
  }
  out += ']';
}
void append(std::string& out, const c10::Device& v) { out += v.str(); }

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

// QUICK_REQUIRE returns the message, prefixed with the enclosing function's kWhere, from a
// function that returns std::string.
#define QUICK_REQUIRE(cond, ...)                                          \
  do {                                                                    \
    if (!(cond)) return message(kWhere, __VA_ARGS__);                     \
  } while (0)

const char* dtype_name(torch::ScalarType t) {
  switch (t) {
    case torch::kHalf: return "float16";
    case torch::kBFloat16: return "bfloat16";
    case torch::kFloat: return "float32";
    case torch::kInt: return "int32";
    default: return "another dtype";
  }
}

std::string cuda_error(const char* kWhere, const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  QUICK_REQUIRE(t.is_cuda(), name, " must be a CUDA tensor");
  QUICK_REQUIRE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  QUICK_REQUIRE(t.is_contiguous(), name, " must be contiguous");
  return "";
}

// Split-K tile counters: zeroed once per device, and every launch leaves them zero again.
// Sized for the largest grid plan() ever splits (it only splits grids smaller than the GPU's
// resident-block capacity, a few thousand at most).
constexpr int64_t kCounterSlots = 1 << 16;

int* split_counters(const torch::Tensor& x, int needed) {
  static std::mutex mutex;
  static std::vector<torch::Tensor> per_device;
  if (needed > kCounterSlots) return nullptr;  // plan() never asks for this many (see above)
  std::lock_guard<std::mutex> lock(mutex);
  const int dev = x.get_device();
  if (static_cast<int>(per_device.size()) <= dev) per_device.resize(dev + 1);
  if (!per_device[dev].defined()) {
    per_device[dev] = torch::zeros({kCounterSlots}, x.options().dtype(torch::kInt32));
  }
  return per_device[dev].data_ptr<int>();
}

}  // namespace

// Why the kernel cannot take these arguments, or "" when it can.
std::string gemm_error(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& qzeros,
                       const torch::Tensor& scales, const c10::optional<torch::Tensor>& bias,
                       int64_t group_size, int64_t size_n, int64_t tile) {
  constexpr const char* kWhere = "quick::gemm: ";
  QUICK_REQUIRE(x.is_cuda(), "x must be a CUDA tensor");
  QUICK_REQUIRE(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) == x.size(1),
                "x must be a contiguous [M, K] matrix, got sizes ", x.sizes(), " strides ", x.strides());
  QUICK_REQUIRE(x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kBFloat16,
                "x must be float16 or bfloat16, got ", dtype_name(x.scalar_type()));
  QUICK_REQUIRE(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
  for (const auto& [t, name] : {std::pair{&qweight, "qweight"}, {&qzeros, "qzeros"}, {&scales, "scales"}}) {
    std::string e = cuda_error(kWhere, *t, name, x);
    if (!e.empty()) return e;
  }
  const int64_t k = x.size(1);
  QUICK_REQUIRE(qweight.scalar_type() == torch::kInt32 && qweight.dim() == 3 &&
                    qweight.size(0) * quick::kTileK == k && qweight.size(2) == quick::kWordsPerTile,
                "qweight must be int32 [K/16, N/64, 128] with K=", k, ", got ", qweight.sizes());
  const int64_t n = qweight.size(1) * quick::kTileN;
  QUICK_REQUIRE(k % 64 == 0, "K=", k, " must be a multiple of 64 (the kernel's k stage)");
  QUICK_REQUIRE(group_size > 0 && (group_size == 32 || group_size % 64 == 0) && k % group_size == 0,
                "group_size=", group_size, " must be 32 or a multiple of 64 dividing K=", k);
  const int64_t groups = k / group_size;
  QUICK_REQUIRE(scales.scalar_type() == torch::kHalf && scales.dim() == 2 && scales.size(0) == groups &&
                    scales.size(1) == n,
                "scales must be float16 [", groups, ", ", n, "], got ", dtype_name(scales.scalar_type()), " ",
                scales.sizes());
  QUICK_REQUIRE(qzeros.scalar_type() == torch::kInt32 && qzeros.dim() == 2 && qzeros.size(0) == groups &&
                    qzeros.size(1) == n / 8,
                "qzeros must be int32 [", groups, ", ", n / 8, "], got ", qzeros.sizes());
  QUICK_REQUIRE(size_n > n - quick::kTileN && size_n <= n && size_n % 2 == 0,
                "size_n=", size_n, " must be even and within the last 64-column tile of N=", n);
  if (bias.has_value()) {
    std::string e = cuda_error(kWhere, *bias, "bias", x);
    if (!e.empty()) return e;
    QUICK_REQUIRE(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == size_n,
                  "bias must be [", size_n, "] of x's dtype ", dtype_name(x.scalar_type()), ", got ",
                  dtype_name(bias->scalar_type()), " ", bias->sizes());
  }
  const quick::ActType act =
      x.scalar_type() == torch::kBFloat16 ? quick::ActType::kBFloat16 : quick::ActType::kFloat16;
  QUICK_REQUIRE(quick::tile_supports(static_cast<int>(tile), act), "tile=", tile, " (",
                quick::tile_name(static_cast<int>(tile)), ") is not a tile configuration for ",
                dtype_name(x.scalar_type()), " (see TILES; -1 chooses by M)");
  QUICK_REQUIRE(quick::tile_runs_on(static_cast<int>(tile), x.get_device()), "tile=", tile, " (",
                quick::tile_name(static_cast<int>(tile)), ") needs an sm_90 GPU (Hopper wgmma)");
  return "";
}

// Why `out` cannot take y = [M, size_n] in x's dtype, or "".
std::string out_error(const torch::Tensor& out, const torch::Tensor& x, int64_t size_n) {
  constexpr const char* kWhere = "quick::gemm: ";
  std::string e = cuda_error(kWhere, out, "out", x);
  if (!e.empty()) return e;
  QUICK_REQUIRE(out.scalar_type() == x.scalar_type() && out.dim() == 2 && out.size(0) == x.size(0) &&
                    out.size(1) == size_n,
                "out must be [", x.size(0), ", ", size_n, "] of x's dtype ", dtype_name(x.scalar_type()), ", got ",
                dtype_name(out.scalar_type()), " ", out.sizes());
  QUICK_REQUIRE(reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0, "out must be 4-byte aligned");
  return "";
}

// (y, "") on success, (None, message) otherwise; vllm_quick.ops.kernel_gemm raises the message.
// `out`, when given, receives y (a contiguous [M, size_n] of x's dtype, e.g. a block of rows of a
// larger output: ops.py's row split) and is returned.
std::tuple<c10::optional<torch::Tensor>, std::string> gemm(
    const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& qzeros,
    const torch::Tensor& scales, const c10::optional<torch::Tensor>& bias, int64_t group_size,
    int64_t size_n, int64_t tile, const c10::optional<torch::Tensor>& out) {
  std::string error = gemm_error(x, qweight, qzeros, scales, bias, group_size, size_n, tile);
  if (error.empty() && out.has_value()) error = out_error(*out, x, size_n);
  if (!error.empty()) return {c10::nullopt, error};
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(1) * quick::kTileN;
  const quick::ActType act =
      x.scalar_type() == torch::kBFloat16 ? quick::ActType::kBFloat16 : quick::ActType::kFloat16;

  const at::cuda::OptionalCUDAGuard guard(x.device());
  torch::Tensor y = out.has_value() ? *out : torch::empty({m, size_n}, x.options());
  if (m == 0) return {y, ""};

  quick::GemmProblem problem{static_cast<int>(m), static_cast<int>(k), static_cast<int>(n),
                             static_cast<int>(size_n), static_cast<int>(group_size), act,
                             static_cast<int>(tile)};
  const quick::GemmPlan plan = quick::plan(problem, x.get_device());
  torch::Tensor partials;
  quick::GemmArgs args{x.data_ptr(), qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(),
                       bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), nullptr, nullptr};
  torch::Tensor x16, abs_max;
  if (quick::tile_takes_fp16_activations(static_cast<int>(tile), act)) {
    // bf16 into an fp16-only tile (the ws tiles, s16m, s32m): an exact fp16 copy, row i times 2^e_i, undone
    // in the tile's epilogue.
    x16 = torch::empty({m, k}, x.options().dtype(torch::kHalf));
    abs_max = torch::empty({m}, x.options().dtype(torch::kInt32));
    const quick::Fp16ActArgs scale_args{x.data_ptr(), x16.data_ptr(), reinterpret_cast<unsigned*>(abs_max.data_ptr<int>()),
                                        static_cast<int>(m), static_cast<int>(k)};
    const cudaError_t err = quick::scale_bf16_to_fp16(scale_args, c10::cuda::getCurrentCUDAStream());
    if (err != cudaSuccess)
      return {c10::nullopt, std::string("quick::gemm: kernel launch failed (bf16 to fp16): ") + cudaGetErrorString(err)};
    args.x = x16.data_ptr();
    args.act_row_abs_max = reinterpret_cast<const unsigned*>(abs_max.data_ptr<int>());
  }
  if (plan.partial_floats > 0) {  // split-K through global memory (not in a cluster)
    partials = torch::empty({static_cast<int64_t>(plan.partial_floats)}, x.options().dtype(torch::kFloat32));
    args.partials = partials.data_ptr<float>();
    args.counters = split_counters(x, plan.counters);
    if (args.counters == nullptr) return {c10::nullopt, "quick::gemm: split-K plan needs too many counters"};
  }
  const cudaError_t err = quick::run(problem, plan, args, c10::cuda::getCurrentCUDAStream());
  if (err != cudaSuccess) return {c10::nullopt, std::string("quick::gemm: kernel launch failed: ") + cudaGetErrorString(err)};
  return {y, ""};
}

std::string dequantize_error(const torch::Tensor& qweight, const torch::Tensor& qzeros,
                             const torch::Tensor& scales, int64_t group_size, torch::ScalarType dtype) {
  constexpr const char* kWhere = "quick::dequantize: ";
  QUICK_REQUIRE(qweight.is_cuda() && qweight.is_contiguous() && qweight.scalar_type() == torch::kInt32 &&
                    qweight.dim() == 3 && qweight.size(2) == quick::kWordsPerTile,
                "qweight must be a contiguous CUDA int32 [K/16, N/64, 128], got ", qweight.sizes());
  for (const auto& [t, name] : {std::pair{&qzeros, "qzeros"}, {&scales, "scales"}}) {
    std::string e = cuda_error(kWhere, *t, name, qweight);
    if (!e.empty()) return e;
  }
  QUICK_REQUIRE(dtype == torch::kHalf || dtype == torch::kBFloat16, "dtype must be float16 or bfloat16");
  const int64_t k = qweight.size(0) * quick::kTileK, n = qweight.size(1) * quick::kTileN;
  QUICK_REQUIRE(group_size > 0 && group_size % quick::kTileK == 0 && k % group_size == 0, "group_size=",
                group_size, " must be a multiple of 16 dividing K=", k);
  QUICK_REQUIRE(scales.scalar_type() == torch::kHalf && scales.size(0) == k / group_size && scales.size(1) == n,
                "scales must be float16 [", k / group_size, ", ", n, "], got ", scales.sizes());
  QUICK_REQUIRE(qzeros.size(0) == k / group_size && qzeros.size(1) == n / 8, "qzeros must be [",
                k / group_size, ", ", n / 8, "], got ", qzeros.sizes());
  return "";
}

// Dense [K, Np] weight in the given dtype, for the large-M paths (dequantise, then cuBLAS):
// (out, "") or (None, message), like gemm().
std::tuple<c10::optional<torch::Tensor>, std::string> dequantize(
    const torch::Tensor& qweight, const torch::Tensor& qzeros, const torch::Tensor& scales,
    int64_t group_size, torch::ScalarType dtype) {
  std::string error = dequantize_error(qweight, qzeros, scales, group_size, dtype);
  if (!error.empty()) return {c10::nullopt, error};
  const int64_t k = qweight.size(0) * quick::kTileK, n = qweight.size(1) * quick::kTileN;
  const at::cuda::OptionalCUDAGuard guard(qweight.device());
  torch::Tensor out = torch::empty({k, n}, qweight.options().dtype(dtype));
  quick::DequantArgs args{qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(), out.data_ptr(),
                          static_cast<int>(k), static_cast<int>(n), static_cast<int>(group_size),
                          dtype == torch::kBFloat16 ? quick::ActType::kBFloat16 : quick::ActType::kFloat16};
  const cudaError_t err = quick::dequantize(args, c10::cuda::getCurrentCUDAStream());
  if (err != cudaSuccess)
    return {c10::nullopt, std::string("quick::dequantize: kernel launch failed: ") + cudaGetErrorString(err)};
  return {out, ""};
}

// How gemm() would cut up a call of M rows on the current CUDA device (for tests and benchmark
// notes): the plan's fields as a dict.
pybind11::dict plan(int64_t m, int64_t k, int64_t n, int64_t group_size, bool bf16, int64_t tile) {
  const quick::GemmProblem problem{static_cast<int>(m), static_cast<int>(k), static_cast<int>(n),
                                   static_cast<int>(n), static_cast<int>(group_size),
                                   bf16 ? quick::ActType::kBFloat16 : quick::ActType::kFloat16,
                                   static_cast<int>(tile)};
  const quick::GemmPlan pl = quick::plan(problem, c10::cuda::current_device());
  pybind11::dict d;
  d["block_m"] = pl.block_m;
  d["splits"] = pl.splits;
  d["stages_per_split"] = pl.stages_per_split;
  d["grid_n"] = pl.grid_n;
  d["grid_m"] = pl.grid_m;
  d["cluster_reduce"] = pl.cluster_reduce;
  d["max_active_clusters"] = pl.max_active_clusters;
  d["blocks"] = pl.blocks;
  d["blocks_per_sm"] = pl.blocks_per_sm;
  d["dp_blocks"] = pl.dp_blocks;
  d["sk_tiles"] = pl.sk_tiles;
  d["sk_blocks"] = pl.sk_blocks;
  d["split_major"] = pl.split_major;
  d["partial_floats"] = pl.partial_floats;
  return d;
}

// The ws blocks' phase times of a diagnostic build (benchmarks/ws_timeline.py), else None.
pybind11::object ws_timeline() {
  auto out = torch::empty({quick::kTimelineSlots, quick::kTimelineBlocks, quick::kTimelineWords}, torch::kInt64);
  if (!quick::read_ws_timeline(reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()))) return pybind11::none();
  return pybind11::cast(out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "QUICK W4A16 GEMM (CUDA); use torch.ops.quick.gemm from vllm_quick.ops";
  module.def("gemm", &gemm, "(y, '') with y = x @ dequant(W) (+ bias) on the interleaved layout, or "
             "(None, error); tile: an index into TILES, or -1 to let the kernel choose by M; out: y's storage, or None", pybind11::arg("x"), pybind11::arg("qweight"),
             pybind11::arg("qzeros"), pybind11::arg("scales"), pybind11::arg("bias"),
             pybind11::arg("group_size"), pybind11::arg("size_n"), pybind11::arg("tile") = -1,
             pybind11::arg("out") = pybind11::none());
  module.def("dequantize", &dequantize, "(dense [K, Np] weight in the given dtype, '') or (None, error)",
             pybind11::arg("qweight"), pybind11::arg("qzeros"), pybind11::arg("scales"),
             pybind11::arg("group_size"), pybind11::arg("dtype"));
  module.def("plan", &plan, "the kernel's plan for a call (splits, cluster_reduce, grid) as a dict; tile -1 = by M",
             pybind11::arg("m"), pybind11::arg("k"), pybind11::arg("n"), pybind11::arg("group_size"),
             pybind11::arg("bf16") = false, pybind11::arg("tile") = -1);
  module.def("ws_timeline", &ws_timeline,
             "diagnostic builds (QUICK_WS_TIMELINE): the ws blocks' phase times as int64 [slot, block, word]; else None");
  module.attr("LAYOUT_VERSION") = quick::kLayoutVersion;
  pybind11::list tiles;
  for (int t = 0; t < quick::kTileCount; ++t) tiles.append(quick::tile_name(t));
  module.attr("TILES") = tiles;  // tile names by index: "x16", ..., "s128" (quick_gemm.cu)
}
