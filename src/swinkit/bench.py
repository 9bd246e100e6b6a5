"""``swinkit bench``: throughput, latency and peak memory, side by side with the peers in one run.

Contenders run interleaved in the same process (one timed call each per round), so machine noise
hits them alike; the medians and the ratios to the first peer are what to quote. With
``fresh_processes`` each contender instead times itself in a new process of its own, per round and
in turn, so that what one leaves behind (allocator state, caches, threads) cannot help or hurt
another. Every round also times a large matrix product (repeated), the machine's matrix-multiply
rate under the same noise; each row says what fraction of that rate it reaches (the model's
analytic FLOPs per second, three times the forward's for a training step). Peak memory of a
training step is measured in a fresh process per contender (the maximum resident set size; on a
GPU, the peak of allocated memory).

On a GPU (``device="cuda"``) every call is synchronized before its clock stops, and
``dtype="bfloat16"`` / ``"float16"`` runs every contender under ``torch.autocast`` (the way their
training recipes run mixed precision); the reference product is then in that dtype.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import native
from .attention import resolve_impl
from .export import compile_model, export_onnx_model, onnx_session
from .flops import count_flops
from .quantize import quantize_dynamic
from .variants import SwinConfig, is_whole

# swinkit preset -> the peers' names for the same architecture (Hugging Face: the hub id, for reference;
# the benchmark builds it from swinkit's config, with random weights, offline).
PEERS: dict[str, dict[str, Any]] = {
    "swin_t": {"timm": "swin_tiny_patch4_window7_224", "torchvision": "swin_t", "hf": "microsoft/swin-tiny"},
    "swin_s": {"timm": "swin_small_patch4_window7_224", "torchvision": "swin_s", "hf": "microsoft/swin-small"},
    "swin_b": {"timm": "swin_base_patch4_window7_224", "torchvision": "swin_b", "hf": "microsoft/swin-base"},
    "swinv2_t": {"timm": "swinv2_tiny_window8_256", "torchvision": "swin_v2_t", "hf": "microsoft/swinv2-tiny"},
}


@dataclass
class Contender:
    name: str
    model: nn.Module
    run: Callable[[torch.Tensor], Any]


# The square matrix product timed each round: large enough to run at the BLAS library's full rate;
# repeated so that one measurement lasts about as long as a contender's call (half a second on two
# CPU cores) and sees the same kind of noise from a shared machine. A GPU needs a larger one. A CPU
# without native bfloat16 / float16 products (no AVX512-BF16 / AMX) takes a smaller one in those
# dtypes: there they run 10-100x below float32's rate (AVX2: 0.8 GFLOP/s), and 1536 would take
# 10 s a call, 90 s a mode for the reference alone.
GEMM_SIDE = {"cpu": 1536, "cuda": 8192}
EMULATED_GEMM_SIDE = 512
GEMM_REPEATS = 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --amp's names


@dataclass(frozen=True)
class Target:
    """Where and in which precision the contenders run."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def gemm_side(self) -> int:
        return gemm_side(self.device.type, self.dtype)

    @contextmanager
    def precision(self) -> Iterator[None]:
        """Autocast to ``dtype`` (nothing for float32)."""
        if self.dtype == torch.float32:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def gemm_side(device_type: str, dtype: torch.dtype = torch.float32) -> int:
    """Side of the reference matrix product on ``device_type`` in ``dtype``."""
    if device_type == "cpu" and dtype != torch.float32 and not _native_cpu_products(dtype):
        return EMULATED_GEMM_SIDE
    return GEMM_SIDE.get(device_type, GEMM_SIDE["cpu"])


