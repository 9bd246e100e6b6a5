"""swinkit bench: the report's rows and errors (no timing is asserted; speed lives in benchmarks/)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import swinkit
from swinkit import get_config
from swinkit.bench import (
    Contender,
    Target,
    bench_in_fresh_processes,
    bench_inference,
    build,
    format_rows,
    gemm_side,
    parse_target,
    run_bench,
    skips_dropped_images,
)
from swinkit.cli import main
from swinkit.flops import count_flops


def test_bench_reports_every_contender_with_ratios_to_the_first():
    report = run_bench("swin_test", batch=2, train_batch=2, rounds=2, impls=["reference"], drop_path_rate=0.3)
    rows = report["rows"]
    assert [(r["mode"], r["contender"]) for r in rows] == [
        ("inference", "swinkit"),
        ("inference", "swinkit:reference"),
        ("training", "swinkit"),
        ("training", "swinkit:reference"),
    ]
    for row in rows:
        assert row["rounds"] == 2 and row["images_per_second"] > 0
        assert row["ratio"] == pytest.approx(
            row["images_per_second"] / rows[0 if row["mode"] == "inference" else 2]["images_per_second"]
        )
    # Achieved FLOP rate: the analytic FLOPs (2 per multiply-add; a training step counts three
    # forwards of the work done: the fused path skips what stochastic depth drops), and its fraction
    # of the matrix product timed in the same rounds.
    config = get_config("swin_test", drop_path_rate=0.3)
    forward = 2 * count_flops(config, (3, 64, 64)).total
    skipping = 2 * count_flops(config, (3, 64, 64), skip_dropped=True).total
    for row in rows:
        per_image = forward
        if row["mode"] == "training":
            per_image = 3 * (skipping if row["contender"] == "swinkit" else forward)
        assert row["gflops"] == pytest.approx(row["images_per_second"] * per_image / 1e9)
        assert row["gemm_gflops"] > 0
        assert row["gemm_fraction"] == pytest.approx(row["gflops"] / row["gemm_gflops"])
        counted_skipping = (row["mode"], row["contender"]) == ("training", "swinkit")
        assert row.get("skips_dropped_work", False) == counted_skipping
    text = format_rows(report)
    assert "swinkit:reference" in text and "GEMM%" in text and "GFLOP/s" in text
    assert "* counted with the expected work left" in text


def test_only_the_fused_cpu_path_is_counted_as_skipping_dropped_work():
    config, cpu = get_config("swin_t"), Target()
    skipping = [name for name in NAMES if skips_dropped_images(name, config, cpu)]
    assert skipping == ["swinkit", "swinkit:serial", "swinkit:fused"]
    for changed in ({"drop_path_rate": 0.0}, {"drop_rate": 0.1}, {"attn_drop_rate": 0.1}):
        assert not skips_dropped_images("swinkit", get_config("swin_t", **changed), cpu)
    assert not skips_dropped_images("swinkit", config, Target(torch.device("cuda")))


NAMES = ["swinkit", "swinkit:serial", "swinkit:fused", "swinkit:reference", "swinkit:sdpa", "swinkit+compile"]
NAMES += ["swinkit+ort", "timm", "torchvision", "hf"]


def test_fresh_processes_time_every_contender_in_a_process_of_its_own():
    report = run_bench(
        "swin_test",
        batch=2,
        train_batch=2,
        rounds=2,
        onnxruntime=True,
        fresh_processes=True,
        drop_path_rate=0.25,
    )
    assert report["machine"]["processes"] == "fresh per contender and round"
    assert report["drop_path_rate"] == 0.25 and "stochastic depth rate 0.25" in format_rows(report)
    # Other attn_impl values are named the same way in fresh processes (each process runs one
    # name through `build`); the in-process test above covers them.
    assert [(r["mode"], r["contender"]) for r in report["rows"]] == [
        ("inference", "swinkit"),
        ("inference", "swinkit+ort"),
        ("training", "swinkit"),
    ]
    assert all(r["rounds"] == 2 and r["images_per_second"] > 0 and r["gemm_gflops"] > 0 for r in report["rows"])


def test_fresh_processes_refuse_unknown_contenders_before_starting_any():
    with pytest.raises(ValueError, match="unknown contender 'mxnet'"):
        bench_in_fresh_processes(["swinkit", "mxnet"], "inference", "swin_t", batch=1, size=224, rounds=1)
    with pytest.raises(ValueError, match="unknown variant 'jit'"):
        bench_in_fresh_processes(["timm+jit"], "inference", "swin_t", batch=1, size=224, rounds=1)


def test_a_failing_fresh_process_is_reported_with_its_error():
    with pytest.raises(RuntimeError, match="timing 'swinkit' in a fresh process failed(.|\n)*swin_nonexistent"):
        bench_in_fresh_processes(["swinkit"], "inference", "swin_nonexistent", batch=1, size=64, rounds=1)


def test_a_peer_that_fails_in_its_process_leaves_the_others_results(tmp_path, monkeypatch, capsys):
    # Each fresh process imports this sitecustomize first: there, building timm's model fails, as
    # a peer's forward did before (timm's SwinV2 under torch.ao int8). The bench goes on without it
    # and reports it, instead of losing every round already timed; the command exits with 1.
    (tmp_path / "sitecustomize.py").write_text(
        "import swinkit.bench\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('this peer cannot run here')\n"
        "swinkit.bench.BUILDERS['timm'] = broken\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    arguments = "bench swin_t --compare timm --modes inference --fresh-processes --rounds 2 --batch-size 1 --threads 1"
    code = main([*arguments.split(), "--json", str(tmp_path / "report.json")])
    out, err = capsys.readouterr()
    assert code == 1 and "timm (inference) failed" in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(r["contender"], r["rounds"], r["ratio_to"]) for r in report["rows"]] == [("swinkit", 2, "swinkit")]
    (failure,) = report["failures"]
    assert failure["contender"] == "timm" and "this peer cannot run here" in failure["error"]
    assert "FAILED inference timm (left out from then on): RuntimeError: this peer cannot run here" in out
    assert "inference: ratios against swinkit" in out


def test_a_fresh_process_whose_contender_fails_after_its_first_calls_reports_the_failure(tmp_path, monkeypatch):
    # Two warm-up calls, one timed call, then an error: the process used to print the median of the
    # calls before it and exit 0, a round timed on fewer calls than asked, and no failure reported.
    (tmp_path / "sitecustomize.py").write_text(
        "import swinkit.bench\n"
        "build = swinkit.bench.BUILDERS['timm']\n"
        "def flaky(*args, **kwargs):\n"
        "    model, calls = build(*args, **kwargs), []\n"
        "    def forward(x, forward=model.forward):\n"
        "        calls.append(x)\n"
        "        if len(calls) == 4:\n"
        "            raise RuntimeError('fails in its fourth call')\n"
        "        return forward(x)\n"
        "    model.forward = forward\n"
        "    return model\n"
        "swinkit.bench.BUILDERS['timm'] = flaky\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    result = bench_in_fresh_processes(["swinkit", "timm"], "inference", "swin_t", batch=1, size=224, rounds=1)
    assert list(result.times) == ["swinkit"]
    assert "fails in its fourth call" in result.failures["timm"]


def test_a_contender_that_fails_in_this_process_is_left_out_of_the_later_rounds():
    x = torch.randn(2, 3, 64, 64)
    model = swinkit.create_model("swin_test").eval()
    calls = []

    def fails_in_its_second_round(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        if len(calls) == 4:  # two warm-up calls, one timed round, then this
            raise torch.OutOfMemoryError("out of memory in round 2")
        return model(images)

    contenders = [Contender("swinkit", model, model), Contender("flaky", model, fails_in_its_second_round)]
    result = bench_inference(contenders, x, rounds=3)
    assert len(result.times["swinkit"]) == 3 and len(result.times["flaky"]) == 1 and len(calls) == 4
    assert list(result.failures) == ["flaky"]
    error = result.failures["flaky"]  # with its traceback, for --json
    assert "in fails_in_its_second_round" in error and error.endswith("OutOfMemoryError: out of memory in round 2")
    assert [row["contender"] for row in result.table("swinkit")] == ["swinkit", "flaky"]  # its one round stays
    with pytest.raises(RuntimeError, match="'broken' failed:(.|\n)*in _raises(.|\n)*ValueError: no"):
        bench_inference([Contender("broken", model, _raises)], x, rounds=2)  # nothing ran: nothing to report


def _raises(images: torch.Tensor) -> None:
    raise ValueError("no")


def test_unknown_contenders_are_named():
    with pytest.raises(ValueError, match="unknown contender 'mxnet'"):
        build("mxnet", "swin_t")
    with pytest.raises(ValueError, match="no peer models known for 'swin_test'"):
        build("timm", "swin_test")


def _stochastic_depth_rates(model: torch.nn.Module) -> set[float]:
    """The distinct non-zero per-block drop rates of any of the four libraries' Swin models."""
    rates = set()
    for module in model.modules():
        rate = getattr(module, "drop_prob", getattr(module, "p", 0))  # timm, HF: drop_prob; others: p
        if type(module).__name__ in ("DropPath", "StochasticDepth", "SwinDropPath") and rate:
            rates.add(round(float(rate), 6))
    return rates


