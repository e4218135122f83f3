#!/usr/bin/env bash
# Installs the Debian packages, fetches the default model and builds everything into build/.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
install_packages
fetch_model
log "building (Release) into build/"
build "$ROOT/build" -DMOA_TESTS=OFF
log "ready: $ROOT/build/bin/moa"
