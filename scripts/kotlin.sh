#!/usr/bin/env bash
# Compiles the SDK's generated Kotlin bindings with a Kotlin app into one
# jar, for a JVM. kotlinc comes from the npm registry's kotlin-compiler
# package (2.4.x; its lib/ also has kotlinx-coroutines-core-jvm.jar),
# fetched once into target/kotlin/; JNA is Debian's libjna-java.
#
#   scripts/kotlin.sh BINDINGS_DIR OUT_JAR APP.kt...
#
# Prints the classpath to run it with (the jar, kotlin-stdlib,
# kotlinx-coroutines, JNA), for
#   java -Djna.library.path=DIR_OF_libptt_client.so -cp CLASSPATH MainKt
set -euo pipefail
cd "$(dirname "$0")/.."
bindings=${1:?the directory scripts/sdk.sh wrote the Kotlin bindings to}
out=${2:?the jar to write}
shift 2
target_dir=$(cargo metadata --locked --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
home="$target_dir/kotlin/package"
if [ ! -x "$home/bin/kotlinc" ]; then
  mkdir -p "$target_dir/kotlin"
  (cd "$target_dir/kotlin" && npm pack --silent kotlin-compiler@2.4 >/dev/null && tar xzf kotlin-compiler-2.4.*.tgz && rm -f kotlin-compiler-2.4.*.tgz)
fi
jna=/usr/share/java/jna.jar
[ -f "$jna" ] || { echo "kotlin.sh: $jna missing (apt-get install libjna-java)" >&2; exit 1; }
coroutines="$home/lib/kotlinx-coroutines-core-jvm.jar"
rm -f "$out"
mapfile -t sources < <(find "$bindings" -name '*.kt')
if ! "$home/bin/kotlinc" -nowarn -cp "$jna:$coroutines" -d "$out" "${sources[@]}" "$@" >&2; then
  echo "kotlin.sh: kotlinc failed" >&2
  exit 1
fi
echo "$out:$home/lib/kotlin-stdlib.jar:$coroutines:$jna"
