# flashmoe build.
#   make              build/flashmoe and build/libflashmoe.a (CPU backend)
#   make test         build and run the test suite (closes with "N passed, N failed")
#   make test SAN=1   the same under AddressSanitizer + UndefinedBehaviorSanitizer (in build-san/)
#   make CUDA=1       adds the CUDA backend (later)
#   make clean

CC      ?= cc
SAN     ?= 0
BUILD   ?= $(if $(filter 1,$(SAN)),build-san,build)

CPPFLAGS += -Iinclude -Isrc -D_GNU_SOURCE -MMD -MP
CFLAGS   ?= -O2 -g
CFLAGS   += -std=c11 -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -Wno-format-truncation -pthread -fno-math-errno
LDLIBS   += -l:libjansson.a -l:libpcre2-8.a -l:libutf8proc.a -l:libedit.a -l:libbsd.a -l:libmd.a -l:libtinfo.a -lm -pthread

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

.PHONY: all test clean
all: $(BUILD)/flashmoe $(BUILD)/libflashmoe.a

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

# SIMD kernels: only these objects get ISA flags; ops.c picks them at run time (the rest of the
# build stays baseline x86-64, so the binary runs on CPUs without AVX2 / AVX-512).
$(BUILD)/obj/src/backend/cpu/kernels_avx512.o: CFLAGS += -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c
$(BUILD)/obj/src/backend/cpu/kernels_avx2.o: CFLAGS += -mavx2 -mfma -mf16c

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
