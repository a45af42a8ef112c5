# moonlit — one binary, build/moonlit.  `make help` lists the targets.
#
# Lua 5.4, utf8proc, jansson, OpenBLAS and readline are linked statically so
# the binary runs on machines without Debian's packages (the GPU machine).
# CUDA objects are built when nvcc is found (make CUDA=0 to skip).

CC      ?= cc
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
LIBDIR  := /usr/lib/x86_64-linux-gnu
SANITIZE ?=
OPT     ?= -O2

ifeq ($(NVCC),)
CUDA ?= 0
else
CUDA ?= 1
endif

# CPU-only objects live apart so the two configurations never mix.
ifeq ($(CUDA),1)
BUILD   ?= build
else
BUILD   ?= build-cpu
endif

CFLAGS  := -std=c11 -D_GNU_SOURCE $(OPT) -g -Wall -Wextra -Wno-unused-parameter \
           -Wno-missing-field-initializers -fno-strict-aliasing -pthread \
           -I. -Ihost -Ikernels -I/usr/include/lua5.4 -I/usr/include/stb
LDLIBS  := $(LIBDIR)/liblua5.4.a $(LIBDIR)/libutf8proc.a $(LIBDIR)/libjansson.a \
           $(LIBDIR)/libreadline.a $(LIBDIR)/libtinfo.a \
           $(LIBDIR)/libopenblas.a $(shell $(CC) -print-file-name=libgfortran.a) \
           $(shell $(CC) -print-file-name=libquadmath.a) -lm -ldl -lpthread

# The main binary exports the whole Lua C API (-Wl,-E, and every object of the
# static Lua library, not only those moonlit calls), so that Lua C modules
# built against Lua 5.4's headers resolve lua_*/luaL_* against it when
# `require` loads them.  The test binaries link Lua as before.
EXPORT_LUA := -Wl,-E -Wl,--whole-archive $(LIBDIR)/liblua5.4.a -Wl,--no-whole-archive

ifneq ($(SANITIZE),)
CFLAGS  += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -O1
LDFLAGS += -fsanitize=$(SANITIZE)
BUILD   := build-$(SANITIZE)
CUDA    := 0
endif

