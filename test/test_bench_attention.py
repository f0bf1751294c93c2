"""The attention benchmark's bookkeeping (CPU): merging rows into the results file and the
note that says where merged FP8 rows came from."""
import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attention.py"
spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_attention"] = bench  # dataclasses look the module up
spec.loader.exec_module(bench)


def _row(dtype, ms):
    return {"bench": "attention", "impl": "torch_varlen", "pass": "fwd", "dtype": dtype,
            "headdim": 128, "nheads": 16, "nheads_k": 16, "causal": False,
            "total_tokens": 65536, "mean_len": 8192, "ms": ms, "tflops": 1.0}


def test_merge_replaces_measured_rows_and_drops_a_stale_fp8_note(tmp_path):
    path = tmp_path / "h200.json"
    path.write_text(json.dumps({"meta": {"fp8_rows_note": "from another run"},
                                "rows": [_row("bfloat16", 2.0), _row("float8_e4m3fn", 3.0),
                                         {"bench": "pad", "ms": 1.0}]}))
    data = bench.merge(path, [_row("bfloat16", 1.5)], False, {"date": "d"})
    assert data["meta"]["fp8_rows_note"] == "from another run"  # fp8 rows untouched: note stays
    assert "Note: from another run." in bench.render_markdown(data)
    assert sorted(r["ms"] for r in data["rows"]) == [1.0, 1.5, 3.0]
    data = bench.merge(path, [_row("float8_e4m3fn", 2.5)], False, {"date": "d"})
    assert "fp8_rows_note" not in data["meta"]  # this run measured the fp8 rows itself
    assert "Note:" not in bench.render_markdown(data)
    assert json.loads(path.read_text()) == data
