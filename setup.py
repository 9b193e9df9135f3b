"""Build script for the compiled relay engine.

Everything declarative lives in pyproject.toml; this file exists only because the
Cython extensions ``flux._splice`` (the relay engine) and ``flux._histogram`` need a build step.  ``FLUX_DEBUG_BUILD=1`` compiles
the engine with its descriptor/pipe accounting switched on (used by leak tests).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FLUX_DEBUG_BUILD") == "1"

extensions = [
    Extension(
        "flux._splice",
        ["src/flux/_splice.pyx"],
        extra_compile_args=["-O2", "-g0"] if not debug else ["-O0", "-g"],
        define_macros=[("FLUX_DEBUG_COUNTERS", "1")] if debug else [],
        # The HTTP/2 observer decodes header blocks with libnghttp2's HPACK decoder.
        libraries=["nghttp2"],
    ),
    Extension(
        "flux._histogram",
        ["src/flux/_histogram.pyx"],
        extra_compile_args=["-O2", "-g0"] if not debug else ["-O0", "-g"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "embedsignature": True},
        include_path=["src/flux"],
    )
)
