"""Plan -> quantized model -> packed file, and back.

- `apply`: quantize a torch model in place by a plan (fake quantization, exactly the values
  the packed file holds).
- `packing`: bit-packing of integer codes.
- `modules`: packed modules (`QuantLinear`, ...) registered per FP module type.
- `export`, `load`: the packed safetensors file.
- `formats`: the part of a plan other runtimes (GPTQModel, llama.cpp) can express.
"""
