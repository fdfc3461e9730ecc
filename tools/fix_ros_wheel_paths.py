#!/usr/bin/env python3
"""Rewrite the build machine's Python paths baked into the ROS 2 wheels' CMake files.

The PyPI wheels of ROS 2 Kilted were built under manylinux's `/opt/python/cpXY-cpXY/`, and their
`<venv>/share/**/*.cmake` files still name that interpreter's include directory and numpy's.
CMake's generate step rejects them ("includes non-existent path"), so they are pointed at this
interpreter's include directory and this venv's numpy. Run it with the venv's own Python after
the last `pip install` (a newly installed wheel brings the old paths back); running it twice is
harmless.

Usage: .venv/bin/python tools/fix_ros_wheel_paths.py .venv
"""
from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

BUILD_PYTHON = r"/opt/python/cp\d+-cp\d+"
PYTHON_INCLUDE = re.compile(BUILD_PYTHON + r"/include/python\d+\.\d+")
NUMPY_INCLUDE = re.compile(BUILD_PYTHON + r"/lib/python\d+\.\d+/site-packages/numpy/(?:_core|core)/include")
ANY_BUILD_PATH = re.compile(BUILD_PYTHON + r"[^;\"'\s)]*")


def fix_file(path: Path, python_include: str, numpy_include: str) -> bool:
    """Rewrite one file in place; True if it changed. Unknown build paths are reported, not guessed."""
    text = path.read_text()
    fixed = NUMPY_INCLUDE.sub(numpy_include, text)
    fixed = PYTHON_INCLUDE.sub(python_include, fixed)
    for leftover in sorted(set(ANY_BUILD_PATH.findall(fixed))):
        print(f"warning: {path}: unrecognised build path left as is: {leftover}", file=sys.stderr)
    if fixed == text:
        return False
    path.write_text(fixed)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    venv = Path(argv[1]).resolve()
    # The replacement paths come from the running interpreter, so it must be the venv's.
    if Path(sys.prefix).resolve() != venv:
        print(f"error: run this with {venv}/bin/python (running under {sys.prefix})", file=sys.stderr)
        return 2
    import numpy

    python_include = sysconfig.get_paths()["include"]
    if not (Path(python_include) / "Python.h").is_file():
        print(f"error: {python_include}/Python.h is missing: install the Python development headers",
              file=sys.stderr)
        return 1
    numpy_include = numpy.get_include()
    changed = [p for p in sorted((venv / "share").rglob("*.cmake")) if fix_file(p, python_include, numpy_include)]
    print(f"fix_ros_wheel_paths: rewrote {len(changed)} CMake file(s) under {venv / 'share'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
