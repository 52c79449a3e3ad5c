"""Build the optional C kernels of the chunk codecs (mvc/store/_kernels.c).

Everything else is declared in pyproject.toml. Without a C compiler the build of the extension
fails quietly (optional=True) and mvc uses the same transforms written in numpy
(mvc/store/kernels.py): the same bytes, slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mvc.store._kernels", ["mvc/store/_kernels.c"], optional=True,
                             extra_compile_args=["-O3", "-ffp-contract=off"])])
