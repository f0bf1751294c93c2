"""torch.utils.hipify converts torch_varlen/_C/cuda to HIP with no hand edits (runs without a GPU)."""

import re
import shutil
from pathlib import Path

from torch.utils.hipify import hipify_python

SOURCES = Path(__file__).resolve().parents[1] / "torch_varlen" / "_C"
# CUDA runtime identifiers (cudaMemcpyAsync, cudaStream_t, ...) and headers that must not survive.
LEFTOVER_CUDA = re.compile(r"\bcuda[A-Z]\w*|#include\s*[<\"](cuda_runtime|cuda\.h|c10/cuda/|ATen/cuda/|cub/)|<<<")


def test_hipify_runs_clean_over_cuda_sources(tmp_path):
    project = tmp_path / "_C"
    shutil.copytree(SOURCES, project, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    cuda_files = sorted((project / "cuda").glob("*.cu")) + sorted((project / "cuda").glob("*.cuh"))
    assert cuda_files, "no CUDA sources found under _C/cuda"
    result = hipify_python.hipify(
        project_directory=str(project),
        output_directory=str(project),
        includes=[str(project / "*")],
        header_include_dirs=[str(project)],
        is_pytorch_extension=True,
        show_progress=False,
    )
    for source in cuda_files:
        entry = result[str(source)]
        assert entry.status.startswith("[ok"), f"{source.name}: hipify status {entry.status}"
        hip_text = Path(entry.hipified_path).read_text()
        code = "\n".join(line.split("//")[0] for line in hip_text.splitlines())  # drop comments
        leftovers = sorted(set(m.group(0) for m in LEFTOVER_CUDA.finditer(code)))
        assert not leftovers, f"{source.name}: CUDA-only code left after hipify: {leftovers}"
        if "<<<" in source.read_text():
            assert "hipLaunchKernelGGL" in hip_text
    bad = {path: r.status for path, r in result.items() if not r.status.startswith(("[ok", "[skipped"))}
    assert not bad, f"hipify reported problems: {bad}"
