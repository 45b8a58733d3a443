#!/usr/bin/env bash
# Run one benchmark alternately from two source trees (A/B in one session on a shared, noisy machine):
#   bench/ab_trees.sh BASE_DIR ROUNDS -- python3 bench/retro_bench.py --phases speed ... --out '$OUT/ab_{round}_{tree}.json'
# BASE_DIR: another checkout (e.g. `git archive <rev> | tar -x -C base_tree`, with its generated kvd/v1/kvd_pb2*.py).
# Each round runs the base tree first, then this one; `{round}` and `{tree}` (base / this) in the command are
# replaced. The wheels of bench/device_setup.sh are used by both.
set -euo pipefail
base=$(cd "$1" && pwd); rounds=$2; shift 2
[ "${1:-}" = "--" ] && shift
this=$(pwd)
for round in $(seq 1 "$rounds"); do
  for tree in base this; do
    dir=$this; [ "$tree" = base ] && dir=$base
    cmd=$(printf '%s ' "$@" | sed "s/{round}/$round/g; s/{tree}/$tree/g")
    (cd "$dir" && PYTHONPATH="/tmp/site:$dir:$dir/client:$dir/integrations/transformers" bash -c "$cmd") 2>&1 \
      | grep -v '^{' | tail -3 | sed "s/^/$tree round $round: /"
  done
done
