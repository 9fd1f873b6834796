// Composite ops of a decode step, built into both kernel modules (AVX-512 and AVX2: no
// intrinsics here, they call each build's own kernels). At batch 1 a small model's layer
// spends more time in ~25 separate torch calls from Python (3-5 us each) than in its
// elementwise arithmetic; these run the same kernels in one call, so the results are
// those of the separate ops, bit for bit.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// One head's D values -> D int8 values and their float32 scale (an int8 cache row), as
// yun/layers/kv_quant.py quantizes: scale = max(amax, 1e-10) / 127, q = round(x / scale)
// (half to even, as torch.round), both in float32, so the two agree bit for bit.
template <typename T>
void quantize_row(const T* x, int64_t D, int8_t* row) {
  float amax = 1e-10f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(static_cast<float>(x[d])));
  const float scale = amax / 127.f;
  for (int64_t d = 0; d < D; ++d) {
    const float q = std::nearbyint(static_cast<float>(x[d]) / scale);
    row[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, q)));
  }
  std::memcpy(row + D, &scale, sizeof scale);
}

// Token b's k and v heads (src) into slot `slot` of an int8 cache.
template <typename T>
void write_int8(const T* k, int64_t KvH, int64_t D, int8_t* kc, int8_t* vc, int64_t slot) {
  const int64_t row = D + 4;
  for (int64_t h = 0; h < KvH; ++h) {
    quantize_row(k + h * D, D, kc + (slot * KvH + h) * row);
    quantize_row(k + (KvH + h) * D, D, vc + (slot * KvH + h) * row);
  }
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale,
                                     int64_t window);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor rope_neox_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

// qkv: [B, (H + 2 KvH) * D] contiguous, one query token per row (q heads, k heads, v heads);
// cos, sin: [B, D] contiguous rows of the rotary table; cache: [2, NB, BS, KvH, D] (K then
// V, qkv's dtype, or int8 [2, NB, BS, KvH, D + 4]: k and v quantized per token and head
// as they are written); slot_mapping: [B]; block_tables: [B, max_blocks]; context_lens: [B]
// (int64); window: attend to the last `window` positions only (sliding-window layers), 0 =
// all. Rotates q and k in place (neox), writes k and v into their slots, then attends over
// the cache. Returns [B, H * D].
torch::Tensor decode_attention_qkv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                                   torch::Tensor cache, torch::Tensor slot_mapping,
                                   torch::Tensor block_tables, torch::Tensor context_lens,
                                   int64_t num_heads, int64_t num_kv_heads, double scale,
                                   int64_t window) {
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous(),
              "decode_attention_qkv: cache must be a contiguous [2, NB, BS, KvH, D] tensor");
  const bool int8 = cache.scalar_type() == at::kChar;
  const int64_t H = num_heads, KvH = num_kv_heads, D = cache.size(4) - (int8 ? 4 : 0);
  const int64_t B = qkv.size(0), slots = cache.size(1) * cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (H + 2 * KvH) * D &&
                  cache.size(3) == KvH && (int8 || qkv.scalar_type() == cache.scalar_type()),
              "decode_attention_qkv: qkv must be a contiguous [B, (H + 2 KvH) * D] tensor of "
              "the cache's dtype (or an int8 cache)");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == B &&
                  slot_mapping.is_contiguous(),
              "decode_attention_qkv: slot_mapping must be [B] int64");
  auto heads = qkv.view({B, H + 2 * KvH, D});  // [B, H + 2 KvH, D]
  rope_neox_(heads.narrow(1, 0, H + KvH), cos, sin);  // q and k: adjacent, in place
  const int64_t row = KvH * D * qkv.element_size();  // one token's k (or v) in bytes
  const auto* src = static_cast<const char*>(qkv.data_ptr());
  const int64_t src_row = qkv.size(1) * qkv.element_size();
  auto* kc = static_cast<char*>(cache.data_ptr());
  auto* vc = kc + slots * row;
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slot[b] >= 0 && slot[b] < slots, "decode_attention_qkv: slot ", slot[b],
                " outside the cache (", slots, " slots)");
    const char* k = src + b * src_row + H * D * qkv.element_size();
    if (int8) {
      auto* k8 = reinterpret_cast<int8_t*>(kc);
      auto* v8 = k8 + slots * KvH * (D + 4);
      if (qkv.scalar_type() == at::kFloat)
        write_int8(reinterpret_cast<const float*>(k), KvH, D, k8, v8, slot[b]);
      else if (qkv.scalar_type() == at::kBFloat16)
        write_int8(reinterpret_cast<const at::BFloat16*>(k), KvH, D, k8, v8, slot[b]);
      else
        TORCH_CHECK(false, "decode_attention_qkv: an int8 cache needs float32 or bfloat16 qkv");
      continue;
    }
    std::memcpy(kc + slot[b] * row, k, row);
    std::memcpy(vc + slot[b] * row, k + row, row);
  }
  auto out = paged_decode_attention(heads.narrow(1, 0, H), cache[0], cache[1], block_tables,
                                    context_lens, scale, window);  // [B, H, D]
  return out.view({B, H * D});
}

