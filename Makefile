# mace_ros: `make demo` and `make test` set everything up on a fresh machine (see README.md).
SHELL := /bin/bash
VENV := .venv
# install/setup.bash is not `set -u` safe, hence the set +u around it.
WITH_INSTALL := set +u; source install/setup.bash; set -u;

.PHONY: setup build test demo clean

# .venv with the pinned requirements, and the ROS wheels' CMake paths fixed.
setup:
	bash scripts/setup.sh --skip-build

# setup, then colcon build into build/ and install/.
build:
	bash scripts/setup.sh

test: build
	set -euo pipefail; $(WITH_INSTALL) $(VENV)/bin/pytest test/

demo: build
	set -euo pipefail; $(WITH_INSTALL) $(VENV)/bin/python scripts/demo.py

clean:
	rm -rf build install log
