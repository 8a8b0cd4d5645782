"""Builds the ``pccl._native`` and ``pccl._shm`` C extensions; all metadata lives in pyproject.toml."""

from setuptools import Extension, setup

native = Extension(
    "pccl._native",
    sources=["native/module.c", "native/kernels.c"],
    include_dirs=["native"],
    # Rebuild when the header changes, and ship it in the sdist.
    depends=["native/kernels.h"],
    # No -march=native in what users install. -ffp-contract=off keeps a*b+c as two rounded
    # operations so results match the numpy reference byte for byte.
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-strict-aliasing"],
    # Stable ABI (CPython >= 3.11): one wheel per platform serves every later Python. Measured
    # the same as the version-specific build (kernels and per-call overhead; see the commit).
    define_macros=[("Py_LIMITED_API", "0x030B0000")],
    py_limited_api=True,
)

# Futex signalling of same-host shared-memory links (pccl.peer.shm_link): separate from the
# kernels so either builds and loads without the other.
shm = Extension(
    "pccl._shm",
    sources=["native/shm.c"],
    extra_compile_args=["-O2", "-std=gnu11"],
    define_macros=[("Py_LIMITED_API", "0x030B0000")],
    py_limited_api=True,
)

setup(ext_modules=[native, shm], options={"bdist_wheel": {"py_limited_api": "cp311"}})
