"""tools/merge_test_reports.py: shard reports of one make test-gpu add up; gaps are refused
unless --incomplete, which records them."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from merge_test_reports import merge  # noqa: E402


def _report(shard, passed, failed=0, commit="abc"):
    return {"commit": commit, "device": "d", "torch": "t", "triton": "x", "python": "p", "date": f"2026-12-0{shard[0]}",
            "command": "pytest test/", "shard": shard, "passed": passed, "failed": failed, "xfailed": 0,
            "seconds": 10.0, "failures": [f"f{shard[0]}"] * failed, "skipped": [{"test": f"s{shard[0]}", "reason": "r"}],
            "exit_status": int(failed > 0), "collected": passed + failed + 1, "not_run": 0,
            "slowest": [{"test": f"t{shard[0]}", "seconds": float(passed)}]}


def test_complete_shards_add_up():
    out = merge([_report("2/2", 5, 1), _report("1/2", 3)])
    assert (out["passed"], out["failed"], out["complete"], out["exit_status"]) == (8, 1, True, 1)
    assert out["failures"] == ["f2"] and [s["test"] for s in out["skipped"]] == ["s1", "s2"]
    assert "missing_shards" not in out and out["date"] == "2026-12-02"
    assert out["collected"] == 11 and [t["test"] for t in out["slowest"]] == ["t2", "t1"]


def test_unstarted_or_unreported_tests_make_the_run_incomplete():
    late = _report("2/2", 5)
    late["not_run"] = 1
    assert merge([_report("1/2", 3), late])["complete"] is False
    interrupted = _report("2/2", 5)
    interrupted["collected"] += 4  # four tests never reported (the run was stopped)
    assert merge([_report("1/2", 3), interrupted])["complete"] is False


def test_gaps_duplicates_and_mixed_commits_are_refused():
    with pytest.raises(SystemExit, match="exactly once"):
        merge([_report("1/3", 1), _report("2/3", 1)])
    with pytest.raises(SystemExit, match="exactly once"):
        merge([_report("1/2", 1), _report("1/2", 1)], incomplete=True)
    with pytest.raises(SystemExit, match="different commits"):
        merge([_report("1/2", 1), _report("2/2", 1, commit="def")])


def test_incomplete_records_the_missing_shards():
    out = merge([_report("1/3", 1), _report("2/3", 2)], incomplete=True)
    assert out["complete"] is False and out["missing_shards"] == ["3/3"] and out["passed"] == 3
