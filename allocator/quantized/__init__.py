"""Plan -> quantized model -> packed file, and back.

- `apply`: quantize a torch model in place by a plan (fake quantization, exactly the values
  the packed file holds).
- `packing`: bit-packing of integer codes.
- `modules`: packed modules (`QuantLinear`, ...) registered per FP module type.
- `kernels`: packed Linear layers on PyTorch's int4 CPU matmul (what `load` gives by default).
- `export`, `load`: the packed safetensors file; `gguf_export`: a GGUF file for llama.cpp.
- `formats`: the part of a plan other runtimes (GPTQModel, llama.cpp) can express.
"""