HOST_SRC   := $(wildcard host/*.c)
CLI_SRC    := $(wildcard cli/*.c)
BIND_SRC   := $(wildcard bindings/*.c)
KCPU_SRC   := $(wildcard kernels/cpu/*.c)
KCUDA_SRC  := $(wildcard kernels/cuda/*.cu)

OBJS := $(patsubst %.c,$(BUILD)/%.o,$(HOST_SRC) $(BIND_SRC) $(KCPU_SRC) $(CLI_SRC))

ifeq ($(CUDA),1)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CFLAGS  += -DML_WITH_CUDA -I$(CUDA_HOME)/include
NVFLAGS := -arch=sm_90 -O3 -std=c++17 -Xcompiler -fPIC -DML_WITH_CUDA -I. -Ihost -Ikernels
OBJS    += $(patsubst %.cu,$(BUILD)/%.o,$(KCUDA_SRC))
LDLIBS  += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lcublas -lcublasLt -lcudnn -lnccl -lstdc++
CUDA_MSG := ✓ CUDA ($(NVCC))
else
CUDA_MSG := ✗ CUDA (nvcc not found or CUDA=0): CPU only
endif

# What the build found, printed before linking.
have = $(if $(wildcard $(1)),✓,✗)
FOUND := $(call have,$(LIBDIR)/liblua5.4.a) Lua 5.4  $(call have,$(LIBDIR)/libutf8proc.a) utf8proc  \
         $(call have,$(LIBDIR)/libjansson.a) jansson  $(call have,$(LIBDIR)/libopenblas.a) OpenBLAS  \
         $(call have,$(LIBDIR)/libreadline.a) readline  $(call have,/usr/include/stb/stb_image.h) stb
ifeq ($(CUDA),1)
FOUND += $(call have,$(CUDA_HOME)/include/cublasLt.h) cuBLASLt \
         $(call have,$(wildcard /usr/include/cudnn.h $(CUDA_HOME)/include/cudnn.h)) cuDNN \
         $(call have,$(wildcard /usr/include/nccl.h $(CUDA_HOME)/include/nccl.h)) NCCL
endif

# One short line per step; `make V=1` shows the full commands.
ifeq ($(V),1)
Q :=
say = @true
else
Q := @
say = @echo "  $(1)	$(2)"
endif

# Build in parallel by default (the CUDA objects take minutes one by one).
NPROC   := $(shell nproc 2>/dev/null || echo 2)
MAKEFLAGS += -j$(NPROC)

.PHONY: all deps run test test-c test-lua clean help fixtures
all: $(BUILD)/moonlit

$(BUILD)/moonlit: $(OBJS)
	@echo "moonlit: $(CUDA_MSG)"
	@echo "moonlit: $(FOUND)"
	$(call say,LINK,$@)
	$(Q)$(CC) $(LDFLAGS) $(EXPORT_LUA) -o $@ $(OBJS) $(LDLIBS)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(call say,CC,$<)
	$(Q)$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/%.o: %.cu
	@mkdir -p $(dir $@)
	$(call say,NVCC,$<)
	$(Q)$(NVCC) $(NVFLAGS) -MMD -MP -c $< -o $@

# The files over cuDNN's graph API (the fused attention, the convolutions)
# are built against the header-only cuDNN frontend when `make deps` has
# fetched it (scripts/fetch_cudnn_frontend.sh), and as stubs that always
# answer "unsupported" when not.  The folder is looked for when the recipe
# runs, since deps runs earlier in the same make; its VERSION file is a
# prerequisite so that fetching the frontend later rebuilds them.
CUDNN_FE := .cache/cudnn-frontend
CUDNN_FE_OBJS := $(BUILD)/kernels/cuda/attention_cudnn.o $(BUILD)/kernels/cuda/conv_cudnn_graph.o
$(CUDNN_FE_OBJS): $(BUILD)/%.o: %.cu $(wildcard $(CUDNN_FE)/VERSION)
	@mkdir -p $(dir $@)
	$(call say,NVCC,$<)
	$(Q)$(NVCC) $(NVFLAGS) $$(test -f $(CUDNN_FE)/include/cudnn_frontend.h && \
	    echo "-isystem $(CUDNN_FE)/include -DML_WITH_CUDNN_FRONTEND") -MMD -MP -c $< -o $@

-include $(OBJS:.o=.d)

# C unit tests: each tests/c/test_*.c is a program linked with the library objects.
LIB_OBJS := $(filter-out $(BUILD)/cli/%.o,$(OBJS))
C_TESTS  := $(patsubst tests/c/%.c,$(BUILD)/tests/%,$(wildcard tests/c/test_*.c))
$(BUILD)/tests/%: tests/c/%.c $(LIB_OBJS)
	@mkdir -p $(dir $@)
	$(call say,TEST,$@)
	$(Q)$(CC) $(CFLAGS) -Itests/c -o $@ $< $(LIB_OBJS) $(LDFLAGS) $(LDLIBS)

deps:
	@scripts/install_deps.sh
ifeq ($(CUDA),1)
	@scripts/fetch_cudnn_frontend.sh
endif

# Packages first: nothing compiles or fetches before `deps` has finished.
$(OBJS) $(C_TESTS): | deps

fixtures: | deps
	@scripts/fetch_clip_vocab.sh

# The embedded default job: DreamBooth end to end on the toy model moonlit
# pretrained itself (no download; about a minute on two CPU cores).
run: deps all fixtures
	$(BUILD)/moonlit examples/toy_dreambooth.lua

test: deps all fixtures $(C_TESTS)
	@BUILD=$(BUILD) tests/run_all.sh

clean:
	rm -rf build build-*

help:
	@echo "make            build build/moonlit (CUDA=0 for CPU only)"
	@echo "make run        run the embedded default job: DreamBooth on the toy model (examples/toy_dreambooth.lua)"
	@echo "make test       C + Lua tests; last line 'N passed, N failed'"
	@echo "make test SANITIZE=address   the same under AddressSanitizer"