def _native_cpu_products(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (torch's private probes; False
    where a torch version lacks them)."""
    probes = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes.get(dtype, ()))


def parse_target(device: str = "cpu", dtype: str = "float32") -> Target:
    """``device`` cpu or cuda[:n], ``dtype`` one of :data:`DTYPES`; refused by name otherwise."""
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)} (or bf16, fp16, as --amp names them)")
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; accepted: cpu, cuda, cuda:<index>") from None
    if where.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; accepted: cpu, cuda, cuda:<index>")
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here (torch.cuda.is_available() is False)")
    return Target(where, DTYPES[dtype])


@dataclass
class BenchResult:
    """Per contender: seconds of every timed call (median used), and derived numbers.

    ``gemm_times`` holds the reference matrix product's seconds, one per round.
    """

    mode: str
    batch: int
    times: dict[str, list[float]] = field(default_factory=dict)
    gemm_times: list[float] = field(default_factory=list)
    gemm_side: int = GEMM_SIDE["cpu"]
    # contender -> its error: a contender that fails is left out of the later rounds (the rounds it
    # completed stay), so that one peer that cannot run does not take the others' results with it.
    failures: dict[str, str] = field(default_factory=dict)

    def refuse_if_none_ran(self) -> None:
        """Raise the failures when every contender failed before completing a round."""
        if self.failures and not self.times:
            self.raise_failures()

    def raise_failures(self) -> None:
        """Raise the failures, if any (for callers that take all the contenders or none: a fresh
        process timing one of them, the ablation scripts in benchmarks/)."""
        if self.failures:
            raise RuntimeError("\n".join(self.failures.values()))

    @property
    def gemm_gflops(self) -> float:
        return 2 * self.gemm_side**3 * GEMM_REPEATS / statistics.median(self.gemm_times) / 1e9

    def images_per_second(self, name: str) -> float:
        return self.batch / statistics.median(self.times[name])

    def table(
        self, reference: str | None = None, flops_per_image: float | Callable[[str], float] | None = None
    ) -> list[dict[str, Any]]:
        """One row per contender; ``flops_per_image`` (floating-point operations, not multiply-adds;
        or a function of the contender's name) adds the achieved GFLOP/s and its fraction of the
        measured matrix-multiply rate."""
        reference = reference if reference in self.times else next(iter(self.times))
        base = self.images_per_second(reference)
        rows = []
        for name, times in self.times.items():
            row = {
                "contender": name,
                "mode": self.mode,
                "batch": self.batch,
                "images_per_second": self.images_per_second(name),
                "latency_ms": statistics.median(times) * 1000,
                "ratio": self.images_per_second(name) / base,
                "ratio_to": reference,
                "rounds": len(times),
            }
            flops = flops_per_image(name) if callable(flops_per_image) else flops_per_image
            # An int8 contender's products are not float32 ones: its rate against the float32 GEMM would mislead.
            if flops and self.gemm_times and not name.endswith("+int8"):
                row["gflops"] = self.images_per_second(name) * flops / 1e9
                row["gemm_gflops"] = self.gemm_gflops
                row["gemm_fraction"] = row["gflops"] / self.gemm_gflops
            rows.append(row)
        return rows


def time_gemm(operands: tuple[torch.Tensor, torch.Tensor, torch.Tensor], target: Target = Target()) -> float:
    """Seconds of ``GEMM_REPEATS`` square matrix products (the reference rate)."""
    a, b, out = operands
    target.synchronize()
    start = time.perf_counter()
    for _ in range(GEMM_REPEATS):
        torch.mm(a, b, out=out)
    target.synchronize()
    return time.perf_counter() - start


def gemm_operands(target: Target = Target()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Operands of the reference product: ``target``'s side, device and dtype."""
    side = target.gemm_side
    a, b = (torch.randn(side, side, device=target.device, dtype=target.dtype) for _ in range(2))
    out = torch.empty(side, side, device=target.device, dtype=target.dtype)
    torch.mm(a, b, out=out)  # warm: the output's pages are mapped before the first timed call
    return a, b, out


def _timm(model_name: str, num_classes: int, drop_path_rate: float) -> nn.Module:
    import timm

    name = PEERS[model_name]["timm"]
    return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate)


def _torchvision(model_name: str, num_classes: int, drop_path_rate: float) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, PEERS[model_name]["torchvision"])(weights=None, num_classes=num_classes)
    # torchvision's builders fix the rate (linear over the blocks, up to the preset's); rescaled here.
    depths = [m for m in model.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    top = max(m.p for m in depths)
    for module in depths:
        module.p = module.p * drop_path_rate / top
    return model


def _hf(model_name: str, num_classes: int, drop_path_rate: float) -> nn.Module:
    import transformers

    from .checkpoint.hf import config_dict
    from .variants import get_config

    values = config_dict(get_config(model_name, num_classes=num_classes, drop_path_rate=drop_path_rate))
    if values["model_type"] == "swinv2":
        model = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**values))
    else:
        model = transformers.SwinForImageClassification(transformers.SwinConfig(**values))
    return _LogitsOnly(model)


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _swinkit(model_name: str, num_classes: int, drop_path_rate: float, attn_impl: str | None) -> nn.Module:
    """``attn_impl`` None: the default model; ``serial``: the default without image-parallel threads."""
    from .factory import create_model

    kwargs = {"attn_impl": attn_impl} if attn_impl and attn_impl != "serial" else {}
    model = create_model(model_name, num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
    model.image_parallel = attn_impl != "serial"
    return model


BUILDERS = {"timm": _timm, "torchvision": _torchvision, "hf": _hf}


def skips_dropped_images(name: str, config: SwinConfig, target: Target) -> bool:
    """Whether contender ``name`` trains without computing the residual branches stochastic depth
    drops (swinkit's fused path on the CPU, with no dropout; not under torch.compile)."""
    base, _, variant = name.partition("+")
    family, _, impl = base.partition(":")
    impl = "auto" if impl in ("", "serial") else impl
    return (
        family == "swinkit"
        and not variant
        and target.device.type == "cpu"
        and resolve_impl(impl, target.device) == "fused"
        and config.drop_path_rate > 0
        and config.drop_rate == 0
        and config.attn_drop_rate == 0
    )


# +compile: torch.compile; +ort: exported to onnxruntime; +int8: int8 dynamic quantization of the
# linear layers (swinkit.quantize_dynamic for swinkit, torch.ao's quantize_dynamic on every
# nn.Linear for a peer, as its users would do). The last two are inference-only, on the CPU.
VARIANTS = ("", "compile", "ort", "int8")
INFERENCE_ONLY = ("+ort", "+int8")


def _is_swinkit(name: str) -> bool:
    """Whether contender ``name`` (without its variant) is swinkit: ``swinkit`` or ``swinkit:<impl>``."""
    return name == "swinkit" or name.startswith("swinkit:")


def int8_model(name: str, model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Contender ``name``'s model with int8 dynamic-quantized linear layers: swinkit's own
    :func:`~swinkit.quantize.quantize_dynamic`; for a peer, torch.ao's on every ``nn.Linear`` its
    forward calls (found by running it on one image of ``example``). torchvision's Swin passes its
    attention's qkv and projection weights, and timm's SwinV2 its qkv weight, to ``F.linear`` as
    tensors, which torch.ao's quantized layer does not hold: those layers stay float32, as they
    would for a user of that library (quantizing them too made the forward fail)."""
    if _is_swinkit(name):
        return quantize_dynamic(model)
    from torch.ao.quantization import quantize_dynamic as ao_quantize_dynamic

    called = _called_linears(model, example[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return ao_quantize_dynamic(model.eval(), called, dtype=torch.qint8)


def _called_linears(model: nn.Module, example: torch.Tensor) -> set[str]:
    """The names of the ``nn.Linear`` modules whose own forward ``model(example)`` calls."""
    called = set()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_pre_hook(lambda *_, n=n: called.add(n)) for n, m in linears]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return called


def check_contender(name: str, model_name: str) -> None:
    """Refuse an unknown contender (``base`` or ``base+variant``) by name, before anything is built."""
    base, _, variant = name.partition("+")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} in {name!r}; accepted: +compile, +ort, +int8")
    if _is_swinkit(base):
        return
    if base not in BUILDERS:
        raise ValueError(f"unknown contender {base!r}; accepted: swinkit, swinkit:<attn_impl>, {', '.join(BUILDERS)}")
    if model_name not in PEERS:
        raise ValueError(f"no peer models known for {model_name!r}; peers exist for {', '.join(PEERS)}")


def build(name: str, model_name: str, num_classes: int = 1000, drop_path_rate: float | None = None) -> nn.Module:
    """A contender's model: ``swinkit``, ``swinkit:<attn_impl>``, ``swinkit:serial`` (no image-parallel
    threads), ``timm``, ``torchvision`` or ``hf``.

    Every contender trains with the same stochastic depth rate: ``drop_path_rate``, by default the
    swinkit preset's (the paper's: 0.2 for Swin-T), not each library's own default (timm's is 0).
    """
    check_contender(name, model_name)
    if drop_path_rate is None:
        from .variants import get_config

        drop_path_rate = get_config(model_name).drop_path_rate
    if _is_swinkit(name):
        return _swinkit(model_name, num_classes, drop_path_rate, name.partition(":")[2] or None)
    return BUILDERS[name](model_name, num_classes, drop_path_rate)


def onnxruntime_runner(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    """Export ``model`` to ONNX and return a function that runs it in onnxruntime (CPU).

    Every contender is exported alike: dynamic batch, height and width fixed to the example's
    (the peers' exporters know no other way; swinkit's ``swinkit export --static-size``).
    """
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        export_onnx_model(model, path, example, dynamic_size=False)
        return session_runner(path)


def session_runner(path: str) -> Callable[[torch.Tensor], Any]:
    """A function that runs the ONNX file at ``path`` in onnxruntime (CPU)."""
    session = onnx_session(path)
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x.numpy()})


def inference_contenders(names: list[str], model_name: str, example: torch.Tensor) -> list[Contender]:
    """The models of ``names`` on ``example``'s device, each with the call that runs it."""
    contenders = []
    for name in names:
        base, _, variant = name.partition("+")
        check_contender(name, model_name)
        if variant in ("ort", "int8") and example.device.type != "cpu":
            raise ValueError(f"{name!r}: onnxruntime and int8 contenders run on the CPU, not on {example.device}")
        model = build(base, model_name).eval().to(example.device)
        if variant == "int8":
            run: Callable[[torch.Tensor], Any] = int8_model(base, model, example)
        elif variant == "compile":
            run = compile_model(model)
        elif variant == "ort":
            run = onnxruntime_runner(model, example)
        else:
            run = model
        contenders.append(Contender(name, model, run))
    return contenders


