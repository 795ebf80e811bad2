"""Builds fastattn's CPU extension (csrc/*.cpp, csrc/cpu/*.cpp: the sources setup.py compiles without CUDA) with
AddressSanitizer and UndefinedBehaviorSanitizer into a copy of the Python package, for tests/asan/run_asan.sh.

    python tests/asan/build.py OUT_DIR    ->  OUT_DIR/fastattn (the package, its _C built with the sanitizers)
"""
import glob
import os
import shutil
import sys

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# -g1 (line tables only): the reports still name file:line; full -g doubled the compile time (debug info for every
# torch template the sources instantiate), for variable info no report uses.
SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1"]


def main(out):
    pkg = os.path.join(out, "fastattn")
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "fastattn"), pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    build = os.path.join(out, "build")
    os.makedirs(build, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # The compilers must not run with libasan preloaded (run_asan.sh preloads it for this Python, which then loads the
    # built library): ~10% slower, for nothing.
    os.environ.pop("LD_PRELOAD", None)
    # -O1: fast enough to run the tests, and the sanitizers still see every access.
    so = cpp_extension.load(name="_C", sources=sources, build_directory=build, is_python_module=False,
                            extra_include_paths=[os.path.join(ROOT, "csrc")],
                            extra_cflags=["-O1", "-fopenmp"] + SAN, extra_ldflags=["-fopenmp"] + SAN, verbose=False)
    lib = glob.glob(os.path.join(build, "_C*.so"))[0]
    shutil.copy(lib, os.path.join(pkg, "_C" + __import__("sysconfig").get_config_var("EXT_SUFFIX")))
    print(f"built {lib} -> {pkg}")


if __name__ == "__main__":
    main(sys.argv[1])