@pytest.mark.parametrize("peer", ["timm", "torchvision", "hf"])
def test_every_contender_trains_with_the_same_stochastic_depth_rates(peer):
    # The paper's Swin-T schedule, linear over the 12 blocks up to 0.2, unless the bench is given a rate.
    for rate in (None, 0.35):
        expected = _stochastic_depth_rates(build("swinkit", "swin_t", drop_path_rate=rate))
        assert max(expected) == pytest.approx(0.2 if rate is None else 0.35) and len(expected) == 11
        assert _stochastic_depth_rates(build(peer, "swin_t", drop_path_rate=rate)) == expected
    assert _stochastic_depth_rates(build(peer, "swin_t", drop_path_rate=0.0)) == set()


def test_reduced_precision_runs_every_contender_under_autocast():
    report = run_bench("swin_test", batch=2, train_batch=2, rounds=1, dtype="bfloat16", memory=True)
    assert report["machine"]["dtype"] == "bfloat16" and report["machine"]["device"] == "cpu"
    assert [r["contender"] for r in report["rows"]] == ["swinkit", "swinkit"]
    assert all(r["images_per_second"] > 0 for r in report["rows"])
    assert report["rows"][1]["peak_memory_mib"] > 0
    # Without native bfloat16 products (AVX2) the reference product is smaller: a 1536-square one
    # runs at about 1 GFLOP/s there, 10 s a call.
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert f"reference {1536 if native else 512}-square bfloat16 matrix product" in format_rows(report)
    assert gemm_side("cpu") == 1536 and gemm_side("cuda", torch.bfloat16) == 8192


