"""`allocator generate`: run a packed causal LM (greedy decoding, KV cache) and say how fast it ran."""

import time
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ModelError
from .app import app, report

__all__ = ["generate"]


@app.command()
def generate(
    packed: Annotated[
        Path, typer.Argument(metavar="PACKED.safetensors", help="A packed causal LM (written by allocator apply).")
    ],
    *,
    tokenizer: Annotated[
        str,
        typer.Option(metavar="MODEL", help="Where the tokenizer comes from: a built-in model, a .gguf file or a"
                     " Hugging Face folder (the model the plan was made for)."),
    ] = "smollm2",
    prompt: Annotated[str, typer.Option(help="The text to continue.")] = "The printing press was invented",
    tokens: Annotated[int, typer.Option(min=1, max=4096, help="New tokens to generate.")] = 32,
    kernels: Annotated[
        bool,
        typer.Option("--kernels/--no-kernels", help="Linear layers on the int4 CPU kernels (bfloat16 activations), or"
                     " every layer dequantizing its float32 weight on each call (slow, exact)."),
    ] = True,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads. [default: torch's own]")] = None,
) -> None:
    """Continue a prompt with a packed causal LM (greedy, KV cache) and print the tokens per second of the prompt
    and of the generation, and how many layers ran on the int4 kernels."""
    import torch

    from ..quantized.kernels import kernel_report
    from ..quantized.load import load_quantized
    from ..sources.models import load_tokenizer

    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer)
    model = load_quantized(packed, kernels=kernels)
    if not hasattr(model, "generate"):
        raise ModelError(f"{packed} holds a {type(model).__name__}, not a causal LM that generates text")
    loading = time.perf_counter() - t0
    where = kernel_report(model)
    on_kernel = sum(w.startswith("int4") for w in where.values())
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    stamps = _Stamps()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, use_cache=True, streamer=stamps,
                             pad_token_id=pad)  # fmt: skip
    new = out[0, ids.shape[1] :]
    report.line(prompt + tok.decode(new, skip_special_tokens=True))
    first, steps = stamps.times[0], stamps.times[1:]
    report.line(f"prompt: {ids.shape[1]} tokens in {first - stamps.start:.2f}s"
                f" ({ids.shape[1] / (first - stamps.start):.0f} tokens/s)")  # fmt: skip
    if steps:
        report.line(f"generation: {len(steps)} tokens after the first in {steps[-1] - first:.2f}s"
                    f" ({len(steps) / (steps[-1] - first):.1f} tokens/s)")  # fmt: skip
    report.line(f"{on_kernel} of {len(where)} packed layers on the int4 kernel; loaded in {loading:.1f}s")


class _Stamps:
    """A `generate` streamer that records when each new token came (the first after the prompt)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: object) -> None:
        if not self._prompt_seen:  # the first call hands over the prompt
            self._prompt_seen, self.start = True, time.perf_counter()
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass
