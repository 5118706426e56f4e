"""Build of the C extension ``blockstream._blockstream``.

Project metadata lives in pyproject.toml; this file only adds the extension.
Compiler and linker flags come from pkg-config.  A missing system library
fails the build with the name of the Debian package that provides it.
"""

from __future__ import annotations

import shutil
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# pkg-config module -> (human name, Debian package, minimum version)
LIBRARIES = [
    ("libnbd", "libnbd", "libnbd-dev", "1.14"),
    ("libzstd", "libzstd", "libzstd-dev", None),
    ("libxxhash", "libxxhash", "libxxhash-dev", "0.8"),
    ("libcrypto", "libcrypto (OpenSSL 3)", "libssl-dev", "3.0"),
]

SOURCES = [
    "blockstream/src/module.c",
    "blockstream/src/stream.c",
    "blockstream/src/segments.c",
    "blockstream/src/hash.c",
    "blockstream/src/blockstatus.c",
    "blockstream/src/connect.c",
]


class MissingLibrary(SystemExit):
    pass


def _pkg_config(*args: str) -> list[str]:
    out = subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True).stdout
    return out.split()


def pkg_config_flags() -> tuple[list[str], list[str]]:
    """Return (cflags, libs) for every library, or exit naming the package."""
    if shutil.which("pkg-config") is None:
        raise MissingLibrary("pkg-config not found: apt-get install pkg-config")
    cflags: list[str] = []
    libs: list[str] = []
    for module, name, package, minimum in LIBRARIES:
        try:
            _pkg_config("--exists", module)
        except subprocess.CalledProcessError:
            raise MissingLibrary(f"{name} not found: apt-get install {package}") from None
        if minimum is not None:
            try:
                _pkg_config(f"--atleast-version={minimum}", module)
            except subprocess.CalledProcessError:
                version = _pkg_config("--modversion", module)
                raise MissingLibrary(
                    f"{name} {' '.join(version)} is too old (need >= {minimum}): apt-get install {package}"
                ) from None
        cflags += _pkg_config("--cflags", module)
        libs += _pkg_config("--libs", module)
    return cflags, libs


class BuildExt(build_ext):
    """Fills in pkg-config flags only when the extension is really built."""

    def build_extensions(self) -> None:
        cflags, libs = pkg_config_flags()
        for ext in self.extensions:
            ext.extra_compile_args = [
                *cflags,
                "-std=gnu11",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-missing-field-initializers",
                "-pthread",
                *ext.extra_compile_args,
            ]
            ext.extra_link_args = [*libs, "-pthread", *ext.extra_link_args]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "blockstream._blockstream",
            sources=SOURCES,
            depends=["blockstream/src/bs.h"],
            libraries=["m"],
        )
    ],
    package_data={"blockstream": ["py.typed", "*.pyi"]},
    cmdclass={"build_ext": BuildExt},
)
