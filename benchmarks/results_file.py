"""The shared benchmark results file: ``{"meta": {bench: meta, ...}, "rows": [{"bench": ...}, ...]}``.

``record`` merges one benchmark's rows into it the way ``demo/minilm_demo.py --record`` does:
the benchmark's earlier rows are replaced, every other benchmark's rows and meta are kept.
"""

from __future__ import annotations

import json
from pathlib import Path


def record(path: Path, bench: str, meta: dict, rows: list) -> dict:
    """Merge ``rows`` (each with ``"bench": bench``) into ``path`` -> the merged file's data.

    Every earlier row of ``bench`` is dropped (a run is one consistent set of measurements);
    ``meta`` goes under ``data["meta"][bench]``. The file is created when missing.
    """
    path = Path(path)
    wrong = sorted({r.get("bench") for r in rows} - {bench}, key=str)
    if wrong:
        raise ValueError(f"record: rows of bench {wrong} given for bench {bench!r}")
    data = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    data.setdefault("meta", {})[bench] = meta
    data["rows"] = [r for r in data.get("rows", []) if r.get("bench") != bench] + list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data
