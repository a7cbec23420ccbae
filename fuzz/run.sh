#!/bin/sh
# Runs one cargo-fuzz target for a bounded time: fuzz/run.sh TARGET SECONDS
# The corpus grows in fuzz/corpus/TARGET, seeded from fuzz/seeds/TARGET; crashes land in
# fuzz/artifacts/TARGET. Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# The Rust code under test forbids unsafe, so the sanitizer is off (twice the executions);
# debug assertions stay on, so arithmetic overflow is a crash. FUZZ_SANITIZER=address to change.
set -eu
target=${1:?usage: fuzz/run.sh TARGET SECONDS}
seconds=${2:?usage: fuzz/run.sh TARGET SECONDS}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
mkdir -p "corpus/$target"
if [ -d "seeds/$target" ]; then
    cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
fi
cargo +nightly fuzz run --sanitizer "${FUZZ_SANITIZER:-none}" --debug-assertions "$target" \
    "corpus/$target" -- -max_total_time="$seconds" -max_len=70000 -timeout=10 -print_final_stats=1
