// The AVX2 build of yun's native CPU kernels (module yun_cpu_kernels_avx2): the same
// functions, names and signatures as the AVX-512 module (yun/kernels/gemv_bf16.cpp),
// for x86-64 CPUs with AVX2 + FMA + F16C. Built with -mavx2 -mfma -mf16c only.
#include <torch/extension.h>

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale,
                                     int64_t window);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor silu_and_mul(torch::Tensor x);
torch::Tensor rope_neox_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

torch::Tensor decode_attention_qkv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                                   torch::Tensor cache, torch::Tensor slot_mapping,
                                   torch::Tensor block_tables, torch::Tensor context_lens,
                                   int64_t num_heads, int64_t num_kv_heads, double scale,
                                   int64_t window);
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor residual,
                                        torch::Tensor w, double eps);

void prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor block_tables, torch::Tensor q_starts, torch::Tensor q_lens,
                       torch::Tensor ctx_lens, torch::Tensor out, double scale, int64_t window);
void register_decode_plan(pybind11::module_& m);  // decode_step.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = "avx2";
  m.def("gemm_bf16", &gemm_bf16, "x @ w.T for bfloat16 weights, many rows (AVX2)");
  m.def("gemv_bf16", &gemv_bf16, "skinny x @ w.T for bfloat16 weights (AVX2)");
  m.def("gemv_f32", &gemv_f32, "skinny x @ w.T for float32 weights (AVX2)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention read straight from the paged KV cache (AVX2)", py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("window") = 0);
  m.def("rms_norm", &rms_norm, "RMSNorm in one pass (float32/bfloat16, AVX2)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over a fused [T, 2I] projection (AVX2)");
  m.def("rope_neox_", &rope_neox_, "neox rotary embedding, in place (AVX2)");
  m.def("decode_attention_qkv", &decode_attention_qkv,
        "rotary, KV-cache write and decode attention over a fused QKV output (decode_step.cpp)",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("cache"),
        py::arg("slot_mapping"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("scale"),
        py::arg("window") = 0);
  m.def("add_rms_norm", &add_rms_norm, "(residual + x, RMSNorm of it) in one call");
  m.def("prefill_attention", &prefill_attention,
        "causal prefill attention of every prompt chunk of a step, from the paged KV cache "
        "(prefill_attention.cpp), into out", py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("q_starts"), py::arg("q_lens"),
        py::arg("ctx_lens"), py::arg("out"), py::arg("scale"), py::arg("window") = 0);
  register_decode_plan(m);
}
