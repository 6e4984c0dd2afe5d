"""pip build of tf_bf16: the ``tf_bf16`` package plus ``transforms/`` and ``kernels/`` mapped in.

``transforms/`` and ``kernels/`` sit at the repository root but install as
``tf_bf16.transforms`` and ``tf_bf16.kernels``. Set ``TF_BF16_NO_TF_DEPENDENCY=1`` at install
time to leave TensorFlow out of the requirements (for tensorflow-cpu or
intel-tensorflow-avx512 users; the ``[intel]`` extra needs it). The optional C++ kernels are
compiled after installation against the TensorFlow installed then: ``pip install
'tf_bf16[kernels]'`` brings oneDNN, ``python -m tf_bf16.kernels.build`` compiles them
(``make install`` does both).
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Stock TensorFlow: the suite runs on 2.21 (CI installs the newest release in this range);
# 2.22+ is untested. The floor also makes pip refuse `tensorflow` next to the [intel] extra's
# 2.14 build (both install the `tensorflow` package) instead of installing the two together.
TF_VERSIONS = ">=2.16,<2.22"
TENSORFLOW = "tensorflow" + TF_VERSIONS
NO_TF_SWITCH = "TF_BF16_NO_TF_DEPENDENCY"
# intel-tensorflow-avx512 2.14.0 is its last release (CPython 3.9-3.11, Linux x86-64 wheels
# only; needs AVX-512, dies with "Illegal instruction" on AVX2-only CPUs). It is built against
# NumPy 1.x but does not say so: with NumPy 2 its import fails ("_ARRAY_API not found").
# Its own metadata pins the rest (keras 2.14, ml-dtypes 0.2.0, protobuf<5). The bundled example
# converts with it.
INTEL_TENSORFLOW = ["intel-tensorflow-avx512==2.14.*", "numpy<2"]


def read_version() -> str:
    """The single source of the version: ``__version__`` in tf_bf16/__init__.py."""
    with open(os.path.join(HERE, "tf_bf16", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if not match:
        raise RuntimeError("tf_bf16/__init__.py does not define __version__")
    return match.group(1)


def install_requires() -> list:
    """Runtime requirements; TensorFlow only unless the no-TF switch is set."""
    requires = ["numpy", "pyyaml", "absl-py", "pydantic>=2"]
    if os.environ.get(NO_TF_SWITCH, "").strip().lower() not in ("1", "true", "yes", "on"):
        requires.append(TENSORFLOW)
    return requires


def read_readme() -> str:
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


setup(
    name="tf_bf16",
    version=read_version(),
    description="Convert TensorFlow models to mixed BF16/FP32 for Intel Xeon CPU inference.",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    # Listed explicitly: find_packages cannot see the mapped subpackages, and editable
    # installs only resolve package_dir mappings for packages named here.
    packages=sorted(set(find_packages(include=["tf_bf16", "tf_bf16.*"]))
                    | {"tf_bf16.transforms", "tf_bf16.kernels"}),
    package_dir={
        "tf_bf16": "tf_bf16",
        "tf_bf16.transforms": "transforms",
        "tf_bf16.kernels": "kernels",
    },
    install_requires=install_requires(),
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "scikit-learn"],
        "intel": INTEL_TENSORFLOW,
        "cpu": ["tensorflow-cpu" + TF_VERSIONS],
        # oneDNN 3.2 with the OpenMP CPU runtime, for tf_bf16.kernels (newer PyPI oneDNN wheels
        # are SYCL builds with no CPU engine).
        "kernels": ["onednn-cpu-gomp==2023.2.0", "onednn-devel-cpu-gomp==2023.2.0"],
    },
    package_data={"tf_bf16.kernels": ["*.cc", "*.h"]},
    entry_points={"console_scripts": ["tf-bf16 = tf_bf16.cli:run"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
