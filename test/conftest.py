import datetime
import json
import os
import time
import zlib

import pytest
import torch

import torch_varlen  # noqa: F401  (registers torch.ops.varlen)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (GPU tests skip)"
    return [f"torch {torch.__version__}, GPU: {gpu}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")


# ---------------------------------------------------------------- run report (make test-gpu)
# With TORCH_VARLEN_TEST_REPORT=path, the run writes a JSON summary there (DESIGN.md "GPU
# truth"): commit, date, device, versions, passed/failed counts, each skip with its reason,
# each failure's id, and the duration. Under pytest-xdist the controller gets every worker's
# reports, so the hooks below see the whole run there.

_REPORT = {"passed": 0, "failed": [], "skipped": [], "xfailed": 0, "start": time.time(),
           "collected": None, "durations": []}
_NOT_RUN = "not run: the run's time limit (TORCH_VARLEN_TEST_DEADLINE) was reached"


def pytest_configure(config):
    # Taken out of the environment so that child pytest runs started by tests (the Triton
    # interpreter suite) do not overwrite the report of this run.
    config._varlen_report_path = os.environ.pop("TORCH_VARLEN_TEST_REPORT", None)
    shard = os.environ.pop("TORCH_VARLEN_TEST_SHARD", None)
    config._varlen_shard = getattr(config, "workerinput", {}).get("varlen_shard", shard)


def _shard(config):
    """TORCH_VARLEN_TEST_SHARD="i/n": this run takes the i-th of n disjoint parts of the suite
    (by a stable hash of each test's id), so that a suite longer than one machine call runs in n
    calls whose reports tools/merge_test_reports.py adds up."""
    spec = config._varlen_shard
    if not spec:
        return None
    i, n = (int(x) for x in spec.split("/"))
    if not 1 <= i <= n:
        raise ValueError(f"TORCH_VARLEN_TEST_SHARD must be i/n with 1 <= i <= n, got {spec!r}")
    return i, n


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    # pytest-xdist: workers collect, so they get the shard from the controller (not from the
    # environment, which child pytest runs started by tests must not inherit)
    node.workerinput["varlen_shard"] = node.config._varlen_shard


# Tests known to take tens of seconds to minutes (child processes, compiles, hypothesis runs).
# Under pytest-xdist (make test-gpu) they are started first, so that the run's wall time is not
# one long test started last; every worker sorts the same way, as xdist requires.
_SLOW = ("test_gpu_fuzz", "sanitizer", "aoti", "subprocess", "device_assert", "test_gpu_wide",
         "compile", "gradcheck", "test_transformers", "test_distributed", "test_packed_encoder",
         "test_generation", "test_kvcache", "test_paged_kv")


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):
        items.sort(key=lambda it: not any(word in it.nodeid for word in _SLOW))
    shard = _shard(config)
    if shard is None:
        return
    i, n = shard
    keep = [it for it in items if zlib.crc32(it.nodeid.encode()) % n == i - 1]
    kept = {id(it) for it in keep}
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in kept])
    items[:] = keep


def pytest_runtest_setup(item):
    # TORCH_VARLEN_TEST_DEADLINE (a Unix time): tests that would start after it are skipped with
    # that reason, so that a run bounded by a machine's time limit still ends, reports, and
    # names what it did not run instead of being killed mid-way.
    deadline = os.environ.get("TORCH_VARLEN_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(_NOT_RUN)


def pytest_collection_finish(session):
    if not hasattr(session.config, "workerinput"):  # without xdist; under it the controller collects nothing
        _REPORT["collected"] = len(session.items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _REPORT["collected"] = len(ids)  # every worker collects the same (sharded) list


def pytest_runtest_logreport(report):
    if report.when == "call":
        _REPORT["durations"].append((round(report.duration, 1), report.nodeid))
    if report.when == "call" and report.passed:
        _REPORT["passed"] += 1
    elif report.failed:
        _REPORT["failed"].append(f"{report.nodeid} ({report.when})")
    elif report.skipped:
        if hasattr(report, "wasxfail"):
            _REPORT["xfailed"] += 1
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _REPORT["skipped"].append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_sessionfinish(session, exitstatus):
    path = session.config._varlen_report_path
    if not path or hasattr(session.config, "workerinput"):  # xdist workers: the controller writes
        return
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    report = {
        "commit": os.environ.get("TORCH_VARLEN_COMMIT", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": ".".join(map(str, __import__("sys").version_info[:3])),
        "command": os.environ.get("TORCH_VARLEN_TEST_COMMAND", ""),
        "shard": session.config._varlen_shard or "1/1",
        "passed": _REPORT["passed"],
        "failed": len(_REPORT["failed"]),
        "failures": _REPORT["failed"],
        "xfailed": _REPORT["xfailed"],
        "skipped": sorted(_REPORT["skipped"], key=lambda s: s["test"]),
        # collected = passed + failed + xfailed + skipped when every test reported; "not_run"
        # counts the tests the deadline skipped, so a run that is not the whole suite says so
        "collected": _REPORT["collected"],
        "not_run": sum(s["reason"] == _NOT_RUN for s in _REPORT["skipped"]),
        "slowest": [{"test": t, "seconds": d} for d, t in sorted(_REPORT["durations"], reverse=True)[:40]],
        "exit_status": int(exitstatus),
        "seconds": round(time.time() - _REPORT["start"], 1),
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
