"""Add up the run reports of the shards of one make test-gpu (TEST_GPU_SHARD=1/n ... n/n) into one.

Usage: python tools/merge_test_reports.py shard1.json shard2.json ... -o benchmarks/results/gpu_tests.json
The shards must come from one commit and together cover 1/n .. n/n exactly once, unless
--incomplete is given: then missing shards are allowed, listed in "missing_shards", and the
report says in "complete": false that it is not a run of the whole suite. A shard whose deadline
(TEST_GPU_SECONDS) skipped tests ("not_run") or whose reports do not account for every collected
test (an interrupted run) makes the merged run incomplete too.
"""

import argparse
import json
import sys


def merge(reports, incomplete=False):
    first = reports[0]
    commits = {r["commit"] for r in reports}
    if len(commits) != 1:
        sys.exit(f"shards of different commits: {sorted(commits)}")
    shards = sorted(r.get("shard", "1/1") for r in reports)
    n = int(shards[0].split("/")[1])
    every = [f"{i}/{n}" for i in range(1, n + 1)]
    missing = [x for x in every if x not in shards]
    if len(set(shards)) != len(shards) or any(x not in every for x in shards) or (missing and not incomplete):
        sys.exit(f"shards {shards} do not cover 1/{n} .. {n}/{n} exactly once")
    out = {k: first[k] for k in ("commit", "device", "torch", "triton", "python")}
    out["date"] = max(r["date"] for r in reports)
    out["command"] = first.get("command", "")
    out["shard"] = f"{n} shards merged"
    for key in ("passed", "failed", "xfailed", "seconds"):
        out[key] = round(sum(r[key] for r in reports), 1)
    out["failures"] = sorted(f for r in reports for f in r["failures"])
    out["skipped"] = sorted((s for r in reports for s in r["skipped"]), key=lambda s: s["test"])
    out["exit_status"] = max(r["exit_status"] for r in reports)
    # reports of older runs lack these three; they count as unknown, not as complete
    out["collected"] = sum(r.get("collected") or 0 for r in reports)
    out["not_run"] = sum(r.get("not_run", 0) for r in reports)
    reported = out["passed"] + out["xfailed"] + len(out["skipped"]) + len({f.rsplit(" (", 1)[0] for f in out["failures"]})
    out["complete"] = not missing and out["not_run"] == 0 and out["collected"] == reported
    out["slowest"] = sorted((t for r in reports for t in r.get("slowest", [])), key=lambda t: -t["seconds"])[:40]
    if missing:
        out["missing_shards"] = missing
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--incomplete", action="store_true", help="allow missing shards (recorded as such)")
    a = ap.parse_args()
    merged = merge([json.load(open(p)) for p in a.reports], a.incomplete)
    with open(a.output, "w") as f:
        json.dump(merged, f, indent=1)
        f.write("\n")
    print(f"{a.output}: {merged['passed']} passed, {merged['failed']} failed, "
          f"{len(merged['skipped'])} skipped")


if __name__ == "__main__":
    main()