def test_bad_devices_and_dtypes_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; accepted: float32, bfloat16, float16"):
        parse_target("cpu", "fp8")
    # --amp's names are taken too.
    assert [parse_target("cpu", name).dtype for name in ("bf16", "fp16", "fp32")] == [
        torch.bfloat16,
        torch.float16,
        torch.float32,
    ]
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        parse_target("tpu")
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.5"):
        run_bench("swin_test", batch=1, rounds=1, modes=("training",), drop_path_rate=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': no CUDA device is available here"):
            run_bench("swin_test", batch=1, rounds=1, device="cuda")
    else:
        with pytest.raises(ValueError, match="onnxruntime contenders run on the CPU"):
            run_bench("swin_test", batch=1, rounds=1, device="cuda", onnxruntime=True)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ("--batch-size 0", "batch size must be at least 1, got 0"),
        ("--train-batch-size -1", "train batch size must be at least 1, got -1"),
        ("--rounds 0", "rounds must be at least 1, got 0"),
        ("--threads 0", "threads must be at least 1, got 0"),
        ("--modes inference,sideways", "unknown mode 'sideways'; accepted: inference, training (comma-separated)"),
        ("--modes ,", "no mode given; accepted: inference, training (comma-separated)"),
        # It timed inference and printed no memory column, saying nothing.
        ("--modes inference --memory", "--memory measures a training step's peak memory: add training to --modes"),
    ],
)
def test_bad_counts_and_modes_are_refused_by_name_before_anything_runs(arguments, message, capsys):
    # Before: a raw traceback from inside a forward (batch 0), a StopIteration (rounds 0), an empty
    # table and exit 0 (an unknown mode), or torch's default thread count taken for 0.
    threads = torch.get_num_threads()
    assert main(["bench", "swin_test", *arguments.split()]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"swinkit bench: error: {message}" and out == ""
    assert torch.get_num_threads() == threads


def test_python_callers_counts_names_and_contenders_are_checked():
    # A batch of 2.5 or True was a raw randn TypeError.
    for batch in (2.5, True):
        with pytest.raises(TypeError, match=f"batch size must be an int of at least 1, got {batch}"):
            run_bench("swin_test", batch=batch, rounds=1)
    # One name given as a string is that name (it was iterated letter by letter: "unknown mode 'i'").
    with pytest.raises(ValueError, match="unknown contender 'mxnet'"):
        run_bench("swin_test", batch=1, rounds=1, modes="inference", compare="mxnet")
    # No contenders, or no rounds, gave an empty result without a word.
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="no contenders to time: give at least one"):
        bench_inference([], x, rounds=1)
    with pytest.raises(ValueError, match="no contenders to time"):
        bench_in_fresh_processes([], "inference", "swin_test", batch=1, size=64, rounds=1)
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        bench_inference([Contender("identity", None, lambda images: images)], x, rounds=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bench_times_every_attention_implementation_in_bfloat16():
    report = run_bench(
        "swin_test",
        batch=4,
        train_batch=4,
        rounds=2,
        impls=["sdpa", "triton", "reference"],
        device="cuda",
        dtype="bfloat16",
        memory=True,
    )
    assert report["machine"]["device"] == "cuda" and report["machine"]["cuda"]
    assert len(report["rows"]) == 8 and all(r["images_per_second"] > 0 for r in report["rows"])
    assert all(r["peak_memory_mib"] > 0 for r in report["rows"] if r["mode"] == "training")