// residual + x, and RMSNorm of that sum: (sum, weight * sum / rms(sum)), like the two
// torch ops a pre-norm decoder layer runs between its blocks. x, residual: [..., D].
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor residual,
                                        torch::Tensor w, double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(),
              "add_rms_norm: x and residual must have the same shape and dtype");
  auto sum = residual + x;
  return {sum, rms_norm(sum, w, eps)};
}

// ---------------------------------------------------------------------------------------
// DecodePlan: every decoder layer of a Llama-style model for one decode step, in one call
// from Python. At batch 1 a 30-layer model makes ~250 Python-level calls per step (module
// dispatch, argument checks, the forward context) around ~240 native ones; the plan holds
// each layer's weights once and runs the same native calls in the same order, so the
// result is the Python path's bit for bit (tests/kernels/test_decode_plan.py). Built by
// yun/layers/decode_plan.py, which decides when a model qualifies.
//
// Quantized matmuls live in the other extension (yun_quant_kernels, quant.cpp); it hands
// out the address of its `matmul`, which this module calls directly (both are built
// against the same torch, in the same process).


torch::Tensor silu_and_mul(torch::Tensor x);
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);

namespace {

using QuantMatmulFn = torch::Tensor (*)(torch::Tensor, torch::Tensor, int64_t, int64_t,
                                        c10::optional<torch::Tensor>, const std::string&,
                                        const std::string&);

constexpr int64_t kF32 = 0, kF16 = 1, kBF16 = 30;  // ggml's float types
constexpr int64_t kSkinnyMaxRows = 4;  // yun/layers/linear.py's SKINNY_MAX_ROWS

bool is_float_type(int64_t q) { return q == kF32 || q == kF16 || q == kBF16; }

// One (possibly fused) linear layer: its parts stacked along the output, as QuantWeight.
struct Linear {
  std::vector<torch::Tensor> parts;  // uint8 [rows, row_bytes], or a float [rows, cols]
  std::vector<int64_t> qtypes;
  int64_t cols = 0;
  c10::optional<torch::Tensor> bias;
  bool dense = false;  // a dense Linear (one float part): the bias goes into its matmul
};

struct Layer {
  torch::Tensor in_norm, post_norm;
  Linear qkv, o, gate_up, down;
  int64_t window = 0;  // 0: full attention
};

class DecodePlan {
 public:
  // native_f32: float32 weights at <= 4 rows take this build's weight-streaming GEMV, as
  // the Python path does when its backend has one (yun/layers/linear.py); else torch's.
  DecodePlan(int64_t matmul_address, std::string isa, std::string activations,
             int64_t num_heads, int64_t num_kv_heads, double scale, double eps,
             bool native_f32)
      : matmul_(reinterpret_cast<QuantMatmulFn>(matmul_address)), isa_(std::move(isa)),
        activations_(std::move(activations)), h_(num_heads), kvh_(num_kv_heads),
        scale_(scale), eps_(eps), native_f32_(native_f32) {
  }

