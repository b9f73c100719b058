# tally: build, run, test. See README.md.
#   make run         install missing Debian packages, build, serve http://localhost:8080
#   make test        install what tests need, run unit, API and browser tests
#   make check-asan  the same tests against an AddressSanitizer+UBSan build
#   make bench       load benchmarks with a reference run beside tally (bench/)

CC       ?= cc
BUILD    ?= build
PKGS      = libh2o-evloop jansson sqlite3 libsodium openssl libqrencode
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
OPT      ?= -O2
CFLAGS   += -std=c11 $(OPT) -g -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wno-unused-parameter \
            -D_GNU_SOURCE -DH2O_USE_LIBUV=0 -Isrc $(PKG_CFLAGS) $(SAN)
LDFLAGS  += $(SAN)
LDLIBS   += $(PKG_LIBS) -lwslay -lpthread -lm

LIB_SRC  := $(sort $(wildcard src/*/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
MAIN_OBJ := $(BUILD)/obj/src/main.o
UNIT_SRC := $(sort $(wildcard tests/unit/test_*.c))
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)

DATA_DIR ?= ./data
LISTEN   ?= 127.0.0.1:8080

.PHONY: all run test test-unit test-api test-live test-e2e check-asan deps deps-test clean bench bench-live bench-export lint fmt
.DEFAULT_GOAL := all

all: $(BUILD)/tally

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libtally.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/tally: $(MAIN_OBJ) $(BUILD)/libtally.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tally-genballots: tools/genballots.c $(BUILD)/libtally.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libtally.a $(LDFLAGS) $(LDLIBS)

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libtally.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libtally.a $(LDFLAGS) $(LDLIBS) -lcriterion

-include $(LIB_OBJ:.o=.d) $(MAIN_OBJ:.o=.d)

deps:
	@scripts/deps.sh run

deps-test:
	@scripts/deps.sh test

run: deps
	@$(MAKE) --no-print-directory all
	$(BUILD)/tally serve --listen $(LISTEN) --data-dir $(DATA_DIR)

test-unit: $(UNIT_BIN)
	@set -e; for t in $(UNIT_BIN); do echo "== $$t"; $$t --jobs 2; done

test-api: $(BUILD)/tally
	TALLY_BIN=$(abspath $(BUILD)/tally) node --test --test-concurrency=2 tests/api/

test-live: $(BUILD)/tally
	TALLY_BIN=$(abspath $(BUILD)/tally) node --test --test-concurrency=1 tests/live/

test-e2e: $(BUILD)/tally
	TALLY_BIN=$(abspath $(BUILD)/tally) TALLY_WEB_ROOT=$(abspath web) node --test --test-concurrency=2 tests/e2e/

test: deps-test
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory test-unit
	@$(MAKE) --no-print-directory test-api
	@$(MAKE) --no-print-directory test-live
	@$(MAKE) --no-print-directory test-e2e

check-asan: deps-test
	@$(MAKE) --no-print-directory BUILD=build-asan OPT=-O1 \
	    SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
	    all test-unit test-api test-live

# 19,000 live subscribers (SSE + WebSocket) while votes arrive at 200/s
bench-live: $(BUILD)/tally
	node bench/live.mjs --bin $(abspath $(BUILD)/tally)

# 1,000,000 ballots written through the store layer, then streamed as CSV and JSON
# while the server's RSS is sampled (issue: < 100 MiB growth)
bench-export: $(BUILD)/tally $(BUILD)/tally-genballots
	node bench/export.mjs --bin $(abspath $(BUILD)/tally) --gen $(abspath $(BUILD)/tally-genballots)

lint:
	clang-tidy $(LIB_SRC) src/main.c -- $(CFLAGS)
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability --std=c11 -Isrc src

fmt:
	clang-format -i $(LIB_SRC) src/main.c src/*/*.h

clean:
	rm -rf build build-asan
