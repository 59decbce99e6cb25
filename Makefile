# Switchyard: the two commands of the quick start, and their parts.
#   make profile   set up, build, then profile (GPU when there is one, else the CPU backend, small config)
#   make test      set up, build, then run the whole test suite (GPU tests skip with a reason without a GPU)
#   make test-sanitize  CPU build with ASan + UBSan (own folder) running the CPU suite, then every fuzz
#                  target (clang, libFuzzer) for FUZZ_SECONDS each (CI runs it after `make test`: .ci/run)
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

SAN_BUILD_DIR ?= build-sanitize
FUZZ_BUILD_DIR ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_CXX ?= $(shell command -v clang++-14 || command -v clang++)
FUZZ_CC ?= $(shell command -v clang-14 || command -v clang)
FUZZ_TARGETS := fuzz_safetensors fuzz_npy fuzz_weights fuzz_cli

.PHONY: all setup configure build test test-gpu test-sanitize fuzz profile clean
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

# Sanitizers (issue 16), CPU only, two builds of their own:
#  $(SAN_BUILD_DIR): g++ with ASan + UBSan (float-cast-overflow included, -fno-sanitize-recover: the first report
#    fails the test) running the CPU suite. No torch binding: torch's wheels are not ASan-built and an ASan
#    executable cannot load them into python without LD_PRELOAD tricks, so the torch pytest tests are skipped here.
#  $(FUZZ_BUILD_DIR): clang 14 with libFuzzer + ASan + UBSan, only the fuzz targets, each run FUZZ_SECONDS.
$(SAN_BUILD_DIR)/CMakeCache.txt:
	@mkdir -p $(SAN_BUILD_DIR) && cmake -S . -B $(SAN_BUILD_DIR) $(GENERATOR) -DCMAKE_BUILD_TYPE=Release -DSWITCHYARD_CUDA=OFF \
	  -DSWITCHYARD_BUILD_TORCH=OFF -DSWITCHYARD_SANITIZE=ON $(CMAKE_ARGS) >$(SAN_BUILD_DIR)/configure.log 2>&1 || \
	  (cat $(SAN_BUILD_DIR)/configure.log; exit 1)

$(FUZZ_BUILD_DIR)/CMakeCache.txt:
	@mkdir -p $(FUZZ_BUILD_DIR) && cmake -S . -B $(FUZZ_BUILD_DIR) $(GENERATOR) -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=$(FUZZ_CXX) \
	  -DCMAKE_C_COMPILER=$(FUZZ_CC) -DSWITCHYARD_CUDA=OFF -DSWITCHYARD_BUILD_TORCH=OFF -DSWITCHYARD_FUZZ=ON \
	  $(CMAKE_ARGS) >$(FUZZ_BUILD_DIR)/configure.log 2>&1 || (cat $(FUZZ_BUILD_DIR)/configure.log; exit 1)

test-sanitize: setup $(SAN_BUILD_DIR)/CMakeCache.txt $(FUZZ_BUILD_DIR)/CMakeCache.txt
	@cmake --build $(SAN_BUILD_DIR) -j $(JOBS)
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --test-dir $(SAN_BUILD_DIR) --output-on-failure -j $(JOBS) -L cpu
	@cmake --build $(FUZZ_BUILD_DIR) -j $(JOBS) --target $(FUZZ_TARGETS)
	@bash tests/fuzz/run_fuzzers.sh $(FUZZ_BUILD_DIR) $(FUZZ_SECONDS)

# A longer local campaign: make fuzz FUZZ_SECONDS=3600 (new corpus entries in $(FUZZ_BUILD_DIR)/fuzz-corpus/).
fuzz: setup $(FUZZ_BUILD_DIR)/CMakeCache.txt
	@cmake --build $(FUZZ_BUILD_DIR) -j $(JOBS) --target $(FUZZ_TARGETS)
	@bash tests/fuzz/run_fuzzers.sh $(FUZZ_BUILD_DIR) $(FUZZ_SECONDS)

# GPU-labelled tests only (on the GPU machine).
test-gpu: build
	@ctest --test-dir $(BUILD_DIR) --output-on-failure -L gpu

# The report (PROFILE.md, profile.json), then its plots (skipped with a message when matplotlib is missing).
profile: build
	@$(BUILD_DIR)/switchyard profile --out $(PROFILE_OUT) $(PROFILE_ARGS)
	@python3 scripts/plot_profile.py $(PROFILE_OUT) --check || echo "profile: plots or the report check failed (see above)"

clean:
	rm -rf $(BUILD_DIR) $(BUILD_DIR).configure.log $(SAN_BUILD_DIR) \
	  $(FUZZ_BUILD_DIR)
