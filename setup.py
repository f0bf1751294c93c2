"""Builds torch_varlen's operator library by driving CMakeLists.txt (the one build definition).

CPU sources are always built; CUDA sources when the installed torch has CUDA and nvcc is
found; on ROCm the CUDA sources are hipified first (torch.utils.hipify) and built as HIP.
Build with `pip install --no-build-isolation -e .` so the installed torch is the one used.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        with_cuda = torch.version.cuda is not None and shutil.which(
            os.environ.get("CUDACXX", "nvcc")
        ) is not None
        args = []
        if torch.version.hip is not None:
            args.append(f"-DTORCH_VARLEN_HIP_DIR={self._hipify(build_dir)}")
            with_cuda = False
        args += [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent}",
            f"-DTORCH_VARLEN_OUTPUT_NAME={target.name}",
            f"-DTORCH_VARLEN_CUDA={'ON' if with_cuda else 'OFF'}",
            "-DTORCH_VARLEN_EXAMPLE=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])

    @staticmethod
    def _hipify(build_dir: Path) -> Path:
        """ROCm: translate _C/cuda/*.cu(h) to HIP with torch's hipify (no hand edits)."""
        from torch.utils.hipify import hipify_python

        out = build_dir / "hip"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ROOT / "torch_varlen" / "_C", out)
        hipify_python.hipify(
            project_directory=str(out), output_directory=str(out), includes=[str(out / "cuda" / "*")],
            is_pytorch_extension=True, show_detailed=False,
        )
        return out


setup(
    ext_modules=[Extension("torch_varlen._C._kernels", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
