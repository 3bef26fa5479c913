"""Output-gradients of every quantizable layer, one segment of the model at a time.

The empirical-Fisher score of a layer needs, per calibration batch and pseudo-label draw, its
input `x` and its output-gradient `g`. Holding them (and the layers' error stacks) for the whole
model at once costs memory in proportion to the model; here the model is cut into segments
(`profilers.blocks`: head, blocks from last to first, stem) and the segments are handed out one
at a time, each with the inputs and output-gradients of its own layers only:

1. one forward pass per batch (no gradients) records each block's input;
2. the head runs on the last block's recorded output, the pseudo-labels are drawn there (same
   order and generator as a whole-model pass), and `dL/dh` at the last block's output is kept
   per batch and draw. A causal LM's head whose logits exceed `HEAD_CHUNK_BYTES` and holds no
   scored layer runs a few positions at a time (`_head_in_chunks`: a 262k-token vocabulary's
   logits of two 512-token windows are 1.07 GB, and the pass held four such tensors), once per
   draw; the draws are the same when the windows are a multiple of 64 positions;
3. each block, last to first, is run again from its recorded input and `dL/dh` is carried back
   through it (`autograd.grad` of the block alone);
4. the stem runs up to the first block and takes the gradient that reached it.

What stays between segments: per batch, the blocks' hidden-state inputs not yet consumed and
one `dL/dh` per draw. What is recomputed: one forward and backward of each block per batch,
which costs about one more forward+backward pass of the model. The gradients are those of the
whole-model pass (same graph, cut at the blocks), so the scores are the same to rounding.

Batches that only feed GPTQ's `H` (`ProfileRun.extra`: calibration text beyond what is scored)
go through the model once more without gradients in step 1, recording each block's input
again; each block segment then runs its block on them (forward only) and hands out their `H`
of its layers with its own, so a layer's `H` covers every calibration batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import Chain, NotAChain, Spilled, find_blocks
from ..capture import Call, capture_calls, check_batch_first
from ..input_hessians import accumulate_hessians, block_hessians, call_hessian
from ..quant.options import needs_hessian
from ..resident import held
from ..tasks import DRAW_ROWS
from .base import CallCounter, ProfileRun
from .replay import BlockInputs, Segment, carry_back, replay_block

__all__ = ["HEAD_CHUNK_BYTES", "SegmentPasses"]

HEAD_CHUNK_BYTES = 256 * 2**20  # float32 logits a chunked head pass computes at once


class SegmentPasses:
    """The segments of a profiling run, last to first (see the module docstring).

    After construction: `counter` has the calls and samples of the forward pass, `first_sample`
    the first sample index of each batch, `segments_of` per target the number of segments it is
    called in (tied weights: more than one), `hessians` the input `H` of such targets (their
    calls are spread over segments), `blocks` the number of blocks the model was cut into.
    With `ship_blocks`, a block segment whose layers can be scored elsewhere (`_ships`) carries
    what replaying the block needs (`Segment.inputs`) instead of its calls and `H`; the block is
    still run here, to carry `dL/dh` back to the blocks before it.
    """

    def __init__(
        self,
        run: ProfileRun,
        *,
        draws: int,
        seed: int,
        stream: bool = True,
        ship_blocks: bool = False,
    ) -> None:
        self.run = run
        self.ship_blocks = ship_blocks
        self.requested = self.draws = draws
        self.exact: int | None = None  # classes, where the task enumerates them instead of drawing
        self.generator = torch.Generator().manual_seed(seed)
        blocks = find_blocks(run.model, run.targets) if stream else []
        try:
            self._record(blocks)
        except NotAChain as e:
            if not blocks:
                raise
            warnings.warn(f"profiling the model as a whole, not block by block: {e}", stacklevel=5)
            self._record([])

    # -- 1. the recording pass -------------------------------------------------------------------

    def _record(self, blocks: list) -> None:
        run = self.run
        self.chain = Chain(blocks)
        self.counter = CallCounter()
        self.first_sample: list[int] = []
        self.hessians: dict[int, Tensor] = {}
        block_of = {id(m): k for k, blk in enumerate(blocks) for m in blk.modules()}
        self.where: dict[int, set[str]] = {}
        # Calls inside one block are only counted here: their activations are not kept.
        counted = {i for i, t in enumerate(run.targets) if len({block_of.get(id(m)) for m in t.modules}) == 1
                   and block_of.get(id(t.modules[0])) is not None}  # fmt: skip
        with torch.no_grad():
            for b, batch in enumerate(run.batches):
                run.report("forward", b, len(run.batches))
                # After the first batch, a head holding no target is not run (nothing is read from it).
                stop = b > 0 and bool(blocks) and not self._head_targets()
                recording = self.chain.recording(stop) if blocks else nullcontext()
                # The first batch's large head runs on its first positions only: the reference the head pass is
                # checked against (a 262k vocabulary's logits of a whole batch are 1.07 GB).
                head = self._large_head(blocks, batch) if b == 0 else None
                short = _first_positions(head, DRAW_ROWS) if head is not None else nullcontext()
                with recording, short, capture_calls(run.targets, batch, isolate=False, shapes_only=counted) as calls:
                    out = Chain.until_stopped(lambda batch=batch: run.task.forward(run.model, batch))
                n = out.shape[0] if out is not None else self.chain.hidden[b][-1].shape[0]  # type: ignore[union-attr]
                check_batch_first(calls, run.targets, n)
                self.first_sample.append(self.counter.samples)
                self.counter.see(calls, n)
                if b == 0:  # a slice of the output, to check the head pass reproduces it
                    self.reference: Tensor | None = _probe(out)
                    self.exact = run.task.exact_draws(out)
                    self.draws = self.exact or self.requested
                    self._locate(calls, block_of)
                    shape = (*out.shape[:-2], self.chain.hidden[0][-1].shape[1], out.shape[-1]) if head else out.shape
                    self._measure(calls, torch.Size(shape), len(run.batches))
                for call in calls:
                    if len(self.where[call.target]) > 1:
                        h = call_hessian(call, batch)
                        if h is not None:
                            prev = self.hessians.get(call.target)
                            self.hessians[call.target] = h if prev is None else prev + h
                del out, calls  # a large vocabulary's logits: not two batches' at once
        run.report("forward", len(run.batches), len(run.batches))
        self.blocks = len(blocks)
        self.segments_of = {i: len(s) for i, s in self.where.items()}
        self._record_extra(blocks, counted)

    def _record_extra(self, blocks: list, in_blocks: set[int]) -> None:
        """One forward pass per batch of `run.extra` (no gradients): `H` of the layers outside
        the blocks, and every block's input for the block segments to take theirs."""
        run = self.run
        self.extra_chain = Chain(blocks)
        self.extra_hessians: dict[int, Tensor] = {}  # targets outside the blocks
        if not run.extra or not needs_hessian(run.quantizer.method):
            return
        with torch.no_grad():
            for b, batch in enumerate(run.extra):
                run.report("hessians", b, len(run.extra))
                recording = self.extra_chain.recording(not self._head_targets()) if blocks else nullcontext()
                with recording, capture_calls(run.targets, batch, isolate=False, shapes_only=in_blocks) as calls:
                    Chain.until_stopped(lambda batch=batch: run.task.forward(run.model, batch))
                accumulate_hessians(self.extra_hessians, [c for c in calls if c.target not in in_blocks], batch)
        run.report("hessians", len(run.extra), len(run.extra))
        if blocks:
            self.extra_chain.free(len(blocks))  # the last block's output: no block reads it
        self.carried_bytes += sum(_nbytes(h) for hs in self.extra_chain.hidden for h in hs if h is not None)

    def _block_extra(self, k: int, wanted: set[int]) -> dict[int, Tensor]:
        """`H` of block `k`'s layers from the batches only `H` reads (block `k` run on each)."""
        chain = self.extra_chain
        if not chain.hidden:
            return {}
        calls = [chain.calls[b][k] for b in range(len(self.run.extra))]
        sums = block_hessians(chain.blocks[k], calls, lambda b: chain.input(b, k), self.run.extra, self.run.targets,
                              wanted)  # fmt: skip
        chain.free(k)
        return sums

    def _locate(self, calls: list[Call], block_of: dict[int, int]) -> None:
        """The segment of every call of the first batch: its block, or the stem before the
        first block and the head after the last."""
        seen_block = False
        for call in calls:
            k = block_of.get(id(call.module))
            if k is not None:
                seen_block = True
                name = f"block {k}"
            elif not self.chain.blocks:
                name = "model"
            else:
                name = "head" if seen_block else "stem"
            self.where.setdefault(call.target, set()).add(name)

    def _measure(self, calls: list[Call], out: torch.Size, batches: int) -> None:
        """Bytes each segment holds (inputs and per-draw output-gradients of its calls), the
        recorded hidden states and gradients between segments, and the head's transient
        tensors (`out`: the shape of the model's output), from the first batch scaled to all
        batches."""
        held: dict[str, int] = {}
        inputs: dict[str, set[int]] = {}
        for call in calls:
            for name in self.where[call.target]:
                if id(call.inp) not in inputs.setdefault(name, set()):
                    inputs[name].add(id(call.inp))
                    held[name] = held.get(name, 0) + _nbytes(call.inp)
                held[name] = held.get(name, 0) + self.draws * call.out.numel() * 4
        self.segment_bytes = {name: n * batches for name, n in held.items()}
        hidden = sum(_nbytes(h) for h in self.chain.hidden[0]) if self.chain.hidden else 0
        last = self.chain.input_bytes(len(self.chain.blocks)) if self.chain.hidden else 0  # per-draw gradients
        self.carried_bytes = (hidden + self.draws * last) * batches
        # The head's output, its softmax, a pseudo-gradient and autograd's copy, per batch (of a
        # chunk of positions where the head runs in chunks; the recording pass holds one output).
        self.head_rows = self._head_rows(out)
        held_out = out.numel() if self.head_rows is None else self.head_rows * out[-1]
        self.transient_bytes = 4 * held_out * 4

    def _head_targets(self) -> bool:
        """Whether a target is called in the head (after the last block)."""
        return any("head" in names for names in self.where.values())

    def _head_rows(self, out: torch.Size) -> int | None:
        """Positions per chunk of the head pass, or None where it runs whole: a causal LM's logits
        (of shape `out`) over `HEAD_CHUNK_BYTES` in a cut model whose head holds no scored layer."""
        causal = getattr(self.run.task, "causal", False)
        if not self.chain.blocks or self._head_targets() or len(out) != 3 or not causal:
            return None
        if out.numel() * 4 <= HEAD_CHUNK_BYTES:
            return None
        fit = HEAD_CHUNK_BYTES // (4 * out[-1])
        return max(DRAW_ROWS, fit // DRAW_ROWS * DRAW_ROWS)

    def _large_head(self, blocks: list, batch: Any) -> nn.Linear | None:
        """A causal LM's output layer (`get_output_embeddings`) when it is no target and its
        logits of `batch` would exceed `HEAD_CHUNK_BYTES` (the first batch's head then runs on
        its first positions, `_first_positions`), else None."""
        run = self.run
        get = getattr(run.model, "get_output_embeddings", None)
        head = get() if blocks and callable(get) and getattr(run.task, "causal", False) else None
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if not isinstance(head, nn.Linear) or not isinstance(ids, Tensor) or ids.dim() != 2:
            return None
        if any(m is head for t in run.targets for m in t.modules):
            return None
        return head if ids.numel() * head.out_features * 4 > HEAD_CHUNK_BYTES else None

    def _targets(self, name: str) -> list[int]:
        return sorted(i for i, names in self.where.items() if name in names)

    # -- 2-4. the segments, last to first -----------------------------------------------------

    def __iter__(self) -> Iterator[Segment]:
        try:
            head = self._head()
        except NotAChain as e:  # only raised before any segment is handed out
            warnings.warn(f"profiling the model as a whole, not block by block: {e}", stacklevel=2)
            self._record([])
            head = self._head()
        yield head
        for k in reversed(range(self.blocks)):
            with held(self.chain.blocks[k]):  # a block read on use stays in memory while its segment is scored
                yield self._block(k)
            self.chain.free(k + 1)
        if self.blocks and self._targets("stem"):
            yield self._stem()

    @property
    def total(self) -> int:
        """Segments handed out."""
        return 1 + self.blocks + (1 if self.blocks and self._targets("stem") else 0)

    @contextmanager
    def _grad_weights(self, targets: list[int]) -> Iterator[None]:
        """The weights of `targets` take part in autograd while the segment runs."""
        weights = [self.run.targets[i].weight for i in targets]
        flags = [w.requires_grad for w in weights]
        try:
            for w in weights:
                w.requires_grad_(True)
            yield
        finally:
            for w, flag in zip(weights, flags, strict=True):
                w.requires_grad_(flag)

    def _head(self) -> Segment:
        run, chain = self.run, self.chain
        name = "head" if chain.blocks else "model"
        seg = Segment(name, self._targets(name))
        wanted = set(seg.targets)
        self.dh: list[list[Tensor]] = []
        with self._grad_weights(seg.targets):
            for b, batch in enumerate(run.batches):
                if self.head_rows is not None:
                    self.dh.append(self._head_in_chunks(b, batch, self.head_rows))
                    seg.seen.append([])
                    continue
                leaf = chain.input(b, len(chain.blocks)).detach().requires_grad_(True) if chain.blocks else None
                stub = chain.stubbed(b, leaf) if leaf is not None else nullcontext()
                with stub, capture_calls(run.targets, batch) as calls, torch.enable_grad():
                    out = run.task.forward(run.model, batch)
                if b == 0 and leaf is not None and not _same(_probe(out), self.reference):
                    raise NotAChain("the head does not reproduce the model's output from the last block's")
                self.reference = None
                draw = lambda d, out=out, batch=batch: run.task.pseudo_gradient(  # noqa: E731
                    out, batch, self.generator, d if self.exact else None)
                seen, dh = carry_back(out, leaf, [c for c in calls if c.target in wanted], draw, self.draws)
                self.dh.append(dh)
                seg.seen.append(seen)
                del calls, out
        return seg

    def _head_in_chunks(self, b: int, batch: Any, rows: int) -> list[Tensor]:
        """`dL/dh` at the last block's output per draw, the head run on `rows` positions of one
        sample at a time (sample-major, as a whole pass draws its signs), once per draw."""
        run, chain = self.run, self.chain
        last = chain.input(b, len(chain.blocks))
        n, length = last.shape[:2]
        dh = [torch.zeros_like(last) for _ in range(self.draws)]
        for d in range(self.draws):
            for i in range(n):
                for a in range(0, length, rows):
                    part = last.detach()[i : i + 1, a : a + rows].requires_grad_(True)
                    with chain.stubbed(b, part), torch.enable_grad():
                        out = run.task.forward(run.model, batch)
                    if out.shape[:2] != part.shape[:2]:
                        raise NotAChain(f"the head's output {tuple(out.shape)} is not per position of its input")
                    if self.reference is not None and not _same(_probe(out), self.reference[i : i + 1, a : a + rows]):
                        raise NotAChain("the head does not reproduce the model's output from the last block's")
                    where = _positions(batch, i, a, a + rows, last.shape[:2])
                    v = run.task.pseudo_gradient(out, where, self.generator)
                    (g,) = torch.autograd.grad(out, part, grad_outputs=v)
                    dh[d][i : i + 1, a : a + rows] = g
                    del out, v, g
            self.reference = None
        return dh

    def _block(self, k: int) -> Segment:
        run, chain = self.run, self.chain
        seg = Segment(f"block {k}", self._targets(f"block {k}"), block=k)
        wanted = set(seg.targets)
        calls = [chain.calls[b][k] for b in range(len(run.batches))]
        input_of = lambda b: chain.input(b, k)  # noqa: E731
        if self._ships(seg.targets):
            extra = self.extra_chain
            m = len(run.extra) if extra.hidden else 0
            extra_inputs, extra_calls = [extra.input(b, k) for b in range(m)], [extra.calls[b][k] for b in range(m)]
            seg.inputs = BlockInputs([input_of(b) for b in range(len(calls))], calls, list(self.dh), extra_inputs,
                                     extra_calls)  # fmt: skip
            input_of = seg.inputs.inputs.__getitem__
            if m:
                extra.free(k)
        # A block scored elsewhere is replayed here only to carry `dL/dh` back: no layer's call kept.
        kept = wanted if seg.inputs is None else set()
        replayed = replay_block(chain.blocks[k], calls, input_of, run.batches, run.targets, kept, self.dh, self.draws)
        for b, (seen, dh) in enumerate(replayed):
            self.dh[b] = dh
            if seg.inputs is None:
                seg.seen.append(seen)
        if seg.inputs is None:
            seg.extra = self._block_extra(k, wanted)
        return seg

    def _ships(self, targets: list[int]) -> bool:
        """With `ship_blocks`, whether a block with these targets is scored elsewhere: each a
        Linear layer of its own, called in this block alone (a block segment then carries `inputs`)."""
        modules = [self.run.targets[i].modules for i in targets]
        alone = all(self.segments_of[i] == 1 for i in targets)
        return self.ship_blocks and alone and all(len(m) == 1 and isinstance(m[0], nn.Linear) for m in modules)

    def _stem(self) -> Segment:
        run, chain = self.run, self.chain
        seg = Segment("stem", self._targets("stem"))
        wanted = set(seg.targets)
        with self._grad_weights(seg.targets):
            for b, batch in enumerate(run.batches):
                with capture_calls(run.targets, batch) as calls, torch.enable_grad():
                    h0 = chain.stem_output(lambda batch=batch: run.task.forward(run.model, batch))
                seen, _ = carry_back(h0, None, [c for c in calls if c.target in wanted], self.dh[b].__getitem__,
                                     self.draws)
                seg.seen.append(seen)
                del calls, h0
        self.dh = []
        return seg


def _positions(batch: Any, i: int, start: int, stop: int, shape: torch.Size) -> Any:
    """Sample `i`, positions `start:stop` of a batch's per-position tensors (its attention mask)."""
    if not isinstance(batch, dict):
        return batch
    return {k: v[i : i + 1, start:stop] if isinstance(v, Tensor) and v.shape[:2] == shape else v
            for k, v in batch.items()}  # fmt: skip


@contextmanager
def _first_positions(head: nn.Module, rows: int) -> Iterator[None]:
    """`head` runs on the first `rows` positions of its input (`[n, positions, features]`)."""

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        return (x[:, :rows], *args[1:]) if isinstance(x, Tensor) and x.dim() == 3 else None

    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _nbytes(t: Tensor | Spilled | None) -> int:
    """Bytes `t` holds in memory (a hidden state kept in the spill file: none)."""
    return t.numel() * t.element_size() if isinstance(t, Tensor) else 0


def _probe(out: Any) -> Any:
    """At most 256 values of each output position (logits over a vocabulary are large)."""
    return out.detach()[..., :256].clone() if isinstance(out, Tensor) else out


def _same(a: Any, b: Tensor | None) -> bool:
    """Whether output `a` agrees with the recorded reference `b`, on the positions `b` holds
    (the first batch's large head recorded only its first ones)."""
    if isinstance(a, Tensor) and b is not None and a.dim() == b.dim() == 3 and a.shape[1] > b.shape[1]:
        a = a[:, : b.shape[1]]
    if not isinstance(a, Tensor) or b is None or a.shape != b.shape:
        return False
    return torch.allclose(a.detach(), b, rtol=1e-4, atol=1e-5)