def bench_inference(
    contenders: list[Contender], x: torch.Tensor, rounds: int, warmup: int = 2, target: Target = Target()
) -> BenchResult:
    """Interleaved timing: each round calls every contender once, in turn."""
    result = BenchResult("inference", x.shape[0], gemm_side=target.gemm_side)
    with torch.inference_mode():
        _interleave(result, [(c.name, functools.partial(c.run, x)) for c in contenders], rounds, warmup, target)
    return result


def _interleave(
    result: BenchResult, calls: list[tuple[str, Callable[[], Any]]], rounds: int, warmup: int, target: Target
) -> None:
    """Warm every call up, then per round: the reference matrix product, then each call once, timed."""
    _check_timed([name for name, _ in calls], rounds)
    gemm = gemm_operands(target)
    running = dict(calls)
    with target.precision():
        for name, call in calls:
            try:
                for _ in range(warmup):
                    call()
            except Exception as failure:  # reported with the results; the others go on
                _fail(result, running, name, failure)
        for _ in range(rounds):
            if not running:
                break
            result.gemm_times.append(time_gemm(gemm, target))
            for name, call in list(running.items()):
                try:
                    target.synchronize()
                    start = time.perf_counter()
                    call()
                    target.synchronize()
                except Exception as failure:
                    _fail(result, running, name, failure)
                    continue
                result.times.setdefault(name, []).append(time.perf_counter() - start)
    result.refuse_if_none_ran()


