"""`allocator convert`: the part of a plan other runtimes can express."""

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import AllocatorError
from .app import app, report
from .setup import check_outputs

__all__ = ["convert"]

_TARGETS = ("gptqmodel", "llama.cpp")


@app.command()
def convert(
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN.json", help="The plan to convert.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="gptqmodel (a QuantizeConfig with `dynamic`) or llama.cpp.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write here instead of printing.")
    ] = None,
) -> None:
    """Write the part of a plan other runtimes can express; notes say what had to be dropped."""
    from profilers.files import atomic_write_text

    from ..planning.plan import Plan
    from ..quantized.formats import gptqmodel_dynamic, llama_cpp_tensor_types

    check_outputs({"--output": output}, [plan_file])
    plan = Plan.load(plan_file)
    if to == "gptqmodel":
        config, notes = gptqmodel_dynamic(plan)
        text = json.dumps(config, indent=1) + "\n"
    elif to in ("llama.cpp", "llamacpp", "gguf"):
        lines, notes = llama_cpp_tensor_types(plan)
        text = "\n".join(lines) + "\n"
    else:
        raise AllocatorError(f"--to takes {' or '.join(_TARGETS)}, got {to!r}")
    if output is None:
        report.out.print(text, end="", highlight=False, soft_wrap=True, markup=False)
    else:
        atomic_write_text(output, text)
        report.wrote(f"{to} settings", output)
    for note in notes:
        report.warn(note)
