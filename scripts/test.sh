#!/usr/bin/env bash
# Runs the whole test suite: unit and integration tests (ctest), conformance tests against
# independent implementations (HF tokenizers, llama.cpp, gguf-py, jinja2), and every libFuzzer
# target for a bounded time. Installs what it needs first.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
FUZZ_SECONDS=${FUZZ_SECONDS:-30}
install_packages
fetch_model

# Reference data comes from independent Python implementations, in a venv of the repo's own.
log "preparing the reference implementations (Python venv: .venv)"
[[ -x $ROOT/.venv/bin/python ]] || python3 -m venv "$ROOT/.venv"
PY=$ROOT/.venv/bin/python
"$PY" -m pip install --quiet --disable-pip-version-check -r "$ROOT/tests/tools/requirements.txt"
log "generating reference data into tests/data/generated/"
mkdir -p "$ROOT/tests/data/generated"
for gen in "$ROOT"/tests/tools/make_*.py; do
  log "  $(basename "$gen")"
  "$PY" "$gen"
done

log "building with tests (warnings are errors)"
build "$ROOT/build-test" -DMOA_TESTS=ON -DMOA_WERROR=ON
log "running the tests"
(cd "$ROOT/build-test" && ctest --output-on-failure -j "$JOBS" --timeout 900)

log "fuzzing each parser for ${FUZZ_SECONDS}s (clang, libFuzzer + AddressSanitizer)"
CC=clang CXX=clang++ cmake -S "$ROOT" -B "$ROOT/build-fuzz" -G Ninja -DMOA_FUZZ=ON -DMOA_TESTS=OFF \
  -DMOA_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="-fsanitize=address,fuzzer-no-link" >/dev/null
cmake --build "$ROOT/build-fuzz" -j "$JOBS"
fuzz_failed=0
for fuzzer in "$ROOT"/tests/fuzz/*_fuzzer.cc; do
  name=$(basename "$fuzzer" .cc)
  corpus="$ROOT/tests/fuzz/corpus/${name%_fuzzer}"
  work=$(mktemp -d)
  log "  $name"
  if ! "$ROOT/build-fuzz/bin/$name" -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 \
      -malloc_limit_mb=1024 -print_final_stats=0 -artifact_prefix="$work/" "$work" "$corpus" \
      >"$work/log" 2>&1; then
    tail -40 "$work/log"
    echo "FAIL: $name found a problem (artifacts in $work)" >&2
    fuzz_failed=$((fuzz_failed + 1))
  else
    rm -rf "$work"
  fi
done
n_fuzz=$(ls "$ROOT"/tests/fuzz/*_fuzzer.cc | wc -l)
echo "fuzzing: $((n_fuzz - fuzz_failed)) passed, $fuzz_failed failed"
exit $((fuzz_failed > 0))
