#!/usr/bin/env bash
# Runs a command inside a memory-capped cgroup, so a benchmark sees a small machine: the cap covers
# the process's memory AND the page cache it causes (both cgroup v1 and v2 charge page cache).
#
#   tools/memcap.sh SIZE COMMAND [ARGS...]      SIZE like 8G, 512M (needs root)
#   tools/memcap.sh 8G build/flashmoe bench -m /data/q397-8l --cold
#
# Works with cgroup v1 (a mounted memory controller, as on the dev machines) and cgroup v2 (the GPU
# machines). Prints the cgroup's peak usage on exit. The cgroup is removed afterwards.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,10p' "$0" >&2; exit 2; fi
size=$1; shift
bytes=$(numfmt --from=iec "${size%B}") || { echo "memcap: bad size $size" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "memcap: needs root (cgroups)" >&2; exit 2; }
name="flashmoe-memcap-$$"
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then          # cgroup v2
    root=/sys/fs/cgroup
    grep -qw memory "$root/cgroup.subtree_control" || echo +memory > "$root/cgroup.subtree_control"
    cg="$root/$name"; mkdir "$cg"
    echo "$bytes" > "$cg/memory.max"
    echo 0 > "$cg/memory.swap.max" 2>/dev/null || true
    peak_file="$cg/memory.peak"
elif [ -d /sys/fs/cgroup/memory ]; then                    # cgroup v1
    cg="/sys/fs/cgroup/memory/$name"; mkdir "$cg"
    echo "$bytes" > "$cg/memory.limit_in_bytes"
    peak_file="$cg/memory.max_usage_in_bytes"
else
    echo "memcap: no cgroup memory controller found" >&2; exit 1
fi
cleanup() {
    [ -f "$peak_file" ] && echo "memcap: peak usage $(numfmt --to=iec "$(cat "$peak_file")") of $size" >&2
    rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT
# start the command inside the cgroup: this shell joins it, then runs the command as a child
sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' memcap "$cg" "$@" &
child=$!
wait $child
