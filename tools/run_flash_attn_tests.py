#!/usr/bin/env python
"""Run a seeded sample of flash-attn's own tests/test_flash_attn.py against torch_varlen.

flash-attn's test file is imported unchanged, with ``tools/flash_attn_compat`` first on
PYTHONPATH so that its ``import flash_attn`` gets the stand-in package (torch_varlen's functions
under flash-attn's names). Populate ``.fa/`` first (not committed: flash-attn's files stay
flash-attn's): ``tools/fetch_flash_attn_tests.sh GIT_DIR``.

    python tools/run_flash_attn_tests.py --tests .fa/tests/test_flash_attn.py --out fa.json

For each claimed test function it draws ``--per-function`` parameter sets (``random.Random(seed)``)
among those whose features torch_varlen supports (``supported`` below says which ids are left
out and why), runs them all in one pytest process and writes a JSON report: per function the
sampled / passed / failed / skipped counts and each failure's id with the first line of its
error, plus the flash-attn commit, torch version, device, seed and seconds. Tests still waiting
when ``--time-budget`` runs out are skipped (and counted so). Exit status 1 on any failure.

``--device cpu`` (a check without a GPU) runs a temporary copy of the test file with "cuda"
replaced by "cpu" and the capability / memory queries by constants (H100-like: (9, 0), 80 GiB);
``--max-seqlen`` / ``--max-headdim`` keep it to small shapes. The GPU run uses the file as is.

The module is also the pytest plugin the two pytest processes load (``-p run_flash_attn_tests``):
it writes the collected parameter sets, enforces the time budget and records outcomes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / "tools" / "flash_attn_compat"

# The test functions torch_varlen claims. Left out: test_flash_attn_varlen_paged_kv_num_splits
# and test_flash_attn_generator_arg_must_be_none (they call flash-attn's private extension),
# test_flash_attn_kvcache_paged_block_table_bounds (it wants a RuntimeError for a too-long
# cache_seqlens; torch_varlen reports bad values with a device-side assert on CUDA, so that
# nothing syncs with the host; the assert would end the CUDA context for every later test).
CLAIMED = [
    "test_flash_attn_qkvpacked",
    "test_flash_attn_varlen_qkvpacked",
    "test_flash_attn_output",
    "test_flash_attn_varlen_output",
    "test_flash_attn_causal",
    "test_flash_attn_varlen_causal",
    "test_flash_attn_splitkv",
    "test_flash_attn_kvcache",
    "test_flash_attn_race_condition",
    "test_flash_attn_bwd_overflow",
    "test_flash_attn_bwd_transpose",
    "test_flash_attn_bwd_varlen_overflow",
    "test_flash_attn_deterministic",
    "test_flash_attn_varlen_deterministic",
]

# Tests whose dropout cases are sampled with --dropout. race_condition is left out even then:
# 251 calls with return_attn_probs=True would each run the float64 reference for S_dmask.
DROPOUT_OK = {"test_flash_attn_qkvpacked", "test_flash_attn_varlen_qkvpacked",
              "test_flash_attn_output", "test_flash_attn_varlen_output"}


def supported(func, params, args):
    """None if torch_varlen claims this parameter set, else why not."""
    if params.get("dropout_p", 0.0) > 0 and not (args.dropout and func in DROPOUT_OK):
        return "dropout (see --dropout)"
    if params.get("has_batch_idx"):  # flash-attn's file only parametrizes False today
        return "cache_batch_idx"
    lengths = [params[k] for k in ("seqlen", "seqlen_q", "seqlen_k") if k in params]
    if args.max_seqlen and any(n > args.max_seqlen for n in lengths):
        return "--max-seqlen"
    if args.max_headdim and params.get("d", 0) > args.max_headdim:
        return "--max-headdim"
    return None


# ------------------------------------------------------------------ pytest plugin side
# flash-attn's file parametrizes about 500,000 tests; generating them all takes pytest a minute
# or more. The plugin instead draws the sample from the parametrize marks themselves (the
# product of their values, bottom decorator first, as pytest orders ids) and parametrizes the
# function with just those sets, under the ids pytest would give them.

_budget_end = None


def _idval(value, argname, index):
    if value is None or isinstance(value, (bool, int, float, str)):
        return str(value)
    return f"{argname}{index}"  # pytest's id for other objects (torch.float16 -> dtype0)


def _marker_choices(marker):
    """[(params dict, id)] of one parametrize mark."""
    argnames = marker.args[0]
    names = [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
    choices = []
    for index, value in enumerate(marker.args[1]):
        value = getattr(value, "values", value)  # pytest.param(...)
        values = value if len(names) > 1 else (value,)
        choices.append((dict(zip(names, values)),
                        "-".join(_idval(v, n, index) for n, v in zip(names, values))))
    return names, choices


class _Options:
    def __init__(self, d):
        self.__dict__.update(d)


def pytest_generate_tests(metafunc):
    cfg = os.environ.get("FA_SAMPLE")
    if not cfg:
        return
    cfg = json.loads(cfg)
    definition = metafunc.definition
    marks = list(definition.iter_markers(name="parametrize"))
    if not marks:
        return
    definition.own_markers = [m for m in definition.own_markers if m.name != "parametrize"]
    func = definition.originalname
    names = []
    per_mark = []
    for m in marks:
        n, c = _marker_choices(m)
        names += n
        per_mark.append(c)
    if func not in cfg["functions"]:
        metafunc.parametrize(names, [])  # pytest_collection_modifyitems drops it
        return
    import itertools
    import random

    options = _Options(cfg)
    total = 0
    ok = []
    for combo in itertools.product(*per_mark):
        total += 1
        params = {}
        for p, _ in combo:
            params.update(p)
        if supported(func, params, options) is None:
            ok.append(combo)
    rng = random.Random(f"{cfg['seed']}:{func}")
    sample = rng.sample(ok, min(cfg["per_function"], len(ok)))
    _counts[func] = {"collected": total, "supported": len(ok), "sampled": len(sample)}
    values = [tuple(v for p, _ in combo for v in p.values()) for combo in sample]
    ids = ["-".join(i for _, i in combo) for combo in sample]
    metafunc.parametrize(names, values, ids=ids)


_counts = {}


def pytest_collection_modifyitems(session, config, items):
    cfg = os.environ.get("FA_SAMPLE")
    if not cfg:
        return
    cfg = json.loads(cfg)
    keep = [it for it in items if it.originalname in cfg["functions"] and hasattr(it, "callspec")]
    drop = [it for it in items if it not in keep]
    if drop:
        config.hook.pytest_deselected(items=drop)
    import random

    random.Random(cfg["seed"]).shuffle(keep)  # no function starves when the time budget runs out
    items[:] = keep
    for func in cfg["functions"]:
        _counts.setdefault(func, {"collected": 0, "supported": 0, "sampled": 0})
    Path(cfg["collected_out"]).write_text(json.dumps(
        {"counts": _counts, "items": [{"nodeid": it.nodeid, "function": it.originalname} for it in keep]}))


def pytest_sessionstart(session):
    global _budget_end
    if os.environ.get("FA_BUDGET_END"):
        _budget_end = float(os.environ["FA_BUDGET_END"])


def pytest_runtest_setup(item):
    if _budget_end is not None and time.time() > _budget_end:
        import pytest

        pytest.skip("time budget exhausted")


def pytest_runtest_logreport(report):
    path = os.environ.get("FA_RESULTS_OUT")
    if not path:
        return
    outcome = None
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome
    elif report.when == "teardown" and report.failed:
        outcome = "failed"
    if outcome is None:
        return
    message = ""
    if report.failed:
        message = _first_error_line(report)
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
                            "message": message, "seconds": report.duration}) + "\n")


def _first_error_line(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0] if crash.message else ""
    return str(report.longrepr).strip().splitlines()[-1] if report.longrepr else ""


# ------------------------------------------------------------------ runner side


def _cpu_copy(tests, tmpdir):
    """A copy of the test file that runs on the CPU (the GPU run never uses this)."""
    src = tests.read_text()
    src = re.sub(r"torch\.cuda\.get_device_capability\([^)]*\)", "(9, 0)", src)
    src = re.sub(r"torch\.cuda\.get_device_properties\([^)]*\)\.total_memory", "(80 * 2**30)", src)
    src = src.replace('"cuda"', '"cpu"')
    dst = Path(tmpdir) / tests.name
    dst.write_text(src)
    return dst


def _env(extra, tmp):
    env = dict(os.environ, FA_TMP=str(tmp))
    paths = [str(COMPAT), str(ROOT / "tools"), str(ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def _pytest(args, env, cwd, timeout):
    # An empty ini file keeps the repository's pytest settings (and conftests) out; node ids are
    # then relative to the test file's folder, where pytest runs.
    ini = Path(env["FA_TMP"]) / "pytest.ini"
    ini.write_text("[pytest]\n")
    cmd = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(cwd),
           "-p", "run_flash_attn_tests", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _flash_attn_commit(tests):
    for d in [tests.parent, *tests.parents]:
        f = d / "COMMIT"
        if f.exists():
            return f.read_text().strip()
    return None


def _device(device):
    import torch

    if device == "cpu":
        return "cpu"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (not available)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--tests", default=str(ROOT / ".fa" / "tests" / "test_flash_attn.py"))
    p.add_argument("--per-function", type=int, default=4, help="parameter sets drawn per test function")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="flash_attn_tests.json")
    p.add_argument("--time-budget", type=float, default=145.0,
                   help="seconds from the start; tests not started by then are skipped (the run "
                        "ends by about --time-budget + --timeout)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="per-test limit (pytest-timeout, when installed)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=True,
                   help="also sample dropout_p > 0 (S_dmask through the float64 reference)")
    p.add_argument("--backend", default="torch_varlen",
                   help="TORCH_VARLEN_ATTENTION_BACKEND for the run (the stand-in shadows the real "
                        "flash_attn, so FA4's flash_attn.cute could not load anyway)")
    p.add_argument("--max-seqlen", type=int, default=0, help="skip ids with a longer seqlen (0: no limit)")
    p.add_argument("--max-headdim", type=int, default=0, help="skip ids with a larger d (0: no limit)")
    p.add_argument("--functions", nargs="*", default=CLAIMED, help="subset of the claimed functions")
    p.add_argument("-v", "--verbose", action="store_true", help="print pytest's output")
    args = p.parse_args(argv)

    start = time.time()
    tests = Path(args.tests).resolve()
    if not tests.exists():
        sys.exit(f"{tests} not found: populate it with tools/fetch_flash_attn_tests.sh GIT_DIR")
    unknown = sorted(set(args.functions) - set(CLAIMED))
    if unknown:
        sys.exit(f"not claimed: {unknown}")
    with tempfile.TemporaryDirectory(prefix="fa_tests_") as tmp:
        target = _cpu_copy(tests, tmp) if args.device == "cpu" else tests
        collected = Path(tmp) / "collected.json"
        results = Path(tmp) / "results.jsonl"
        results.touch()
        sample = {"functions": args.functions, "per_function": args.per_function, "seed": args.seed,
                  "dropout": args.dropout, "backend": args.backend, "max_seqlen": args.max_seqlen,
                  "max_headdim": args.max_headdim, "collected_out": str(collected)}
        pytest_args = ["-q", "-rN", "--tb=line", "-o", "console_output_style=classic", str(target)]
        if _has_timeout_plugin():
            pytest_args += ["--timeout", str(args.timeout)]
        env = _env({"TORCH_VARLEN_ATTENTION_BACKEND": args.backend, "FA_SAMPLE": json.dumps(sample),
                    "FA_RESULTS_OUT": str(results), "FA_BUDGET_END": str(start + args.time_budget)}, tmp)
        try:
            r = _pytest(pytest_args, env, target.parent, timeout=args.time_budget + 2 * args.timeout + 60)
            tail = (r.stdout[-3000:] + r.stderr[-3000:]).strip()
            returncode = r.returncode
        except subprocess.TimeoutExpired as e:
            tail, returncode = f"pytest killed after {e.timeout:.0f} s", None
        if args.verbose:
            print(tail)
        if not collected.exists():
            sys.stderr.write(tail + "\n")
            sys.exit("collection failed")
        info = json.loads(collected.read_text())

        report = OrderedDict()
        for func in args.functions:
            report[func] = {**info["counts"][func], "passed": 0, "failed": 0, "skipped": 0,
                            "failures": [], "skips": []}
            if not info["counts"][func]["collected"]:
                report[func]["note"] = "not in the test file (or not parametrized)"
        seen = {}
        for line in results.read_text().splitlines():
            row = json.loads(line)
            if row["outcome"] == "failed" or row["nodeid"] not in seen:
                seen[row["nodeid"]] = row
        nodeids = [it["nodeid"] for it in info["items"]]
        for it in info["items"]:
            entry = report[it["function"]]
            row = seen.get(it["nodeid"])
            short = it["nodeid"].split("::", 1)[-1]
            if row is None:  # the pytest process died before reporting it
                entry["failed"] += 1
                entry["failures"].append({"test": short, "error": "no result (pytest process ended)"})
            elif row["outcome"] == "passed":
                entry["passed"] += 1
            elif row["outcome"] == "skipped":
                entry["skipped"] += 1
                entry["skips"].append({"test": short, "reason": row["message"]})
            else:
                entry["failed"] += 1
                entry["failures"].append({"test": short, "error": row["message"]})

    import torch

    failed = sum(v["failed"] for v in report.values())
    summary = {
        "flash_attn_commit": _flash_attn_commit(tests),
        "tests": str(tests),
        "torch": torch.__version__,
        "device": _device(args.device),
        "seed": args.seed,
        "per_function": args.per_function,
        "dropout": args.dropout,
        "backend": args.backend,
        "sampled": len(nodeids),
        "passed": sum(v["passed"] for v in report.values()),
        "failed": failed,
        "skipped": sum(v["skipped"] for v in report.values()),
        "pytest_returncode": returncode,
        "seconds": round(time.time() - start, 1),
        "functions": report,
    }
    if returncode not in (0, 1):  # 1 = some tests failed; others = a pytest error or a kill
        summary["pytest_tail"] = tail
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['passed']} passed, {failed} failed, {summary['skipped']} skipped of "
          f"{len(nodeids)} in {summary['seconds']} s -> {args.out}")
    for func, v in report.items():
        for f in v["failures"]:
            print(f"FAILED {f['test']}: {f['error']}")
    if returncode not in (0, 1) and not args.verbose:  # e.g. the test file's imports failed
        sys.stderr.write(f"pytest exited with {returncode}:\n{tail}\n")
    return 1 if failed or returncode not in (0, 1) else 0


def _has_timeout_plugin():
    try:
        import pytest_timeout  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
