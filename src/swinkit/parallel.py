"""Images in parallel: a CPU batch of the fused path split across worker threads, one core each.

PyTorch spreads every operation over its intra-op threads and joins them at the end of it. Swin's
fused path issues thousands of small operations per batch (per-head matmuls and softmaxes,
layer norms and gathers on one image's tokens), many below PyTorch's grain size, so they run on
one core while the others wait, and each of the rest pays a fork and a join. Images are
independent, so the batch is split instead: each worker thread runs its share of the images from
start to end with one intra-op thread, and every core stays busy (1.02-1.14x on two cores across
runs, see benchmarks/RESULTS.md). Each image's numbers are those of the serial fused path up to the
rounding of matrix products of another row count.

Workers copy the caller's thread-local state that matters (inference mode, CPU autocast: 1.14x
for Swin-T under bfloat16 autocast on an AVX-512 BF16 CPU).

Training (autograd on, training mode) splits too: each worker builds its share's graph, and one
autograd node (:class:`_SharesFunction`) joins them. Its backward runs every share's backward in
its worker and returns the parameter gradients summed in a fixed order (added up while the
backwards run, so that one set is held instead of one per share, and into a share's own gradient
where swinkit's backward made it: no fresh memory to fault in), so gradient scalers, DDP and
``torch.autograd.grad`` see one ordinary node with ordinary gradients. Stochastic depth draws from
one generator per share, seeded from the caller's generator: a run is as reproducible as a serial
one (the masks differ from the serial path's). Dropout other than stochastic depth, gradient
checkpointing, module hooks and parameters' tensor hooks (they would see shares, in threads) keep
a batch serial; so do tracing, being inside a worker, one thread or one image.
``model.image_parallel = False`` turns splitting off (for callers that run their own threads).
A function of more batch tensors than the images splits them alike (``run_split``'s ``extras``:
SimMIM's masks, :meth:`swinkit.pretrain.SimMIM.reconstruct`).

``model.compile()`` (:func:`compile_forward`) compiles the forward each share runs, so that a
compiled model splits too: ``torch.compile(model)`` traces the split away and runs the batch whole.
The first batch of each kind runs one share of each size alone first, so that the workers compile
its graphs once; dynamo's reordering of a function's compiled graphs is turned off, process-wide,
so that workers looking up one function at once all find them (:func:`_keep_cache_order`).

The workers flush subnormal floats to zero (``torch.set_flush_denormal``, in these threads only:
the caller's own threads keep their mode). The shift mask's -100 makes attention probabilities
near 1e-38 / sum, below float32's normal range, and every product with such a number takes a
microcode assist; flushing them made a Swin-T training step 1.04x faster with the native kernel
(which flushes them itself) and 1.13x without it, SwinV2-T's 1.08x (benchmarks/RESULTS.md).
Results move by less than 1.2e-38 per value. ``FLUSH_SUBNORMALS = False`` keeps them.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .attention import resolve_impl

_local = threading.local()

FLUSH_SUBNORMALS = True  # in the worker threads (see the module docstring)
# A split training batch's parameter gradients are summed into a share's own gradient where swinkit's
# backward made it (sole_gradient); False: always into a fresh tensor (the same bits, slower).
ADD_IN_PLACE = True
_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)


def _worker_setup() -> None:
    _local.worker = True
    torch.set_num_threads(1)  # this thread's OpenMP and MKL setting (both thread-local)
    # PyTorch sets a thread's OpenMP team lazily, on its first parallel operation, from the
    # process-wide count just set: do it now, before the caller restores that count.
    torch.ones(1 << 16).add_(1)


def worker_pool() -> ThreadPoolExecutor:
    """The shared pool, one worker per intra-op thread (``torch.get_num_threads()``); callers submit
    as many shares as they need, up to that. Rebuilt after a fork (threads do not survive one) or
    when the thread count changes (the old pool's threads are let go)."""
    global _pool
    workers = max(1, torch.get_num_threads())
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            executor = ThreadPoolExecutor(workers, thread_name_prefix="swinkit-images")
            # Start every worker now, each waiting on the barrier so that no thread runs two setups.
            barrier = threading.Barrier(workers)
            list(executor.map(lambda _: (_worker_setup(), barrier.wait()), range(workers)))
            torch.set_num_threads(workers)  # the process-wide count, as the caller had it
            _pool = (os.getpid(), workers, executor)
        return _pool[2]


def image_splits(model: torch.nn.Module, x: Tensor) -> int:
    """How many worker threads to split ``x``'s batch over (1: run it as it is).

    Only the fused path splits: the other paths work on whole-batch tensors, large enough for
    PyTorch's own threading. With autograd on, only a model in training mode splits.
    """
    if (
        not getattr(model, "image_parallel", False)
        or resolve_impl(model.layers[0].blocks[0].attn.attn_impl, x.device) != "fused"
        or x.device.type != "cpu"
        or x.shape[0] < 2
        or (torch.is_grad_enabled() and not model.training)  # eval with autograd: explanations look inside
        or (model.training and not torch.is_grad_enabled())  # rare; dropout would draw in another order
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or getattr(_local, "worker", False)
        or _hooked(model)
        or (model.training and not _training_splits(model))
    ):
        return 1
    return min(torch.get_num_threads(), x.shape[0])


def _hooked(model: torch.nn.Module) -> bool:
    """Module hooks anywhere (or global ones), or tensor hooks on parameters: no split, a hook would
    see shares, in worker threads."""
    from torch.nn.modules import module as torch_module

    global_hooks = (
        torch_module._global_forward_hooks,
        torch_module._global_forward_pre_hooks,
        torch_module._global_backward_hooks,
        torch_module._global_backward_pre_hooks,
    )
    if any(global_hooks):
        return True
    if any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in model.modules()
    ):
        return True
    # A parameter's tensor hook would see each share's gradient, and then their sum once more.
    return any(p._backward_hooks for p in model.parameters())


