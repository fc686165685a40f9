#!/usr/bin/env bash
# Builds ptt_client as a shared library (with its uniffi interface) and
# generates its Kotlin, Swift and Python bindings from it.
#
#   scripts/sdk.sh [--release] [LANGUAGE...]    (default: python kotlin swift)
#
# Output: target/sdk/<language>/ (or $SDK_OUT/<language>/); the Python package directory also gets
# the shared library, so `PYTHONPATH=target/sdk/python python3 -c "import
# ptt_client"` works. Android and iOS builds: see docs/sdk.md.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
flags=()
langs=()
for a in "$@"; do
    case "$a" in
        --release) profile=release; flags=(--release) ;;
        python|kotlin|swift) langs+=("$a") ;;
        *) echo "sdk.sh: unknown argument $a (want --release, python, kotlin, swift)" >&2; exit 2 ;;
    esac
done
[ ${#langs[@]} -gt 0 ] || langs=(python kotlin swift)

target_dir=$(cargo metadata --locked --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cargo rustc -q --locked -p ptt-client --lib --features ffi --crate-type cdylib "${flags[@]}"
lib="$target_dir/$profile/libptt_client.so"
cargo build -q --locked -p ptt-client --features bindgen --bin uniffi-bindgen "${flags[@]}"
for l in "${langs[@]}"; do
    out="${SDK_OUT:-$target_dir/sdk}/$l"
    rm -rf "$out"
    "$target_dir/$profile/uniffi-bindgen" generate --no-format --library "$lib" --language "$l" --out-dir "$out"
    if [ "$l" = python ]; then
        cp "$lib" "$out/"
    fi
    echo "sdk.sh: $l bindings in $out"
done
