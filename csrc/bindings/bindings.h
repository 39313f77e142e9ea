// The binding files' entry points, called in order from PYBIND11_MODULE
// (module.cc): each registers its functions on the module.
#pragma once
#include <pybind11/pybind11.h>

namespace pk::bind {

void bind_gemm(pybind11::module_& m);       // matmul, pack_lowp, pack_f32 (gemm.cc)
void bind_attention(pybind11::module_& m);  // set_bf16_dtype, attention, decode_attention,
                                            // attention_exp2 (attention.cc)
void bind_encoder(pybind11::module_& m);    // add_layer_norm, embed_layer_norm,
                                            // varlen_attention, pool (encoder.cc)

}  // namespace pk::bind