def _training_splits(model: torch.nn.Module) -> bool:
    """No active dropout (its random numbers come from the global generator, no per-share one) and
    no gradient checkpointing (it reruns blocks in the backward, outside the workers)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            return False
        if getattr(module, "grad_checkpointing", False):
            return False
    return True


def generator() -> torch.Generator | None:
    """The random generator of this share of a split training batch (None: the default one)."""
    return getattr(_local, "generator", None)


def drop_path_scales(x: Tensor, p: float) -> Tensor:
    """Per sample of ``x``, 0 (dropped, probability ``p``) or ``1 / (1 - p)``, shaped to broadcast over it.

    A split training batch draws from its share's generator, else the default one. A torch.compile
    graph on the CPU draws through an operator (``swinkit::drop_path_scales``) that runs when the
    graph does, in its worker: dynamo cannot trace a generator, and inductor's own random numbers
    come from the process's generator, which two shares would draw from in either order.
    """
    if x.device.type == "cpu" and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return torch.ops.swinkit.drop_path_scales(x.detach(), p)
    return _draw_scales(x, p)


def _draw_scales(x: Tensor, p: float) -> Tensor:
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p, generator=generator())
    return keep.div_(1.0 - p)


# Tagged as drawing random numbers: the graph keeps every call (no two merged as equal) and saves
# the draw for the backward instead of drawing again. Each draw takes the branch's output (detached)
# so that it comes after the previous block's in the graph, in the eager path's order: a compiled
# share draws the same masks as an eager one.
@torch.library.custom_op(
    "swinkit::drop_path_scales", mutates_args=(), device_types="cpu", tags=(torch.Tag.nondeterministic_seeded,)
)
def _drawn_scales(x: Tensor, p: float) -> Tensor:
    """:func:`drop_path_scales`, drawn when a compiled graph runs."""
    return _draw_scales(x, p)


@_drawn_scales.register_fake
def _(x: Tensor, p: float) -> Tensor:
    return x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1))


# -- torch.compile with the split ------------------------------------------------------------------

# model -> its (per-share, whole-batch) compiled forwards, after SwinTransformer.compile. Kept here
# rather than on the model: a deepcopy (EMA, int8) or a pickle of the model stays a plain model.
_compiled: WeakIdKeyDictionary = WeakIdKeyDictionary()


def compile_forward(model: torch.nn.Module, *args: Any, **options: Any) -> None:
    """``torch.compile`` ``model._forward`` (``*args`` and ``**options`` are torch.compile's), in two
    forms: the one a worker thread runs on its share of a split batch, and the one the caller's
    thread runs on a whole batch (a GPU batch, one image, a model with hooks).

    Two copies with code objects of their own, so that dynamo keeps their graphs apart: inductor
    writes its C++ kernels for the thread count of the thread that compiles them, one in a worker,
    all in the caller's.
    """
    share_forward, whole_forward = (torch.compile(_fresh(_run_forward), *args, **options) for _ in range(2))
    _compiled[model] = (share_forward, whole_forward, set())  # and the kinds of batch split so far
    _keep_cache_order()


def _keep_cache_order() -> None:
    """Turn off dynamo's reordering of its compiled entries (process-wide) while workers share them.

    Dynamo keeps a function's compiled graphs in a list and moves the one a call finds to the front.
    A worker looking up the same function meanwhile, its place in the list on an entry that failed,
    then steps from there past the moved entry (now behind it), finds none, and compiles that graph
    again: 1 time in 2 for shares of 2, 2, 1 and 1 images on four workers (a fifth graph of four,
    with one more backward), and each such graph counts toward dynamo's limit of 8 per function.
    Without the reordering, lookups never change the list (new entries go at its end), and entries
    are tried in the order they were compiled. ``torch.utils.checkpoint``'s help names the same
    switch (pytorch/pytorch#166926); torch versions without it keep their order as they do.
    """
    switch = getattr(torch._C._dynamo.eval_frame, "_set_lru_cache", None)
    if switch is not None:
        switch(False)


def _fresh(function: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``function`` with a code object of its own: dynamo keeps its graphs and its limit of
    8 per code object, so each compiled model gets its own (not shared with every other model)."""
    return type(function)(function.__code__.replace(), function.__globals__, function.__name__)


def forward_function(model: torch.nn.Module, split: bool) -> Callable[[Tensor], Any]:
    """The function :meth:`SwinTransformer.forward` runs on a share (``split``) or on the whole batch:
    ``model._forward``, compiled after ``model.compile()``."""
    if torch.compiler.is_compiling():  # torch.compile(model), or torch.export: traced as it is
        return model._forward
    compiled = _compiled.get(model)
    if compiled is None:
        return model._forward
    if split and not torch.is_grad_enabled():
        return functools.partial(_in_chunks, compiled[0], model)
    return functools.partial(compiled[0] if split else compiled[1], model)


# Stage-1 tokens per call of a share's compiled graph without autograd: 4 images of 224. A graph
# runs its images through every block at once, so a share of 8 makes intermediates of 29-39 MB
# (Swin-T's qkv and MLP hidden layer) that cannot stay in cache; the eager path goes a few images at
# a time for the same reason. Paired, batch 16 on two threads: 2, 4 and 8 images per call ran at 0.98x,
# 0.995-1.01x and 0.95-0.96x eager (fewer images leave the later stages' products too few rows).
COMPILED_CHUNK_TOKENS = 4 * 56 * 56


def _shares_alone(model: torch.nn.Module | None, x: Tensor, shares: Sequence[Tensor]) -> list[int]:
    """The ``shares`` of ``x`` to run one at a time before the others: for the first batch of its kind
    (shape, dtype, modes) that compiled ``model`` splits, the first share of each size, forward and
    backward; the others then wait for them. Otherwise none.

    Workers meeting a new shape together would each trace and compile its graphs (dynamo's lock
    serialises its compiles, but the later ones have already missed the cache; AOTAutograd compiles
    a backward when first run, unlocked): the work of a cold start once per worker, and as many of
    the 8 graphs dynamo keeps per function. Waiting, the others find those shares' graphs.
    """
    if not _first_of_its_kind(model, x):
        return []
    sizes = [len(share) for share in shares]
    return [sizes.index(size) for size in dict.fromkeys(sizes)]


def _first_of_its_kind(model: torch.nn.Module | None, x: Tensor) -> bool:
    """Whether ``x`` is the first batch of its kind that compiled ``model`` splits."""
    compiled = _compiled.get(model) if model is not None else None
    if compiled is None:
        return False
    kind = (
        tuple(x.shape),
        x.dtype,
        model.training,
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
    )
    if kind in compiled[2]:
        return False
    compiled[2].add(kind)
    return True


def _map_shares(function: Callable[..., Any], *arguments: list[Any], alone: list[int] | None = None) -> list[Any]:
    """``function`` on each share's arguments in the workers, results in share order; the shares in
    ``alone`` first, one at a time, then the others together."""
    pool = worker_pool()
    calls = list(zip(*arguments, strict=True))
    results = {share: pool.submit(function, *calls[share]).result() for share in alone or []}
    rest = [share for share in range(len(calls)) if share not in results]
    results |= dict(zip(rest, pool.map(lambda share: function(*calls[share]), rest), strict=True))
    return [results[share] for share in range(len(calls))]


def _in_chunks(compiled: Callable[..., Any], model: torch.nn.Module, x: Tensor) -> Any:
    """``compiled(model, x)`` a few images at a time (about :data:`COMPILED_CHUNK_TOKENS` stage-1
    tokens each, in near-equal parts so that no part has one image unless ``x`` has: a graph for
    one image is compiled apart, dynamo specialises size 1), joined again."""
    patch = model.config.patch_size
    tokens = max(1, (x.shape[2] // patch) * (x.shape[3] // patch))
    parts = -(-x.shape[0] // max(1, COMPILED_CHUNK_TOKENS // tokens))
    if parts == 1:
        return compiled(model, x)
    return _join([compiled(model, images) for images in x.tensor_split(parts)])


def _run_forward(model: torch.nn.Module, x: Tensor) -> Any:
    return model._forward(x)


def run_split(
    function: Callable[..., Any],
    x: Tensor,
    parts: int,
    model: torch.nn.Module | None = None,
    extras: Sequence[Tensor] = (),
) -> Any:
    """``function(x, *extras)`` computed on ``parts`` slices of the batch in worker threads, joined again.

    ``function`` returns a tensor or a list / tuple of tensors whose first dimension is the batch.
    ``extras``: more tensors whose first dimension is the batch (a SimMIM mask), sliced alike and
    not differentiated. With autograd on, ``model``'s parameters are the ones whose gradients the
    split returns.
    """
    extra_shares = [list(extra.detach().tensor_split(parts)) for extra in extras]
    if torch.is_grad_enabled():
        if model is None:
            raise ValueError("run_split with autograd on needs the model whose parameters to differentiate")
        parameters = [p for p in model.parameters() if p.requires_grad]
        seeds = torch.randint(2**62, (parts,)).tolist()  # from the caller's generator: reproducible
        alone = _shares_alone(model, x, x.tensor_split(parts))
        spec = _SplitSpec(function, _caller_state(), seeds, alone, extra_shares)
        outputs = _SharesFunction.apply(spec, x, *parameters)
        return outputs if isinstance(outputs, Tensor) else list(outputs)
    in_thread = _caller_state()
    shares = list(x.tensor_split(parts))
    alone = _shares_alone(model, x, shares)
    return _join(_map_shares(functools.partial(in_thread, function), shares, *extra_shares, alone=alone))


def _join(results: list[Any]) -> Any:
    """The outputs of a batch's parts (tensors, or lists / tuples of them) joined along the batch."""
    if isinstance(results[0], Tensor):
        return torch.cat(results)
    return type(results[0])(torch.cat(outputs) for outputs in zip(*results, strict=True))


def _caller_state() -> Callable[..., Any]:
    """A runner of ``function(*args)`` under the caller's grad / inference mode and CPU autocast
    (all thread-local: a worker thread would otherwise run with the defaults)."""
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    autocast_dtype = torch.get_autocast_dtype("cpu")

    def run(function: Callable[..., Any], *args: Any) -> Any:
        torch.set_flush_denormal(FLUSH_SUBNORMALS)
        with (
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
            torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast),
        ):
            return function(*args)

    return run


class _SplitSpec:
    """What :class:`_SharesFunction` needs besides the differentiated tensors: the function, the
    caller's thread state (taken before ``forward``, where autograd is off), one seed per share, the
    shares to run alone first (:func:`_shares_alone`), each extra argument's slices."""

    def __init__(
        self,
        function: Callable[..., Any],
        in_thread: Callable[..., Any],
        seeds: list[int],
        alone: list[int],
        extras: list[list[Tensor]],
    ) -> None:
        self.function, self.in_thread, self.seeds, self.alone = function, in_thread, seeds, alone
        self.extras = extras


class _SharesFunction(torch.autograd.Function):
    """``function(x, *extras)`` with each share of the batch forward and backward in its own worker thread.

    The forward keeps every share's graph; the backward differentiates each in its worker and sums
    the parameter gradients over the shares in share order (the same bits on every run).
    """

    @staticmethod
    def forward(ctx, spec: _SplitSpec, x: Tensor, *parameters: Tensor) -> Any:
        def share(images: Tensor, seed: int, *extras: Tensor) -> tuple[Tensor, Any]:
            images = images.detach().requires_grad_(x.requires_grad)
            _local.generator = torch.Generator().manual_seed(seed)
            try:
                return images, spec.in_thread(spec.function, images, *extras)
            finally:
                _local.generator = None

        shares = list(x.tensor_split(len(spec.seeds)))
        ctx.shares = _map_shares(share, shares, spec.seeds, *spec.extras, alone=spec.alone)
        ctx.alone = spec.alone
        ctx.parameters = parameters
        ctx.single = isinstance(ctx.shares[0][1], Tensor)
        outputs = [_as_tuple(out) for _, out in ctx.shares]
        joined = tuple(torch.cat([o.detach() for o in column]) for column in zip(*outputs, strict=True))
        # An output no share's graph reaches (the map of a frozen stage) stays without gradient.
        ctx.mark_non_differentiable(*(j for j, o in zip(joined, outputs[0], strict=True) if not o.requires_grad))
        return joined[0] if ctx.single else joined

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.shares is None:
            raise RuntimeError(
                "backward through a training batch that swinkit split over threads a second time: its per-thread "
                "graphs are freed by the first backward; set model.image_parallel = False to backward twice "
                "(retain_graph=True) through one forward"
            )
        shares, ctx.shares = ctx.shares, None
        wanted = [p for p, needed in zip(ctx.parameters, ctx.needs_input_grad[2:], strict=True) if needed]
        create_graph = torch.is_grad_enabled()  # backward(create_graph=True): second-order gradients
        parts = len(shares)
        grads_per_share = list(
            zip(*(g.tensor_split(parts) if g is not None else [None] * parts for g in grads), strict=True)
        )

        def differentiate(index: int) -> tuple[Tensor | None, ...]:
            torch.set_flush_denormal(FLUSH_SUBNORMALS)
            images, outputs = shares[index]
            pairs = [
                (o, g)
                for o, g in zip(_as_tuple(outputs), grads_per_share[index], strict=True)
                if g is not None and o.requires_grad
            ]
            inputs = ([images] if images.requires_grad else []) + wanted
            if not pairs:
                return (None,) * len(inputs)
            _local.share = index  # which share a running-sums hook in this thread is given
            try:
                return torch.autograd.grad(
                    [o for o, _ in pairs],
                    inputs,
                    [g for _, g in pairs],
                    retain_graph=create_graph,
                    create_graph=create_graph,
                    allow_unused=True,
                )
            finally:
                _local.share = None  # outside a share's backward, sole_gradient marks nothing

        sums = None if create_graph else _RunningSums(wanted)
        try:
            results = _map_shares(differentiate, list(range(parts)), alone=ctx.alone)
        finally:
            if sums is not None:
                sums.remove_hooks()
        image_grads = None
        if shares[0][0].requires_grad:
            image_grads = torch.cat(
                [
                    r[0] if r[0] is not None else torch.zeros_like(images)
                    for r, (images, _) in zip(results, shares, strict=True)
                ]
            )
            results = [r[1:] for r in results]
        summed = iter(_sum_over_shares(results) if sums is None else sums.totals())
        parameter_grads = [next(summed) if needed else None for needed in ctx.needs_input_grad[2:]]
        return (None, image_grads, *parameter_grads)


def sole_gradient(grad: Tensor) -> Tensor:
    """``grad``, marked as a tensor swinkit's backward made for one parameter's gradient alone (no
    other tensor shares its memory), so that :class:`_RunningSums` may add the other shares' gradients
    into it; marked only inside a share's backward in a worker."""
    if getattr(_local, "share", None) is not None:
        grad._swinkit_sole = True
    return grad


def _is_sole(grad: Tensor) -> bool:
    return ADD_IN_PLACE and getattr(grad, "_swinkit_sole", False)


class _RunningSums:
    """Per parameter, the shares' gradients added up while the shares' backwards still run.

    Collecting every share's whole set of gradients first held one set per share at the end of the
    backward (112 MiB each for Swin-T), the step's peak of memory. A hook on each parameter takes a
    share's gradient as the engine hands it over, gives the engine a zero-size stand-in to keep,
    and adds the gradients in share order as soon as the earlier shares' have arrived (the same
    bits on every run). A share whose graph never reaches a parameter (all its images skipped a
    block) is left out; the later shares' gradients then wait until :meth:`totals`.
    """

    def __init__(self, parameters: list[Tensor]) -> None:
        self.waiting: list[dict[int, Tensor]] = [{} for _ in parameters]
        self.sums: list[Tensor | None] = [None] * len(parameters)
        self.owned = [False] * len(parameters)  # the sum is a tensor of ours (added in place)
        self.next_share = [0] * len(parameters)
        self.locks = [threading.Lock() for _ in parameters]  # contended only by the shares
        self.handles = [p.register_hook(self._taker(i)) for i, p in enumerate(parameters)]

    def _taker(self, index: int) -> Callable[[Tensor], Tensor]:
        def take(grad: Tensor) -> Tensor:
            with self.locks[index]:
                self.waiting[index][_local.share] = grad
                while self.next_share[index] in self.waiting[index]:
                    self._add(index, self.waiting[index].pop(self.next_share[index]))
                    self.next_share[index] += 1
            return grad.new_zeros(()).expand_as(grad)

        return take

    def _add(self, index: int, grad: Tensor) -> None:
        # The engine's gradient may be shared with another path of the graph: written to only where
        # swinkit's own backward made it for this parameter alone (sole_gradient). In place, the sum
        # skips a fresh tensor's page faults (Swin-T's parameters: 37-63 ms into fresh memory, 8 ms
        # in place, one thread); a + b and b + a are the same bits, so adding into either gradient
        # keeps the share order's result.
        total = self.sums[index]
        if total is None:
            self.sums[index], self.owned[index] = grad, _is_sole(grad)
        elif self.owned[index]:
            total.add_(grad)
        elif _is_sole(grad):
            self.sums[index], self.owned[index] = grad.add_(total), True
        else:
            self.sums[index], self.owned[index] = total + grad, True

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()

    def totals(self) -> list[Tensor | None]:
        for index, waiting in enumerate(self.waiting):
            for share in sorted(waiting):
                self._add(index, waiting.pop(share))
        for total in self.sums:  # the parameters' .grad from here: no marks of ours on them
            if total is not None and hasattr(total, "_swinkit_sole"):
                del total._swinkit_sole
        return self.sums


def _as_tuple(outputs: Any) -> tuple[Tensor, ...]:
    return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)


def _sum_over_shares(results: list[tuple[Tensor | None, ...]]) -> list[Tensor | None]:
    """Per parameter, the gradients of the shares added in share order, as graph operations (a
    backward with ``create_graph``, where :class:`_RunningSums`' hooks would cut the graph)."""
    sums = []
    for column in zip(*results, strict=True):
        present = [g for g in column if g is not None]
        sums.append(sum(present[1:], present[0]) if present else None)
    return sums
