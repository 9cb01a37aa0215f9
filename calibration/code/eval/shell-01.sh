#!/usr/bin/env bash
# disk-alert.sh - warn when any mounted filesystem passes a usage threshold.
#
# Usage: disk-alert.sh [threshold-percent]   (default 85)
# Exit status: 0 all fine, 1 at least one filesystem over the threshold.
# Intended for cron; prints nothing when everything is below the limit.

set -uo pipefail

threshold=${1:-85}
if ! [[ $threshold =~ ^[0-9]+$ ]] || (( threshold > 100 )); then
    echo "threshold must be an integer 0-100, got '$threshold'" >&2
    exit 2
fi

status=0
# -P: POSIX output, one line per filesystem; skip pseudo filesystems.
while read -r fs size used avail pct mount; do
    pct=${pct%\%}
    [[ $pct =~ ^[0-9]+$ ]] || continue
    if (( pct >= threshold )); then
        printf '%-24s %3s%% used (%s of %s KiB, %s free) on %s\n' \
            "$mount" "$pct" "$used" "$size" "$avail" "$fs"
        status=1
    fi
done < <(df -P -k -x tmpfs -x devtmpfs -x squashfs -x overlay 2>/dev/null | tail -n +2)

if (( status )); then
    echo "host: $(hostname)  time: $(date -Is)"
fi
exit "$status"
