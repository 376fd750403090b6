"""Builds the extension (and the `kestrel` CLI that kestrel.bench runs) with Kestrel's CMake
project one directory up; pyproject.toml holds the metadata."""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not os.path.isfile(os.path.join(ROOT, "CMakeLists.txt")):
            raise RuntimeError(f"{ROOT}: not Kestrel's source tree (build from a checkout)")
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        configure = [
            "cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
            "-DKESTREL_PYTHON=ON", "-DKESTREL_TESTS=OFF", "-DKESTREL_BENCH=OFF",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        jobs = str(self.parallel or os.cpu_count() or 1)
        subprocess.run(
            ["cmake", "--build", build_dir, "-j", jobs, "--target", "kestrel_python", "kestrel"],
            check=True,
        )
        built = os.path.join(build_dir, "python", "kestrel")
        (module,) = glob.glob(os.path.join(built, "_kestrel*.so"))
        target = self.get_ext_fullpath(ext.name)
        package = os.path.dirname(target)
        os.makedirs(os.path.join(package, "bin"), exist_ok=True)
        shutil.copyfile(module, target)
        # The CUDA backend module is looked for beside the extension.
        for cuda in glob.glob(os.path.join(built, "libkestrel_cuda.so")):
            shutil.copyfile(cuda, os.path.join(package, "libkestrel_cuda.so"))
        cli = os.path.join(package, "bin", "kestrel")
        shutil.copyfile(os.path.join(build_dir, "kestrel"), cli)
        os.chmod(cli, 0o755)
        # `kestrel bench` finds its default prompt at bin/../bench/prompt.txt.
        os.makedirs(os.path.join(package, "bench"), exist_ok=True)
        shutil.copyfile(
            os.path.join(ROOT, "bench", "prompt.txt"), os.path.join(package, "bench", "prompt.txt")
        )


setup(ext_modules=[Extension("kestrel._kestrel", sources=[])], cmdclass={"build_ext": CMakeBuild})