def _check_timed(names: Sequence[str], rounds: int) -> None:
    """Refuse, before anything runs, a timing that would return no results without a word."""
    if not names:
        raise ValueError("no contenders to time: give at least one")
    _check_counts(rounds=rounds)


def _fail(result: BenchResult, running: dict[str, Any], name: str, failure: Exception) -> None:
    # Kept as text: the exception's traceback would hold its frames' tensors (a GPU's memory) for
    # the rest of the run.
    result.failures[name] = f"{name!r} failed:\n" + "".join(traceback.format_exception(failure)).rstrip()
    del running[name]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def training_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW the way each library's own training recipe builds it (lr and weight decay of the Swin recipe).

    swinkit: :func:`swinkit.train.optim.build_optimizer` (what ``swinkit train`` runs); timm: its
    ``create_optimizer_v2`` (what timm's ``train.py`` runs); torchvision and Hugging Face have no
    optimizer factory, so their users' plain ``torch.optim.AdamW``.
    """
    lr, weight_decay = 1e-4, 0.05
    if name.startswith("swinkit"):
        from .train.optim import build_optimizer

        return build_optimizer(model, weight_decay, None, lr=lr)
    if name == "timm":
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def bench_training(
    names: list[str],
    model_name: str,
    x: torch.Tensor,
    rounds: int,
    warmup: int = 1,
    target: Target = Target(),
    drop_path_rate: float | None = None,
) -> BenchResult:
    """Forward + backward + AdamW step, interleaved like :func:`bench_inference` (on ``x``'s device);
    ``drop_path_rate``: see :func:`build`."""
    y = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    setups = []
    for name in names:
        base, _, variant = name.partition("+")
        model = build(base, model_name, drop_path_rate=drop_path_rate).train().to(x.device)
        optimizer = training_optimizer(base, model)
        setups.append((name, compile_model(model) if variant == "compile" else model, optimizer))
    result = BenchResult("training", x.shape[0], gemm_side=target.gemm_side)
    calls = [(name, functools.partial(_train_step, model, optimizer, x, y)) for name, model, optimizer in setups]
    _interleave(result, calls, rounds, warmup, target)
    return result


def bench_in_fresh_processes(
    names: list[str],
    mode: str,
    model_name: str,
    batch: int,
    size: int,
    rounds: int,
    target: Target = Target(),
    calls: int = 3,
    drop_path_rate: float | None = None,
) -> BenchResult:
    """Alternating fresh processes: per round, each contender in a new Python process of its own.

    Each process builds its contender, warms it up and times ``calls`` calls (their median is the
    round's time) after one reference matrix product, so no contender's allocations, caches or
    threads are left behind for the next. ``+ort`` contenders are exported once, here.
    """
    _check_timed(names, rounds)
    for name in names:
        check_contender(name, model_name)
    result = BenchResult(mode, batch, gemm_side=target.gemm_side)
    common = {"mode": mode, "model": model_name, "batch": batch, "size": size, "calls": calls}
    common |= {"device": str(target.device), "dtype": str(target.dtype).removeprefix("torch.")}
    common |= {"threads": torch.get_num_threads(), "drop_path_rate": drop_path_rate}
    with tempfile.TemporaryDirectory() as folder:
        exported = {}
        for name in (n for n in names if n.endswith("+ort")):
            exported[name] = os.path.join(folder, f"{len(exported)}.onnx")
            model = build(name.partition("+")[0], model_name).eval()
            export_onnx_model(model, exported[name], torch.randn(batch, 3, size, size), dynamic_size=False)
        for _ in range(rounds):
            for name in [n for n in names if n not in result.failures]:
                try:
                    seconds, gemm = _time_in_child(common | {"name": name, "onnx": exported.get(name)})
                except ChildFailed as failure:
                    result.failures[name] = str(failure)
                    continue
                result.times.setdefault(name, []).append(seconds)
                result.gemm_times.append(gemm)
    result.refuse_if_none_ran()
    return result


class ChildFailed(RuntimeError):
    """A contender's fresh process exited with an error (its standard error's end in the message)."""


def _time_in_child(spec: dict[str, Any]) -> tuple[float, float]:
    code = "import sys, swinkit.bench as b; b._time_this_process(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise ChildFailed(f"timing {spec['name']!r} in a fresh process failed:\n{done.stderr[-2000:].rstrip()}")
    seconds, gemm = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, gemm


def _time_this_process(spec_json: str) -> None:
    """The child of :func:`bench_in_fresh_processes`: prints ``[median seconds, reference GEMM seconds]``."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    target = parse_target(spec["device"], spec["dtype"])
    name, calls = spec["name"], spec["calls"]
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"], device=target.device)
    if spec["mode"] == "training":
        # Three warm-up steps: the first ones of a fresh process also fault in the optimizer state
        # and the allocator's arenas (1.1-1.3x the steady step on a 2-core CPU, for every contender).
        rate = spec["drop_path_rate"]
        result = bench_training([name], spec["model"], x, calls, warmup=3, target=target, drop_path_rate=rate)
    else:
        run = session_runner(spec["onnx"]) if spec["onnx"] else inference_contenders([name], spec["model"], x)[0].run
        result = BenchResult("inference", x.shape[0], gemm_side=target.gemm_side)
        with torch.inference_mode():
            _interleave(result, [(name, functools.partial(run, x))], calls, 2, target)
    result.raise_failures()  # a child whose contender failed in a later call: no median of the calls before it
    print(json.dumps([statistics.median(result.times[name]), result.gemm_times[0]]))


def peak_training_memory(
    name: str, model_name: str, batch: int, size: int, target: Target = Target(), drop_path_rate: float | None = None
) -> float:
    """MiB of memory a training step adds to a fresh process holding the model and optimizer.

    CPU: resident memory, read from ``VmHWM`` (Linux; ``ru_maxrss`` would carry over the parent's
    peak through exec). GPU: ``torch.cuda.max_memory_allocated``.
    """
    device, dtype = str(target.device), str(target.dtype).removeprefix("torch.")
    code = (
        "import torch, swinkit.bench as b\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"t = b.parse_target({device!r}, {dtype!r})\n"
        f"m = b.build({name!r}, {model_name!r}, drop_path_rate={drop_path_rate!r}).train().to(t.device)\n"
        f"o = b.training_optimizer({name!r}, m)\n"
        f"x = torch.randn({batch}, 3, {size}, {size}, device=t.device)\n"
        f"y = torch.randint(0, 1000, ({batch},), device=t.device)\n"
        "base = b.peak_memory_mib(t)\n"
        "with t.precision():\n"
        "    b._train_step(m, o, x, y); b._train_step(m, o, x, y)\n"
        "print(b.peak_memory_mib(t) - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def peak_memory_mib(target: Target = Target()) -> float:
    """Peak MiB so far: allocated GPU memory on a GPU target, else this process's resident set."""
    if target.device.type == "cuda":
        return torch.cuda.max_memory_allocated(target.device) / 2**20
    return peak_rss_mib()


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (``VmHWM``; ``ru_maxrss`` where /proc is absent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(target: Target = Target()) -> dict[str, Any]:
    """What a report was measured on: device, dtype, torch and Python versions, CPU, threads, GPU,
    native kernel, date."""
    return {
        "device": str(target.device),
        "dtype": str(target.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "native_attention": native.status() if target.device.type == "cpu" else None,
        "date": time.strftime("%Y-%m-%d"),
    }


# Training steps each fresh process times (their median is its round's time): single steps of a
# 2-core VM vary by 10-30%, and 3 of them left the ratio to timm moving by 0.08 between runs.
TRAINING_STEPS_PER_PROCESS = 8


MODES = ("inference", "training")


def _check_counts(**counts: int | None) -> None:
    """Refuse a batch size, round or thread count that is not an int (a bool is not a batch of 1) or
    is below 1, by name (None: the default)."""
    for name, value in counts.items():
        if value is None:
            continue
        if not is_whole(value):
            raise TypeError(f"{name.replace('_', ' ')} must be an int of at least 1, got {value!r}")
        if value < 1:
            raise ValueError(f"{name.replace('_', ' ')} must be at least 1, got {value}")


def _names(value: str | Sequence[str] | None) -> list[str]:
    """A list of names; one name given alone is that one (``compare="timm"``), not its letters."""
    return [value] if isinstance(value, str) else list(value or [])


def run_bench(
    model_name: str = "swin_t",
    batch: int = 16,
    train_batch: int = 8,
    compare: str | Sequence[str] | None = None,
    rounds: int = 7,
    modes: str | Sequence[str] = MODES,
    memory: bool = False,
    threads: int | None = None,
    impls: str | Sequence[str] | None = None,
    compiled: bool = False,
    onnxruntime: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    fresh_processes: bool = False,
    drop_path_rate: float | None = None,
    int8: bool = False,
) -> dict[str, Any]:
    """Benchmark swinkit against ``compare`` peers; returns rows (images/s, latency, ratio to the first peer).

    ``compare``, ``modes`` and ``impls`` are lists of names, or one name as a string (none or an
    empty list of peers: swinkit alone).
    ``impls`` adds swinkit with other ``attn_impl`` values; ``compiled`` adds a ``torch.compile``
    variant of every contender, ``onnxruntime`` an exported one and ``int8`` an int8 dynamic-quantized
    one (those two: inference only, CPU only, float32).
    ``device`` (cpu, cuda) and ``dtype`` (float32, or bfloat16 / float16 under autocast): see
    the module docstring. ``fresh_processes``: each contender times itself in a new process per
    round (:func:`bench_in_fresh_processes`) instead of all in this one. ``drop_path_rate``: the
    stochastic depth rate every contender trains with, by default the preset's (see :func:`build`).
    """
    _check_counts(batch_size=batch, train_batch_size=train_batch, rounds=rounds, threads=threads)
    modes, compare, impls = _names(modes), _names(compare), _names(impls)
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        named = f"unknown mode {', '.join(map(repr, unknown))}" if unknown else "no mode given"
        raise ValueError(f"{named}; accepted: {', '.join(MODES)} (comma-separated)")
    if memory and "training" not in modes:
        raise ValueError("--memory measures a training step's peak memory: add training to --modes")
    target = parse_target(device, dtype)
    if onnxruntime and target.device.type != "cpu":
        raise ValueError(f"--onnxruntime: onnxruntime contenders run on the CPU, not on {device}")
    if int8 and (target.device.type != "cpu" or target.dtype != torch.float32):
        raise ValueError(f"--int8: int8 contenders run on the CPU from float32, not on {device} in {dtype}")
    if threads is not None:
        torch.set_num_threads(threads)
    from .variants import get_config

    # A bad rate is refused here, by name, before anything is built.
    config = get_config(model_name, **({} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}))
    size, drop_path_rate = config.img_size, config.drop_path_rate
    flops_per_image = 2 * count_flops(config, (3, size, size)).total  # multiply-adds -> FLOPs
    base = ["swinkit", *(f"swinkit:{impl}" for impl in impls), *compare]
    names = list(base)
    if compiled:
        names += [f"{name}+compile" for name in base]
    if onnxruntime:
        names += [f"{name}+ort" for name in base]
    if int8:
        names += [f"{name}+int8" for name in base]
    reference = (compare or ["swinkit"])[0]
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    if "inference" in modes:
        if fresh_processes:
            result = bench_in_fresh_processes(names, "inference", model_name, batch, size, rounds, target)
        else:
            x = torch.randn(batch, 3, size, size, device=target.device)
            contenders = inference_contenders(names, model_name, x)
            result = bench_inference(contenders, x, rounds, target=target)
            del contenders
            gc.collect()
        rows += result.table(reference, flops_per_image)
        failures += _failure_rows(result)
    if "training" in modes:
        trainable = [n for n in names if not n.endswith(INFERENCE_ONLY)]
        if fresh_processes:
            steps = TRAINING_STEPS_PER_PROCESS
            result = bench_in_fresh_processes(
                trainable, "training", model_name, train_batch, size, rounds, target, steps, drop_path_rate
            )
        else:
            x = torch.randn(train_batch, 3, size, size, device=target.device)
            result = bench_training(trainable, model_name, x, rounds, target=target, drop_path_rate=drop_path_rate)
        # A training step is counted as three forwards (the backward's two products per forward one),
        # of the work each contender does: swinkit's fused CPU path skips stochastic depth's drops.
        skipping = {name for name in trainable if skips_dropped_images(name, config, target)}
        skipped = 2 * count_flops(config, (3, size, size), skip_dropped=True).total
        table = result.table(
            reference.partition("+")[0], lambda name: 3 * (skipped if name in skipping else flops_per_image)
        )
        for row in table:
            row["skips_dropped_work"] = row["contender"] in skipping
        if memory:
            for row in (r for r in table if "+" not in r["contender"]):
                row["peak_memory_mib"] = peak_training_memory(
                    row["contender"], model_name, train_batch, size, target, drop_path_rate
                )
        rows += table
        failures += _failure_rows(result)
    report = {"model": model_name, "machine": machine(target), "rows": rows, "max_rss_mib": peak_rss_mib()}
    report["failures"] = failures
    report["machine"]["processes"] = "fresh per contender and round" if fresh_processes else "one, interleaved"
    if "training" in modes:
        report["drop_path_rate"] = drop_path_rate
    return report


def _failure_rows(result: BenchResult) -> list[dict[str, str]]:
    return [{"mode": result.mode, "contender": name, "error": error} for name, error in result.failures.items()]


def format_rows(report: dict[str, Any]) -> str:
    """A report as the table ``swinkit bench`` prints: the machine, then a row per mode and contender."""
    lines = [f"{report['model']} on {json.dumps(report['machine'])}"]
    if "drop_path_rate" in report:
        lines.append(f"training: every contender with stochastic depth rate {report['drop_path_rate']}")
    header = f"{'mode':<10} {'contender':<28} {'batch':>5} {'img/s':>8} {'ms':>9} {'ratio':>6} {'GEMM%':>6}"
    lines.append(header + f" {'mem MiB':>8}")
    for row in report["rows"]:
        fraction = f"{100 * row['gemm_fraction']:6.0f}" if "gemm_fraction" in row else " " * 6
        fraction = fraction[1:] + "*" if row.get("skips_dropped_work") and "gemm_fraction" in row else fraction
        memory = f"{row['peak_memory_mib']:8.0f}" if "peak_memory_mib" in row else ""
        lines.append(
            f"{row['mode']:<10} {row['contender']:<28} {row['batch']:>5} {row['images_per_second']:8.2f} "
            f"{row['latency_ms']:9.1f} {row['ratio']:6.2f} {fraction} {memory}"
        )
    rates = {row["mode"]: row["gemm_gflops"] for row in report["rows"] if "gemm_gflops" in row}
    dtype = report["machine"].get("dtype", "float32")
    side = gemm_side(report["machine"].get("device", "cpu").partition(":")[0], DTYPES.get(dtype, torch.float32))
    for mode, rate in rates.items():
        lines.append(
            f"{mode}: reference {side}-square {dtype} matrix product "
            f"{rate:.0f} GFLOP/s (median of the rounds); GEMM% = the model's FLOPs per second as a percentage of it"
        )
    if any(row.get("skips_dropped_work") for row in report["rows"]):
        lines.append("* counted with the expected work left after skipping the branches stochastic depth drops")
    for failure in report.get("failures", []):
        last = [line for line in failure["error"].splitlines() if line.strip()][-1]
        lines.append(f"FAILED {failure['mode']} {failure['contender']} (left out from then on): {last.strip()}")
    for mode in dict.fromkeys(failure["mode"] for failure in report.get("failures", [])):
        bases = {row["ratio_to"] for row in report["rows"] if row["mode"] == mode}
        lines += [f"{mode}: ratios against {base}" for base in sorted(bases)]
    return "\n".join(lines)
