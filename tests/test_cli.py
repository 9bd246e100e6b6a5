"""The command line, run in-process through main(argv) and once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from swinkit.cli import main


def test_info_prints_params_flops_and_stages(capsys):
    assert main(["info", "swin_t"]) == 0
    out = capsys.readouterr().out
    assert "28.29 M" in out and "4.49 G" in out
    assert "768 x   7 x 7" in out


def test_info_json_and_size(capsys):
    assert main(["info", "swin_test", "--img-size", "96x64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_size"] == [3, 96, 64]
    assert [(s["height"], s["width"]) for s in info["stages"]] == [(24, 16), (12, 8), (6, 4), (3, 2)]


def test_bad_image_sizes_are_refused_by_name(capsys):
    for bad in ("12x", "x12", "1x2x3", "0", "big"):
        try:
            code = main(["info", "swin_test", "--img-size", bad])
        except SystemExit as exit:  # argparse rejects the value itself
            code = exit.code
        assert code == 2, bad
        assert repr(bad) in capsys.readouterr().err


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["info", "swin_xl"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'swin_xl'" in err and "swin_t" in err and "Traceback" not in err


def test_python_dash_m_runs():
    result = subprocess.run([sys.executable, "-m", "swinkit", "info", "--list"], capture_output=True, text=True)
    assert result.returncode == 0 and "swin_b_384" in result.stdout.split()
