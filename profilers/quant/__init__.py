"""Quantizer math: pure tensor functions (`quantize`, `gptq`), the rounding methods behind one
interface (`rounding`), a layer's options and error stacks (`options`), and their exact cost
(`cost`, torch-free)."""
