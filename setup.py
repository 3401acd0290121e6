"""Build the optional compiled CPU kernel ``kama._cgivens`` (plain C, no torch headers, no network).

If no C compiler is available the build goes on without it (``optional=True``) and ``kama`` falls back to
the pure-PyTorch path with one warning.
"""

import sys

from setuptools import Extension, setup

args = ["-O3", "-std=c11", "-ffp-contract=fast", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
if sys.platform == "win32":  # pragma: no cover
    args = ["/O2"]

setup(
    ext_modules=[
        Extension(
            "kama._cgivens",
            sources=["src/kama/_cgivens.c"],
            extra_compile_args=args,
            extra_link_args=["-pthread"] if sys.platform != "win32" else [],
            libraries=(["m", "dl"] if sys.platform.startswith("linux") else ["m"]) if sys.platform != "win32" else [],
            optional=True,
        )
    ]
)
