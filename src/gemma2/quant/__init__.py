"""Weight-only int8 and int4 quantization: the layers and their storage format (layers.py), and
`quantize(model, mode)` with the checkpoint's "quantization_config" (model.py)."""

from gemma2.quant.layers import (
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    MODES,
    QUANT_METHOD,
    ROW_BLOCK,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantizedLayer,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from gemma2.quant.model import (
    is_quantized,
    prepare_for_loading,
    quantization_config,
    quantize,
    stored_dtype_tensors,
)

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "GROUP_SIZES",
    "MODES",
    "QUANT_METHOD",
    "ROW_BLOCK",
    "Int4Linear",
    "Int8Embedding",
    "Int8Linear",
    "QuantizedLayer",
    "dequantize_int4",
    "dequantize_int8",
    "is_quantized",
    "pack_int4",
    "prepare_for_loading",
    "quantization_config",
    "quantize",
    "quantize_int4",
    "quantize_int8",
    "stored_dtype_tensors",
    "unpack_int4",
]
