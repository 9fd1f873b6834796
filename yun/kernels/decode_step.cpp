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
