"""docs/results.md is generated from benchmarks/results.jsonl and never goes stale."""

from __future__ import annotations

import json

from benchmarks import common
from benchmarks.results_page import COMMAND, PAGE, RESULTS, read_records, results_page


def test_results_page_matches_results_jsonl():
    expected = results_page(read_records(RESULTS))
    assert PAGE.read_text() == expected, (
        f"docs/results.md is stale against benchmarks/results.jsonl: run `{COMMAND}` "
        "(benchmarks/common.py's record does it after appending)"
    )


def test_sections_are_grouped_by_benchmark_newest_first_with_labels():
    records = [
        {"benchmark": "rle", "machine": {"cores": 2, "cpu": "X"}, "encode_mpix_s": 1.5},
        {
            "benchmark": "real",
            "machine": {"cores": 4, "cpu": "Y", "cpu_features": ["avx2"], "gpu": "H100"},
            "date": "2026-01-02T03:04:05+00:00",
            "commit": "abc1234567",
            "framework": "keras3",
            "train_images": 8,
            "holdout_images": 2,
            "config": {"size": 64, "epochs": 5, "backbone": "b0"},
            "layouts": {"instances": {"oof_plain_050": 0.8, "oof_tuned_nested": 0.81}},
        },
        {"benchmark": "rle", "machine": {"cores": 2, "cpu": "X"}, "encode_mpix_s": 2.5},
        {"benchmark": "brand_new", "machine": None, "speed": 3.0, "nested": {"a": 1}},
    ]
    page = results_page(records)
    rle = page.index("## RLE codec")
    assert page.index("| 3 |", rle) < page.index("| 1 |", rle)  # newest first
    assert "| 2 | 2026-01-02 | abc1234567 | 4-core Y, AVX2, H100 | keras3 |" in page
    assert "| OOF at 0.5 | nested |" in page and "| 0.8 | 0.81 |" in page
    assert "## `brand_new`" in page and "| speed |" in page and "| 3.0 |" in page


def test_record_appends_and_regenerates_the_page(tmp_path, monkeypatch, capsys):
    results, page = tmp_path / "results.jsonl", tmp_path / "results.md"
    monkeypatch.setattr(common, "RESULTS", results)
    monkeypatch.setattr(common, "RESULTS_PAGE", page)
    common.record({"benchmark": "rle", "machine": {"cores": 1, "cpu": "Z"}}, keep=False)
    assert not results.exists() and not page.exists()
    common.record({"benchmark": "rle", "machine": {"cores": 1, "cpu": "Z"}})
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert json.loads(results.read_text()) == printed
    assert "date" in printed and "commit" in printed
    assert page.read_text() == results_page([printed])
