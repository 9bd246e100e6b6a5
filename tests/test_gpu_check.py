"""benchmarks/gpu_check.sh, checked without a GPU: a lent GPU's minutes are few (15 a session, one
command of at most 600 s), so the script must fit them and must not stop on a typo."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from swinkit.bench import check_contender
from swinkit.cli import build_parser

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
LIMIT_S = 550  # the device tool's 600 s per command, less a margin for the start of each step


def _commands() -> list[list[str]]:
    """The script's command lines (continuations joined), split as the shell would, up to a pipe."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [shlex.split(line.split("2>&1")[0]) for line in lines if line and not line.startswith("#")]


def _steps(first_word: str) -> list[list[str]]:
    return [words for words in _commands() if words[0] == first_word]


def test_its_time_limits_fit_one_device_call():
    limits = [int(words[1]) for words in _steps("timeout") if words[1].isdigit()]
    limits += [int(words[2]) for words in _steps("bench")]
    assert len(limits) >= 5
    assert sum(limits) <= LIMIT_S
    assert f"sum to {LIMIT_S} s" in SCRIPT.read_text().replace("\n#", "")  # its own comment says so


def test_every_bench_step_parses_as_swinkit_bench():
    steps = _steps("bench")
    assert steps
    for _, name, _, *arguments in steps:
        args = build_parser().parse_args(["bench", *arguments, "--device", "cuda", "--dtype", "bfloat16"])
        for contender in ["swinkit", *args.compare.split(",")]:
            check_contender(contender, args.model)
        assert re.fullmatch(r"[a-z0-9_]+", name)  # the JSON report's file name


def _python_steps() -> list[list[str]]:
    return [words[2:] for words in _steps("timeout") if len(words) > 2 and words[2] == "$PY"]


def test_every_benchmark_script_it_runs_takes_its_arguments():
    scripts = {Path(words[1]).name: words[2:] for words in _python_steps() if words[1].endswith(".py")}
    assert set(scripts) == {"triton_norms.py", "gpu_profile.py"}
    for name in scripts:
        assert (ROOT / "benchmarks" / name).is_file()
    spec = importlib.util.spec_from_file_location("triton_norms", ROOT / "benchmarks" / "triton_norms.py")
    triton_norms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(triton_norms)
    args = triton_norms.parse_args(scripts["triton_norms.py"])
    assert set(args.modes.split(",")) == {"inference", "training"}
    model, batch, *contenders = scripts["gpu_profile.py"]  # positional: model, batch, contenders
    assert int(batch) > 0
    for contender in contenders:
        check_contender(contender, model)


@pytest.mark.timeout(300)
def test_its_test_selection_collects_the_gpu_and_kernel_tests():
    (pytest_step,) = [words for words in _python_steps() if words[1:3] == ["-m", "pytest"]]
    files = [word for word in pytest_step if word.startswith("tests/")]
    selection = pytest_step[pytest_step.index("-k") + 1]
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files]
    result = subprocess.run([*command, "-k", selection], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert any("test_gpu.py" in line for line in collected)
    assert any("norm_kernel" in line for line in collected)
    assert not any("compile_for" in line for line in collected)
