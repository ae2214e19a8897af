// Host launch code of adai::stats, adai::update and adai::v_sum on the CUDA kernels (schemas:
// csrc/op_schemas.h, semantics: docs/design.md): input validation (csrc/op_prologue.h, shared
// with the CPU kernels), the per-launch table (multi_tensor.h) and the launches
// (stats.cu, update.cu). Shared by the CUDA build and the CPU emulator of the kernels: what
// differs between them (streams, staging memory, which tensors are on the device) is behind
// device.h. Also adai::_chunk_table, a CPU test hook exposing the chunk table the kernels use,
// and adai::_upload, the capture-safe copy for the Triton backend's tables.
//
// Per op call: one staging host buffer (pinned, from the caching host allocator), one device
// buffer from the caching device allocator, one asynchronous host-to-device copy and one
// kernel, all on the current stream of the tensors' device. No device-to-host
// synchronisation: the pinned buffer is handed back to the host allocator with an event
// recorded by the copy, so it is not reused before the copy has read it.
//
// While the stream is being captured into a CUDA graph, the table travels as kernel
// arguments instead (upload.cu): a captured copy would read the pinned buffer again at every
// replay, after the host allocator has handed it to someone else. The device buffer then
// comes from the graph's private memory pool and keeps its address across replays.
#include "ops_host.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "../adai_math.h"
#include "../op_prologue.h"
#include "device.h"
#include "elementwise.h"
#include "launchers.h"
#include "multi_tensor.h"

namespace adai {
namespace cuda {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Where an op runs: the device of `t`, its first device tensor, which must be on a device
// these kernels run on.
at::Device op_device(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && device::holds(t), op, ": `", name, "` must be a ", device::kName,
              " tensor");
  return t.device();
}

// Writes the host part of a table (header with a zero counter, prefix sums, metas) to `h`.
void fill_table(uint8_t* h, const TableLayout& layout, const std::vector<int64_t>& prefix,
                const std::vector<TensorMeta>& metas) {
  std::memset(h, 0, layout.host_bytes);
  std::memcpy(h + layout.prefix_off, prefix.data(), sizeof(int64_t) * prefix.size());
  if (!metas.empty()) {
    std::memcpy(h + layout.meta_off, metas.data(), sizeof(TensorMeta) * metas.size());
  }
}

// Builds the table for `metas` and copies it asynchronously into a fresh device buffer
// (returned in `buffer`, which must outlive the launch call) on `stream`: from staging
// memory, or as kernel arguments while the stream is captured. The counter of finished
// blocks is uploaded as 0 (at every replay of a captured call as well).
LaunchTable upload_table(const char* op, const std::vector<TensorMeta>& metas,
                         const at::Device& device, const device::Stream& stream,
                         at::Tensor& buffer, int partial_cols = 1, int tensor_cols = 1) {
  const int64_t n = static_cast<int64_t>(metas.size());
  std::vector<int64_t> numels(metas.size());
  for (size_t i = 0; i < metas.size(); ++i) numels[i] = metas[i].numel;
  std::vector<int64_t> prefix(metas.size() + 1);
  const int64_t total = build_chunk_prefix(numels.data(), n, kChunk, prefix.data());
  TORCH_CHECK(total <= kMaxChunks, op, ": too many elements in one call (", total,
              " chunks of ", kChunk, ")");
  const TableLayout layout = table_layout(n, total, partial_cols, tensor_cols);

  buffer = at::empty({static_cast<int64_t>(layout.total_bytes)},
                     at::TensorOptions().dtype(at::kByte).device(device));
  auto* d = buffer.mutable_data_ptr<uint8_t>();
  at::Tensor host = device::staging(layout.host_bytes, stream.capturing);
  fill_table(host.mutable_data_ptr<uint8_t>(), layout, prefix, metas);
  if (stream.capturing) {
    copy_as_arguments(host.const_data_ptr(), layout.host_bytes, d, stream.handle);
  } else {
    buffer.narrow(0, 0, static_cast<int64_t>(layout.host_bytes))
        .copy_(host, /*non_blocking=*/true);
  }

  LaunchTable t;
  t.prefix = reinterpret_cast<const int64_t*>(d + layout.prefix_off);
  t.metas = reinterpret_cast<const TensorMeta*>(d + layout.meta_off);
  t.counter = reinterpret_cast<unsigned int*>(d);
  t.partials = reinterpret_cast<double*>(d + layout.partial_off);
  t.tensor_sums = reinterpret_cast<double*>(d + layout.tensor_off);
  t.n = n;
  t.total_chunks = total;
  return t;
}

// Uploads the table of `metas` on the current stream of `device` and calls
// launch(table, stream) there. The table's device buffer is freed after the launch is queued:
// the caching allocator reuses it only after the stream's earlier work. partial_cols,
// tensor_cols: table_layout's.
template <typename Launch>
void launch_with_table(const char* op, const std::vector<TensorMeta>& metas,
                       const at::Device& device, const Launch& launch, int partial_cols = 1,
                       int tensor_cols = 1) {
  c10::DeviceGuard guard(device);
  const device::Stream stream = device::current_stream(device);
  at::Tensor buffer;
  const LaunchTable t =
      upload_table(op, metas, device, stream, buffer, partial_cols, tensor_cols);
  launch(t, stream.handle);
}

// The meta of the tensor whose segment is `row`: zero (every uploaded byte is defined) but
// for its step and v_sum slots (step_base null: v_sum reads no step).
TensorMeta slot_meta(const int64_t* row, double* step_base, double* v_sum_base) {
  TensorMeta m;
  std::memset(&m, 0, sizeof(m));
  m.step = step_base != nullptr ? step_base + row[kSlot] : nullptr;
  m.v_sum = v_sum_base + row[kSlot];
  return m;
}

// Where the states of a tensor start in `buffer` (its row of `segments`, checked).
float* at_offset(const at::Tensor& buffer, const int64_t* row) {
  return buffer.mutable_data_ptr<float>() + row[kOffset];
}

// A launch takes one param dtype, of the kernels' three (no float64).
adai::Target launch_target(const at::Device& device) {
  return {device, /*one_dtype=*/true, /*float64=*/false};
}

}  // namespace

