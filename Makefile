# flashmoe build.
#   make              build/flashmoe and build/libflashmoe.a (CPU backend)
#   make test         build and run the test suite (closes with "N passed, N failed")
#   make test SAN=1   the same under AddressSanitizer + UndefinedBehaviorSanitizer (in build-san/)
#   make CUDA=1       adds the CUDA backend (src/backend/cuda/*.cu, nvcc; docs/CUDA.md) in build/cuda/:
#                     build/cuda/flashmoe, build/cuda/run_tests (with the cuda_ tests), build/cuda/cuda_bench
#   make cuda-check   compiles the CUDA sources (sm_90) and their C users only: no GPU, no link; ~25 s
#   make clean

CC      ?= cc
SAN     ?= 0
CUDA    ?= 0
BUILD   ?= $(if $(filter 1,$(SAN)),build-san,build)$(if $(filter 1,$(CUDA)),/cuda)

CPPFLAGS += -Iinclude -Isrc -D_GNU_SOURCE -MMD -MP
CFLAGS   ?= -O2 -g
CFLAGS   += -std=c11 -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -Wno-format-truncation -pthread -fno-math-errno
LDLIBS   += -l:liburing.a -l:libjansson.a -l:libpcre2-8.a -l:libutf8proc.a -l:libedit.a -l:libbsd.a -l:libmd.a -l:libtinfo.a -lm -pthread

ifeq ($(SAN),1)
CFLAGS  += -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
LDFLAGS += -fsanitize=address,undefined
endif

LIB_SRC  := $(sort $(shell find src -name '*.c' -not -path 'src/cli/*'))
CLI_SRC  := $(sort $(wildcard src/cli/*.c))
TEST_SRC := $(sort $(wildcard tests/*.c))

LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
CLI_OBJ  := $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
TEST_OBJ := $(TEST_SRC:%.c=$(BUILD)/obj/%.o)

# ---- CUDA backend (make CUDA=1). CUDA_ARCH: the GPUs to build machine code for (Ampere, Ada,
# Hopper) plus compute_90 PTX that newer GPUs compile at load time; e.g. CUDA_ARCH='-gencode
# arch=compute_90,code=sm_90' builds for Hopper only. cudart (and libstdc++) are linked statically, so
# the binary needs only the driver (libcuda) at run time and runs, skipping the cuda_ tests, without one.
CUDA_HOME ?= /usr/local/cuda
NVCC      ?= $(if $(shell command -v nvcc 2>/dev/null),nvcc,$(CUDA_HOME)/bin/nvcc)
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86 \
             -gencode arch=compute_89,code=sm_89 -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_90,code=compute_90
NVCCFLAGS ?= -O3 -std=c++17 -Xcompiler -Wall,-Wextra,-Wno-unused-parameter,-Wno-format-truncation -Werror all-warnings
CUDA_SRC  := $(sort $(wildcard src/backend/cuda/*.cu))
ifeq ($(CUDA),1)
CPPFLAGS  += -DFM_HAVE_CUDA
LIB_OBJ   += $(CUDA_SRC:%.cu=$(BUILD)/obj/%.o)
# libstdc++ (static) for the C++ runtime of nvcc's host code (thread-safe statics in kernel stubs)
LDLIBS    += -L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lrt -l:libstdc++.a
else
TEST_OBJ  := $(filter-out $(BUILD)/obj/tests/test_cuda.o,$(TEST_OBJ))
endif

.PHONY: all test clean
all: $(BUILD)/flashmoe $(BUILD)/libflashmoe.a

# CUDA rules (the variables are above)
ifeq ($(CUDA),1)
all: $(BUILD)/cuda_bench

$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(filter-out -D_GNU_SOURCE,$(CPPFLAGS)) $(NVCCFLAGS) $(CUDA_ARCH) -c $< -o $@

$(BUILD)/cuda_bench: $(BUILD)/obj/tools/cuda_bench.o $(BUILD)/libflashmoe.a
	$(CC) $(LDFLAGS) $(CFLAGS) $^ $(LDLIBS) -o $@
endif

.PHONY: cuda-check
cuda-check:
	@mkdir -p build/cuda-check
	for f in $(CUDA_SRC); do \
	  $(NVCC) -Iinclude -Isrc $(NVCCFLAGS) -gencode arch=compute_90,code=sm_90 -c $$f -o build/cuda-check/$$(basename $$f).o || exit 1; \
	done
	$(NVCC) -Iinclude -Isrc $(NVCCFLAGS) -gencode arch=compute_90,code=sm_90 -DFM_CUDA_SCALE_PREFETCH=0 \
	  -c src/backend/cuda/matmul.cu -o build/cuda-check/matmul_noprefetch.o
	$(NVCC) -Iinclude -Isrc $(NVCCFLAGS) -gencode arch=compute_90,code=sm_90 -DFM_CUDA_Q4_MMA=1 \
	  -c src/backend/cuda/matmul.cu -o build/cuda-check/matmul_q4mma.o
	$(CC) -Iinclude -Isrc -D_GNU_SOURCE -DFM_HAVE_CUDA $(CFLAGS) -fsyntax-only tests/test_cuda.c tools/cuda_bench.c

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

# SIMD kernels: only these objects get ISA flags; ops.c picks them at run time (the rest of the
# build stays baseline x86-64, so the binary runs on CPUs without AVX2 / AVX-512).
$(BUILD)/obj/src/backend/cpu/kernels_avx512.o: CFLAGS += -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c
$(BUILD)/obj/src/backend/cpu/kernels_avx2.o: CFLAGS += -mavx2 -mfma -mf16c
$(BUILD)/obj/src/backend/cpu/kernels_int8_avx2.o: CFLAGS += -mavx2 -mfma -mf16c
$(BUILD)/obj/src/backend/cpu/kernels_int8_avxvnni.o: CFLAGS += -mavx2 -mfma -mf16c -mavxvnni
$(BUILD)/obj/src/backend/cpu/kernels_int8.o: CFLAGS += -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni \
                                                -mavx512vbmi -mfma -mf16c -mamx-tile -mamx-int8

$(BUILD)/libflashmoe.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/flashmoe: $(CLI_OBJ) $(BUILD)/libflashmoe.a
	$(CC) $(LDFLAGS) $(CFLAGS) $(CLI_OBJ) $(BUILD)/libflashmoe.a $(LDLIBS) -o $@

$(BUILD)/run_tests: $(TEST_OBJ) $(BUILD)/libflashmoe.a
	$(CC) $(LDFLAGS) $(CFLAGS) $(TEST_OBJ) $(BUILD)/libflashmoe.a $(LDLIBS) -o $@

test: $(BUILD)/flashmoe $(BUILD)/run_tests
	FLASHMOE_BIN=$(BUILD)/flashmoe FM_TEST_TMP=$(BUILD)/test-tmp $(BUILD)/run_tests $(T)

clean:
	rm -rf build build-san

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
