"""swinkit bench: the report's rows and errors (no timing is asserted; speed lives in benchmarks/)."""

from __future__ import annotations

import pytest

from swinkit.bench import build, format_rows, run_bench


def test_bench_reports_every_contender_with_ratios_to_the_first():
    report = run_bench("swin_test", batch=2, train_batch=2, rounds=2, impls=["reference"])
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
    assert "swinkit:reference" in format_rows(report)


def test_unknown_contenders_are_named():
    with pytest.raises(ValueError, match="unknown contender 'mxnet'"):
        build("mxnet", "swin_t")
    with pytest.raises(ValueError, match="no peer models known for 'swin_test'"):
        build("timm", "swin_test")