void stats_op(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
              const at::Tensor& steps, const at::Tensor& v_sums,
              const std::optional<at::Tensor>& grad_scale, double beta2, double l2,
              const at::Tensor& out,
              const std::optional<at::Tensor>& master) {
  const char* op = "adai::stats";
  const at::Device device = op_device(op, "out", out);
  const adai::OpArgs a = adai::stats_prologue(op, params, grads, segments, steps, v_sums,
                                              master, grad_scale, out, launch_target(device));
  // As adai_math.h sees it (Consts::l2 is a float): an l2 that rounds to 0 is no L2 decay.
  const bool use_l2 = static_cast<float>(l2) != 0.0f;

  double* step_base = steps.mutable_data_ptr<double>();
  double* v_sum_base = const_cast<double*>(v_sums.const_data_ptr<double>());
  std::vector<TensorMeta> metas(a.n);
  double numel = 0.0;
  for (size_t i = 0; i < a.n; ++i) {
    TensorMeta& m = metas[i] = slot_meta(a.rows + kSegmentColumns * i, step_base, v_sum_base);
    m.grad = const_cast<void*>(grads[i].const_data_ptr());
    // With a master copy theta is read from it (the tensor's span, as update's).
    if (use_l2) {
      m.param = a.master != nullptr
                    ? static_cast<void*>(a.master + a.rows[kSegmentColumns * i + kOffset])
                    : const_cast<void*>(params[i].const_data_ptr());
    }
    m.numel = params[i].numel();
    m.aligned = aligned16(m.grad) && aligned16(m.param) ? 1 : 0;
    numel += static_cast<double>(m.numel);
  }

  const adai::Consts c = adai::make_consts(0.0, 0.0, beta2, 0.0, l2, /*decoupled=*/false, 1.0);
  double* row = out.mutable_data_ptr<double>();
  launch_with_table(
      op, metas, device,
      [&](const LaunchTable& t, cudaStream_t stream) {
        launch_stats(t, a.dtype, use_l2, a.master != nullptr, c, beta2, a.grad_scale, numel,
                     row, out.stride(0), stream);
      },
      use_l2 ? kStatsSums : 1, kStatsColumns - 1);
}

