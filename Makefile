# Set-up and tests of hiera_perception.
#   make test   creates ./.venv on first use (CPU torch, ROS 2 Kilted wheels, the message package, the project)
#               and runs pytest; later runs only reinstall the project itself (a few seconds).
#   make venv   the set-up alone;  make clean  build leftovers;  make distclean  also the venv.
# Third-party installs are keyed on the requirement files (stamps in .venv/), not on this Makefile.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# launch, launch_ros, launch_testing, ros2cli and cv_bridge are not on PyPI: wheels of them lie beside the
# project's checkout on its machines. Without that folder the launch tests skip and conversion uses the fallback.
ROS_WHEELS ?= ../shared/ros/wheels
ROS_WHEEL_FILES := $(wildcard $(ROS_WHEELS)/*.whl)
MSGS := hiera_perception_msgs
MSGS_SOURCES := $(addprefix $(MSGS)/,package.xml CMakeLists.txt pyproject.toml) \
	$(wildcard $(MSGS)/msg/*.msg $(MSGS)/srv/*.srv)
REQUIREMENTS := requirements.txt requirements-ros.txt requirements-test.txt requirements-oracle.txt
PYTEST_ARGS ?=

.PHONY: venv test install-project clean distclean demo embedded-model

venv: $(VENV)/.msgs-installed install-project

$(PY):
	$(PYTHON) -m venv $(VENV)

# setuptools>=70.1 builds wheels without the `wheel` package (the project is built --no-build-isolation).
# torch==2.13.0 comes from requirements.txt: the CPU build, never a bare `torch`.
$(VENV)/.deps-installed: $(REQUIREMENTS) $(ROS_WHEEL_FILES) tools/ament_prefix_pth.py | $(PY)
	$(PIP) install --upgrade pip 'setuptools>=70.1'
	$(PIP) install -r requirements.txt -r requirements-ros.txt -r requirements-test.txt
	$(PIP) install --no-deps -r requirements-oracle.txt
ifneq ($(ROS_WHEEL_FILES),)
	$(PIP) install --no-deps $(ROS_WHEEL_FILES)
endif
	$(PY) tools/ament_prefix_pth.py
	touch $@

# rosidl code generation and a C build through scikit-build-core, in pip's isolated build environment (about a
# minute). Rebuilt when its sources or the ROS 2 wheels' versions change, not for other requirements.
$(VENV)/.msgs-installed: $(MSGS_SOURCES) requirements-ros.txt | $(VENV)/.deps-installed
	$(PIP) install ./$(MSGS)
	touch $@

# Not editable, so share/hiera_perception (launch, config, models) and lib/hiera_perception (what `ros2 run` and
# launch_ros start) exist in the venv prefix as on a real install. build/ goes first: setuptools would otherwise
# pack files deleted from the sources since the last build.
install-project: $(VENV)/.msgs-installed
	rm -rf build
	$(PIP) install --quiet --no-deps --no-build-isolation .

# Tests talk DDS on this machine only, in a domain of their own (ROS_DOMAIN_ID from the environment, else from
# the shell's PID, 1..101). pytest's exit 5 (no test collected) fails like any other error.
test: venv
	@rc=0; \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
	ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST \
	ROS_DOMAIN_ID="$${ROS_DOMAIN_ID:-$$(( $$$$ % 101 + 1 ))}" \
	HIERA_PERCEPTION_REQUIRE_ROS=1 \
	HIERA_PERCEPTION_REQUIRE_LAUNCH=$(if $(ROS_WHEEL_FILES),1,0) \
	$(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# The README's main job: synthetic camera -> perception node (embedded model) -> printed labels, over ROS 2.
# ARGS passes options through, e.g. make demo ARGS="--duration 60".
demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST $(PY) -m hiera_perception demo $(ARGS)

# Rebuild models/hiera_tiny_synthetic.pt from scratch: synth -> curriculum -> finetune -> MAE decoder -> eval -> card.
embedded-model: venv
	$(PY) tools/make_embedded_model.py
