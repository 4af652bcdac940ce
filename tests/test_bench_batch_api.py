"""The Batch API benchmark's core on a real private stack with tiny numbers."""

from __future__ import annotations

import json

import pytest

from bench.batch_api import batch_file, print_report, rss_of_tree, run_benchmark

pytestmark = pytest.mark.slow


def test_the_batch_file_has_one_distinct_image_per_line() -> None:
    rows = [json.loads(line) for line in batch_file(3, offset=5).splitlines()]
    assert [r["custom_id"] for r in rows] == ["line-5", "line-6", "line-7"]
    urls = [r["body"]["messages"][0]["content"][1]["image_url"]["url"] for r in rows]
    assert len(set(urls)) == 3 and all(u.startswith("data:image/png;base64,") for u in urls)


def test_rss_of_a_process_tree_counts_this_process() -> None:
    import os

    assert 10 * 2**20 < rss_of_tree(os.getpid()) < 8 * 2**30


def test_run_benchmark_measures_upload_validation_memory_and_both_paths(data_dir, capsys) -> None:
    report = run_benchmark(data_dir, "sqlite", lines=60, e2e_items=4)
    assert report.lines == 60 and report.file_mib > 0 and report.e2e_items == 4
    assert report.upload_s > 0 and report.validate_s > 0 and report.v1_e2e_s > 0 and report.api_e2e_s > 0
    assert 0 < report.rss_before_mib <= report.rss_peak_mib
    print_report(report)
    out = capsys.readouterr().out
    assert "MiB/s" in out and "lines/s" in out and "POST /api/batches" in out