void update_op(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
               const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
               const at::Tensor& beta1_prod, const at::Tensor& v_sums,
               const at::Tensor& steps, const at::Tensor& stats,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf,
               const std::optional<at::Tensor>& lr_tensor, double lr, double beta0,
               double beta2, double eps, double weight_decay, bool decoupled,
               double dampening, double max_grad_norm, bool skip_nonfinite,
               const std::optional<at::Tensor>& beta1_prod_max,
               const std::optional<at::Tensor>& master,
               const std::optional<at::Tensor>& rounding_seed,
               const std::optional<at::Tensor>& rounding_index) {
  const char* op = "adai::update";
  const at::Device device = op_device(op, "stats", stats);
  const adai::OpArgs a = adai::update_prologue(
      op, params, grads, segments, exp_avg, exp_avg_sq, beta1_prod, v_sums, steps, stats,
      grad_scale, found_inf, lr_tensor, {beta1_prod_max, master, rounding_seed, rounding_index},
      launch_target(device));
  if (a.n == 0) return;

  double* step_base = steps.mutable_data_ptr<double>();
  double* v_sum_base = v_sums.mutable_data_ptr<double>();
  std::vector<TensorMeta> metas(a.n);
  for (size_t i = 0; i < a.n; ++i) {
    const int64_t* row = a.rows + kSegmentColumns * i;
    TensorMeta& m = metas[i] = slot_meta(row, step_base, v_sum_base);
    m.param = params[i].mutable_data_ptr();
    m.grad = const_cast<void*>(grads[i].const_data_ptr());
    m.exp_avg = at_offset(exp_avg, row);
    m.exp_avg_sq = at_offset(exp_avg_sq, row);
    // A freed beta1_prod (every tensor done) is never indexed: null.
    m.beta1_prod = a.has_beta1_prod ? at_offset(beta1_prod, row) : nullptr;
    m.b_max = a.beta1_prod_max != nullptr ? a.beta1_prod_max + row[kSlot] : nullptr;
    m.master = a.master != nullptr ? a.master + row[kOffset] : nullptr;
    m.round_index = a.rounding_index != nullptr ? a.rounding_index[i] : 0;
    m.numel = params[i].numel();
    m.aligned = aligned16(m.param) && aligned16(m.grad) && aligned16(m.exp_avg) &&
                        aligned16(m.exp_avg_sq) && aligned16(m.beta1_prod) &&
                        aligned16(m.master)
                    ? 1
                    : 0;
  }

  UpdateInputs in{};
  in.grad_scale = a.grad_scale;
  in.found_inf = a.found_inf;
  in.lr_tensor = a.lr_tensor;
  in.stats = stats.const_data_ptr<double>();
  in.rows = stats.size(0);
  in.row_stride = stats.stride(0);
  in.col_stride = stats.stride(1);
  in.c = adai::make_consts(lr, beta0, beta2, eps, weight_decay, decoupled, dampening);
  in.decoupled_wd = decoupled ? weight_decay : 0.0;
  in.max_grad_norm = max_grad_norm;
  in.skip_nonfinite = skip_nonfinite;

  launch_with_table(
      op, metas, device,
      [&](const LaunchTable& t, cudaStream_t stream) {
        launch_update(t, a.dtype, in, beta2, a.master != nullptr, a.rounding_seed, stream);
      },
      /*partial_cols=*/2);
}

