#!/usr/bin/env bash
# The 1 KB round trip with OMEMO (this tree) against the same without OMEMO
# (the foundation, before issue 4: commit 41ac44d), in one run: both
# coterie-bench builds alternate three times and the medians are compared.
# Usage: bash tests/bench/rtt-omemo-vs-foundation.sh   (needs Debian's prosody,
# which `coterie-bench rtt` also measures)
set -euo pipefail
cd "$(dirname "$0")/../.."
base_rev=${BASE_REV:-41ac44d}
target=${CARGO_TARGET_DIR:-target}
base_tree="$target/bench-baseline-src"
base_target="$target/bench-baseline"

cargo build --release --quiet -p coterie-tests --bin coterie-bench
cur="$target/release/coterie-bench"
# BASE_BIN: an already built foundation coterie-bench (skips a ~12 min build).
base=${BASE_BIN:-}
if [ -z "$base" ]; then
    if [ ! -d "$base_tree" ]; then
        git worktree add --detach "$base_tree" "$base_rev" >/dev/null
    fi
    (cd "$base_tree" && CARGO_TARGET_DIR="$(pwd)/../bench-baseline" \
        cargo build --release --quiet -p coterie-tests --bin coterie-bench)
    base="$base_target/release/coterie-bench"
fi

median_of() { "$1" rtt --n "${N:-200}" | awk -F'|' '/^\| Coterie/ { gsub(/ /, "", $3); print $3 }'; }
on=() off=()
for round in 1 2 3; do
    off+=("$(median_of "$base")")
    on+=("$(median_of "$cur")")
    echo "round $round: without OMEMO ${off[-1]} ms, with OMEMO ${on[-1]} ms"
done
printf '%s\n' "${off[@]}" | sort -n | sed -n 2p > /tmp/rtt-off.$$
printf '%s\n' "${on[@]}" | sort -n | sed -n 2p > /tmp/rtt-on.$$
awk -v off="$(cat /tmp/rtt-off.$$)" -v on="$(cat /tmp/rtt-on.$$)" \
    'BEGIN { printf "median of medians: without %.3f ms, with %.3f ms, ratio with/without %.2f\n", off, on, on / off }'
rm -f /tmp/rtt-off.$$ /tmp/rtt-on.$$
