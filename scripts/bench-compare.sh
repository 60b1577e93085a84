#!/usr/bin/env bash
# Runs the benchmarks of two commits alternately in one run: the figures of both sides come
# from the same hour on the same machine, which is the only comparison that means something
# on a shared machine.
#
#   scripts/bench-compare.sh BEFORE [AFTER] [ROUNDS]
#
# BEFORE and AFTER are commits (AFTER defaults to the work tree as it is). Each side is built
# in its own target directory (a shared one would mix the two trees' artifacts). Round 1
# runs BEFORE first, round 2 AFTER first, and so on. The NATS benchmarks start their own
# nats-server (scripts/nats-server.sh installs it).
set -euo pipefail

before=${1:?usage: scripts/bench-compare.sh BEFORE [AFTER] [ROUNDS]}
after=${2:-}
rounds=${3:-2}
root=$(git rev-parse --show-toplevel)
work=${DUALBUS_BENCH_COMPARE_DIR:-${TMPDIR:-/tmp}/dualbus-bench-compare}
mkdir -p "$work"

# The tree of one side: a worktree of a commit, or this work tree.
tree_of() {
  local rev=$1 name=$2
  if [ -z "$rev" ]; then
    echo "$root"
    return
  fi
  local dir="$work/$name"
  if [ -d "$dir" ]; then
    git -C "$root" worktree remove --force "$dir" >/dev/null 2>&1 || rm -rf "$dir"
  fi
  git -C "$root" worktree prune
  git -C "$root" worktree add --detach -q "$dir" "$rev"
  echo "$dir"
}

# Builds the benchmark binaries of one side; prints "name path" lines.
build() {
  local dir=$1 target=$2
  (cd "$dir" && CARGO_TARGET_DIR="$target" cargo bench --no-run \
    -p dualbus --bench buses -p dualbus-nats --bench jetstream --bench core \
    --message-format=json 2>/dev/null) |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
'
}

nats_server=$("$root/scripts/nats-server.sh")
export DUALBUS_NATS_SERVER=$nats_server

declare -A dir bin
dir[before]=$(tree_of "$before" before)
dir[after]=$(tree_of "$after" after)
for side in before after; do
  echo "building $side (${dir[$side]})" >&2
  while read -r name path; do
    bin[$side.$name]=$path
  done < <(build "${dir[$side]}" "$work/target-$side")
done

run() {
  local side=$1
  for part in simple domain handover; do
    echo "=== $side buses --only=$part"
    (cd "${dir[$side]}/eventbus" && "${bin[$side.buses]}" --only=$part | grep -v '^$')
  done
  echo "=== $side jetstream"
  (cd "${dir[$side]}/eventbus-nats" && "${bin[$side.jetstream]}" | grep -v '^$')
  echo "=== $side core"
  (cd "${dir[$side]}/eventbus-nats" && "${bin[$side.core]}" | grep -v '^$')
}

for round in $(seq 1 "$rounds"); do
  if [ $((round % 2)) -eq 1 ]; then order="before after"; else order="after before"; fi
  for side in $order; do
    echo "##### round $round: $side"
    run "$side"
  done
done