  void add_layer(torch::Tensor in_norm, torch::Tensor post_norm,
                 std::vector<std::vector<torch::Tensor>> parts,
                 std::vector<std::vector<int64_t>> qtypes, std::vector<int64_t> cols,
                 std::vector<c10::optional<torch::Tensor>> biases, int64_t window,
                 std::vector<bool> dense) {
    TORCH_CHECK(parts.size() == 4 && qtypes.size() == 4 && cols.size() == 4 &&
                    biases.size() == 4 && dense.size() == 4,
                "DecodePlan.add_layer: qkv, o, gate_up and down expected");
    Layer l;
    l.in_norm = in_norm;
    l.post_norm = post_norm;
    l.window = window;
    Linear* lins[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
    for (int i = 0; i < 4; ++i) {
      TORCH_CHECK(parts[i].size() == qtypes[i].size() && !parts[i].empty(),
                  "DecodePlan.add_layer: one qtype per part");
      lins[i]->parts = parts[i];
      lins[i]->qtypes = qtypes[i];
      lins[i]->cols = cols[i];
      lins[i]->bias = biases[i];
      lins[i]->dense = dense[i];
      TORCH_CHECK(!dense[i] || (parts[i].size() == 1 && is_float_type(qtypes[i][0])),
                  "DecodePlan.add_layer: a dense linear is one float part");
    }
    layers_.push_back(std::move(l));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: [B, E] (the embeddings), cos/sin: [B, D], caches: one [2, NB, BS, KvH, D] per
  // layer; slot_mapping, block_tables, context_lens: the decode step's metadata ->
  // the last layer's output [B, E] (before the final norm).
  torch::Tensor run(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                    const std::vector<torch::Tensor>& caches, torch::Tensor slot_mapping,
                    torch::Tensor block_tables, torch::Tensor context_lens) {
    TORCH_CHECK(caches.size() == layers_.size(), "DecodePlan.run: ", layers_.size(),
                " layers but ", caches.size(), " caches");
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      torch::Tensor h = rms_norm(x.contiguous(), l.in_norm, eps_);
      torch::Tensor qkv = linear(h, l.qkv);
      torch::Tensor a = decode_attention_qkv(qkv, cos, sin, caches[i], slot_mapping,
                                             block_tables, context_lens, h_, kvh_, scale_,
                                             l.window);
      std::vector<torch::Tensor> sn = add_rms_norm(linear(a, l.o), x, l.post_norm, eps_);
      x = sn[0];
      x = x + linear(silu_and_mul(linear(sn[1], l.gate_up).contiguous()), l.down);
    }
    return x;
  }

 private:
  // As yun/layers/quant_linear.py: each part's matmul, concatenated, then the bias.
  torch::Tensor linear(const torch::Tensor& x, const Linear& lin) const {
    if (lin.dense) {  // as yun/layers/linear.py: the bias inside the matmul
      const torch::Tensor& w = lin.parts[0];
      c10::optional<torch::Tensor> b;
      if (lin.bias.has_value() && lin.bias->defined()) b = lin.bias;
      if (w.scalar_type() == at::kBFloat16 && x.size(0) <= kSkinnyMaxRows)
        return gemv_bf16(x, w, b);
      if (skinny_f32(x, w)) return gemv_f32(x, w, b);
      return at::linear(x, w, b);
    }
    torch::Tensor y;
    if (lin.parts.size() == 1) {
      y = part(x, lin.parts[0], lin.qtypes[0], lin.cols);
    } else {
      std::vector<torch::Tensor> outs;
      outs.reserve(lin.parts.size());
      for (size_t i = 0; i < lin.parts.size(); ++i)
        outs.push_back(part(x, lin.parts[i], lin.qtypes[i], lin.cols));
      y = torch::cat(outs, -1);
    }
    if (lin.bias.has_value() && lin.bias->defined()) y = y + lin.bias->to(y.scalar_type());
    return y;
  }

  torch::Tensor part(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype,
                     int64_t cols) const {
    // bf16 weights at decode: this build's weight-streaming kernel, as the Python path's
    // yun/layers/linear.py picks for <= 4 rows (torch's bf16 matrix-vector product streams
    // at a third of the speed); other float weights: torch.
    if (qtype == kBF16 && x.scalar_type() == at::kBFloat16 && x.size(0) <= kSkinnyMaxRows &&
        w.is_contiguous())
      return gemv_bf16(x, w, c10::nullopt);
    if (qtype == kF32 && skinny_f32(x, w)) return gemv_f32(x, w, c10::nullopt);
    if (is_float_type(qtype)) return at::linear(x, w.to(x.scalar_type()));
    TORCH_CHECK(matmul_ != nullptr, "DecodePlan: a quantized weight, but no quantized matmul");
    torch::Tensor y = matmul_(x, w, qtype, cols, c10::nullopt, isa_, activations_);
    return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
  }

  bool skinny_f32(const torch::Tensor& x, const torch::Tensor& w) const {
    return native_f32_ && w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat &&
           x.size(0) <= kSkinnyMaxRows && w.is_contiguous();
  }

  QuantMatmulFn matmul_;
  std::string isa_, activations_;
  int64_t h_, kvh_;
  double scale_, eps_;
  bool native_f32_;
  std::vector<Layer> layers_;
};

}  // namespace

void register_decode_plan(pybind11::module_& m) {
  // module_local: the AVX-512 and AVX2 modules each have their own (both load in tests).
  pybind11::class_<DecodePlan>(m, "DecodePlan",
                               "every decoder layer of one decode step in one call",
                               pybind11::module_local())
      .def(pybind11::init<int64_t, std::string, std::string, int64_t, int64_t, double,
                          double, bool>(),
           pybind11::arg("matmul_address"), pybind11::arg("isa"),
           pybind11::arg("activations"), pybind11::arg("num_heads"),
           pybind11::arg("num_kv_heads"), pybind11::arg("scale"), pybind11::arg("eps"),
           pybind11::arg("native_f32") = false)
      .def("add_layer", &DecodePlan::add_layer)
      .def("num_layers", &DecodePlan::num_layers)
      .def("run", &DecodePlan::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
