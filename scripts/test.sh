#!/usr/bin/env bash
# Runs every check and test of the workspace. `.ci/run` calls this same
# script. Installs the Debian packages the tests need when they are
# missing (needs root or sudo for that; it skips the install when all
# tools are already there).
set -euo pipefail
cd "$(dirname "$0")/.."

# tool -> Debian package
declare -A need=(
  [opusenc]=opus-tools [opusdec]=opus-tools [opusinfo]=opus-tools
  [espeak-ng]=espeak-ng [sox]=sox
  [promtool]=prometheus [prometheus]=prometheus
  [nats-server]=nats-server
  [chromium]=chromium [chromedriver]=chromium-driver
  [java]=openjdk-17-jdk-headless [npm]=npm
)
missing=()
for tool in "${!need[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${need[$tool]}")
done
# build dependencies of the audio path (libopus is built with cmake;
# webrtc-audio-processing binds Debian's library with bindgen); python3-venv
# for the Kubernetes manifest check; python3 for the SDK's Python bindings
# libjna-java for the Kotlin bindings on a JVM (kotlinc itself comes from
# the npm registry, fetched by scripts/kotlin.sh into target/kotlin/)
for pkg in cmake pkg-config libclang-dev libwebrtc-audio-processing-dev python3 python3-venv libjna-java; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  echo "==> installing $pkgs"
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  $sudo apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

# A first debug build of the workspace with its tests takes ~3 GB
# (target/); say so plainly instead of failing mid-link with "No space
# left on device".
avail_kb=$(df --output=avail -k . | tail -1)
if [ ! -d target/debug ] && [ "${avail_kb:-0}" -lt $((4 * 1024 * 1024)) ]; then
  echo "error: $((avail_kb / 1024)) MiB free on $(df --output=target . | tail -1); the build and tests need ~4 GiB" >&2
  exit 1
fi

# A one-off build (CI's fresh clone) gains nothing from incremental caches
# but their gigabytes of disk.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo clippy: the SDK's uniffi interface and bindings generator"
cargo clippy -p ptt-client --all-targets --features bindgen --locked -- -D warnings

echo "==> SDK bindings for Kotlin and Swift (Python is built by its tests)"
SDK_OUT=target/sdk-ci scripts/sdk.sh kotlin swift
test -s target/sdk-ci/kotlin/uniffi/ptt_client/ptt_client.kt
test -s target/sdk-ci/swift/ptt_client.swift

echo "==> the relay links no audio library"
if cargo tree -p relay --locked -e normal,build --prefix none | grep -E '^(opus|webrtc|hound|rubato)'; then
  echo "error: the relay depends on an audio crate (codec's \`audio\` feature leaked)" >&2
  exit 1
fi

echo "==> Kubernetes manifests (kubernetes-validate, offline schemas, strict)"
venv=target/ci-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'kubernetes-validate==1.37.*'
fi
"$venv/bin/kubernetes-validate" --strict deploy/kubernetes/*.yaml

echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  # nextest does not run doctests
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi
echo "==> all tests passed"
