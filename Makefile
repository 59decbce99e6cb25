# Switchyard: the two commands of the quick start, and their parts.
#   make profile   set up, build, then profile (GPU when there is one, else the CPU backend, small config)
#   make test      set up, build, then run the whole test suite (GPU tests skip with a reason without a GPU)
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
PROFILE_ARGS ?=
PROFILE_OUT ?= report
DEPS_PREFIX := $(wildcard $(CURDIR)/.deps/root/usr)
ifneq ($(DEPS_PREFIX),)
  CMAKE_ARGS += -DCMAKE_PREFIX_PATH=$(DEPS_PREFIX)
endif
GENERATOR := $(shell command -v ninja >/dev/null 2>&1 && echo "-G Ninja")

.PHONY: all setup configure build test test-gpu profile clean
all: build

setup:
	@bash scripts/setup.sh

$(BUILD_DIR)/CMakeCache.txt:
	@cmake -S . -B $(BUILD_DIR) $(GENERATOR) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS) >$(BUILD_DIR).configure.log 2>&1 || \
	  (cat $(BUILD_DIR).configure.log; exit 1)

configure: setup $(BUILD_DIR)/CMakeCache.txt

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	@ctest --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS)

# GPU-labelled tests only (on the GPU machine).
test-gpu: build
	@ctest --test-dir $(BUILD_DIR) --output-on-failure -L gpu

# The report (PROFILE.md, profile.json), then its plots (skipped with a message when matplotlib is missing).
profile: build
	@$(BUILD_DIR)/switchyard profile --out $(PROFILE_OUT) $(PROFILE_ARGS)
	@python3 scripts/plot_profile.py $(PROFILE_OUT) --check || echo "profile: plots or the report check failed (see above)"

clean:
	rm -rf $(BUILD_DIR) $(BUILD_DIR).configure.log
