"""llama.cpp's block types (GGUF tensor types) as quantization choices.

- `types`: what each type stores (block and sub-block sizes, code range or codebook, how its
  scales are stored) and its exact bytes; torch-free, so a solver-side process prices them.
- `fit`: a tensor's block parameters (fp16 `d`/`dmin`, sub-block scales and mins, E8M0
  exponents) chosen by the importance-weighted error of its rows, and the stored tensor
  (`GgmlTensor`) that codes and parameters make.
- `pack`: a `GgmlTensor` as the bytes llama.cpp reads, block by block.

GPTQ rounds the codes onto a fitted grid with error feedback (`profilers.quant.gptq.gptq_static`).
"""
