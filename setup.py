"""Build of the pykernels extensions.

Two Cython modules, each with a pure-Python twin that serves when the module is
missing: ``pykernels.policy._sketch`` (the quantile sketch, ``policy/_sketch.pyx``,
twin in ``policy/sketch.py``) and ``pykernels.policy._scan`` (the planner's
per-decision loop, ``policy/_scan.pyx``, twin in ``policy/scan.py``).

One pybind11 module, ``pykernels._core``. The per-ISA kernel translation units
are compiled with their own ISA flags (never tuned to the build host) and linked into the same
module; the dispatcher picks one table at import from CPUID + XCR0. Everything
else (runtime, bindings, the generic kernels) is compiled for the x86-64
baseline, so importing the module is safe on any x86-64 CPU.

Environment switches:
  PYKERNELS_BUILD_JOBS=N        parallel compile jobs (default: CPU count)
  PYKERNELS_SANITIZE=address,undefined   build with ASan/UBSan (tests only)
"""
import os

from Cython.Build import cythonize
from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import Extension, find_packages, setup

ISA_UNITS = {
    "avx2": (
        ["csrc/kernels/avx2/gemm_avx2.cc",
         "csrc/kernels/avx2/attention_avx2.cc",
         "csrc/kernels/avx2/encoder_avx2.cc",
         "csrc/kernels/avx2/peaks_avx2.cc"],
        ["-mavx2", "-mfma", "-mf16c"],
    ),
    # int8 entry points only, swapped in when CPUID reports AVX-VNNI
    "avx2_vnni": (
        ["csrc/kernels/avx2/gemm_avx2_vnni.cc"],
        ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    ),
    "avx512": (
        ["csrc/kernels/avx512/gemm_avx512.cc",
         "csrc/kernels/avx512/attention_avx512.cc",
         "csrc/kernels/avx512/encoder_avx512.cc",
         "csrc/kernels/avx512/peaks_avx512.cc"],
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
         "-mavx512vnni", "-mfma", "-mf16c",
         "-Wno-maybe-uninitialized"]  # GCC 12 false positive in avx512fintrin.h,
    ),
}

BASELINE_SOURCES = [
    "csrc/bindings/module.cc",
    "csrc/bindings/checks.cc",
    "csrc/bindings/gemm.cc",
    "csrc/bindings/attention.cc",
    "csrc/bindings/encoder.cc",
    "csrc/runtime/cpu.cc",
    "csrc/runtime/dispatch.cc",
    "csrc/runtime/pack.cc",
    "csrc/runtime/peaks.cc",
    "csrc/runtime/threadpool.cc",
    "csrc/runtime/workspace.cc",
    "csrc/kernels/reference/gemm_generic.cc",
    "csrc/kernels/reference/attention_generic.cc",
    "csrc/kernels/reference/encoder_generic.cc",
    "csrc/kernels/reference/peaks_generic.cc",
]

HEADERS = [
    os.path.join(root, f)
    for root, _, files in os.walk("csrc")
    for f in files
    if f.endswith((".h", ".inc"))
]

compile_args = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-math-errno"]
link_args = ["-pthread"]
sanitize = os.environ.get("PYKERNELS_SANITIZE", "").strip()
if sanitize:
    compile_args += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g", "-O1"]
    link_args += [f"-fsanitize={sanitize}"]


class BuildExtPerIsa(build_ext):
    """Compiles each ISA's units with its own flags, then links them in."""

    def build_extension(self, ext):
        if ext.name != "pykernels._core":  # the Cython modules: plain C, baseline flags
            return super().build_extension(ext)
        objects = []
        for _isa, (sources, flags) in ISA_UNITS.items():
            objects += self.compiler.compile(
                sources,
                output_dir=self.build_temp,
                include_dirs=ext.include_dirs,
                extra_postargs=list(ext.extra_compile_args) + flags,
                depends=HEADERS,
            )
        ext.extra_objects = objects
        super().build_extension(ext)


ParallelCompile("PYKERNELS_BUILD_JOBS", default=0).install()

setup(
    # every package under pykernels/, plus policy/ installed as pykernels.policy
    packages=find_packages(include=["pykernels", "pykernels.*"]) + ["pykernels.policy"],
    package_dir={"pykernels": "pykernels", "pykernels.policy": "policy"},
    ext_modules=[
        Pybind11Extension(
            "pykernels._core",
            BASELINE_SOURCES,
            include_dirs=["csrc/include"],
            cxx_std=17,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            depends=HEADERS,
        ),
        *cythonize(
            # -ffp-contract=off: no FMA contraction, so the compiled code
            # computes exactly what its pure-Python twin computes
            [Extension(f"pykernels.policy.{name}", [f"policy/{name}.pyx"],
                       extra_compile_args=["-O2", "-ffp-contract=off"])
             for name in ("_sketch", "_scan")],
            compiler_directives={"language_level": "3"},
            quiet=True,
        ),
    ],
    cmdclass={"build_ext": BuildExtPerIsa},
)