void v_sum_op(const at::Tensor& exp_avg_sq, const at::Tensor& segments,
              const at::Tensor& v_sums) {
  const char* op = "adai::v_sum";
  const at::Device device = op_device(op, "exp_avg_sq", exp_avg_sq);
  const adai::OpArgs a =
      adai::v_sum_prologue(op, exp_avg_sq, segments, v_sums, launch_target(device));
  if (a.n == 0) return;
  double* v_sum_base = v_sums.mutable_data_ptr<double>();
  std::vector<TensorMeta> metas(a.n);
  for (size_t i = 0; i < a.n; ++i) {
    const int64_t* row = a.rows + kSegmentColumns * i;
    TensorMeta& m = metas[i] = slot_meta(row, /*step_base=*/nullptr, v_sum_base);
    m.exp_avg_sq = const_cast<float*>(exp_avg_sq.const_data_ptr<float>()) + row[kOffset];
    m.numel = row[kNumel];
    m.aligned = aligned16(m.exp_avg_sq) ? 1 : 0;
  }
  launch_with_table(op, metas, device, [&](const LaunchTable& t, cudaStream_t stream) {
    launch_v_sum(t, stream);
  });
}

// adai::_chunk_table(numels, chunk=-1): for every chunk of a launch over tensors with these
// numels, (tensor index, chunk index within the tensor, first element, end element), as the
// kernels compute it (build_chunk_prefix + locate_chunk). chunk = -1: the kernels' kChunk.
at::Tensor chunk_table(at::IntArrayRef numels, int64_t chunk) {
  if (chunk == -1) chunk = kChunk;
  TORCH_CHECK(chunk > 0, "adai::_chunk_table: chunk must be positive or -1, got ", chunk);
  const int64_t n = static_cast<int64_t>(numels.size());
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(numels[i] >= 0, "adai::_chunk_table: numels[", i, "] is negative");
  }
  std::vector<int64_t> prefix(numels.size() + 1);
  const int64_t total = build_chunk_prefix(numels.data(), n, chunk, prefix.data());
  at::Tensor out = at::empty({total, 4}, at::TensorOptions().dtype(at::kLong));
  auto* o = out.mutable_data_ptr<int64_t>();
  for (int64_t c = 0; c < total; ++c) {
    const ChunkRef r = locate_chunk(prefix.data(), n, c, chunk);
    o[4 * c + 0] = r.tensor;
    o[4 * c + 1] = c - prefix[r.tensor];
    o[4 * c + 2] = r.begin;
    o[4 * c + 3] = r.begin + chunk_len(numels[r.tensor], r.begin, chunk);
  }
  return out;
}

// adai::_upload(src, dst): dst[:] = src's bytes, src a contiguous CPU tensor, dst a contiguous
// device tensor of as many bytes, on the current stream without a synchronisation; as kernel
// arguments while the stream is captured (so the graph keeps the data), else through staging
// memory. The Triton backend's launch tables go through it.
void upload_op(const at::Tensor& src, const at::Tensor& dst) {
  const char* op = "adai::_upload";
  TORCH_CHECK(src.defined() && src.device().is_cpu() && src.is_contiguous(), op,
              ": src must be a contiguous CPU tensor");
  TORCH_CHECK(dst.defined() && device::holds(dst) && dst.is_contiguous(), op,
              ": dst must be a contiguous ", device::kName, " tensor");
  TORCH_CHECK(src.nbytes() == dst.nbytes(), op, ": src has ", src.nbytes(), " bytes but dst has ",
              dst.nbytes());
  if (src.nbytes() == 0) return;
  c10::DeviceGuard guard(dst.device());
  const device::Stream stream = device::current_stream(dst.device());
  if (stream.capturing) {
    copy_as_arguments(src.const_data_ptr(), src.nbytes(), dst.mutable_data_ptr(), stream.handle);
    return;
  }
  at::Tensor host = device::staging(src.nbytes(), /*capturing=*/false);
  host.copy_(src.view({-1}).view(at::kByte));
  dst.view({-1}).view(at::kByte).copy_(host, /*non_blocking=*/true);
}

}  // namespace cuda
}  // namespace adai
