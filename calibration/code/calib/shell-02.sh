#!/bin/sh
# count-lines.sh - report lines of code per file extension under a directory.
# POSIX sh, so it also runs on minimal containers (busybox, dash).
#
# Usage: count-lines.sh [dir]     (default: current directory)

dir=${1:-.}

if [ ! -d "$dir" ]; then
    echo "not a directory: $dir" >&2
    exit 1
fi

# Skip version-control and dependency folders; they are not "our" code.
find "$dir" \
    \( -name .git -o -name node_modules -o -name target -o -name .venv \) -prune \
    -o -type f -name '*.*' -print |
while IFS= read -r path; do
    ext=${path##*.}
    case $ext in
        */*) continue ;;          # dot was in a directory name, not the file
    esac
    lines=$(wc -l < "$path" 2>/dev/null) || continue
    printf '%s %s\n' "$ext" "$lines"
done |
awk '
    { files[$1]++; lines[$1] += $2; total += $2 }
    END {
        printf "%-10s %8s %10s\n", "ext", "files", "lines"
        for (e in files)
            printf "%-10s %8d %10d\n", e, files[e], lines[e] | "sort -k3 -n -r"
        close("sort -k3 -n -r")
        printf "%-10s %8s %10d\n", "total", "", total
    }
'
