#!/usr/bin/env bash
# rotate-backups.sh - make a dated tarball of a directory and keep only the
# newest N archives.
#
# 用法 / usage:
#   rotate-backups.sh -s /srv/data -d /var/backups/data [-k 7] [-n]
#
#   -s  source directory to archive
#   -d  destination directory for archives
#   -k  how many archives to keep (default 7)
#   -n  dry run: print what would happen, change nothing

set -euo pipefail

keep=7
dry_run=0
src=""
dest=""

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date '+%H:%M:%S')" "$*"; }
run() {
    if (( dry_run )); then
        printf 'would run: %s\n' "$*"
    else
        "$@"
    fi
}

while getopts ':s:d:k:nh' opt; do
    case "$opt" in
        s) src=$OPTARG ;;
        d) dest=$OPTARG ;;
        k) keep=$OPTARG ;;
        n) dry_run=1 ;;
        h) sed -n '2,11p' "$0"; exit 0 ;;
        :) die "option -$OPTARG needs a value" ;;
        *) die "unknown option -$OPTARG" ;;
    esac
done

[[ -n $src && -n $dest ]] || die "both -s and -d are required (try -h)"
[[ -d $src ]] || die "source '$src' is not a directory"
[[ $keep =~ ^[0-9]+$ ]] && (( keep > 0 )) || die "-k must be a positive integer"

run mkdir -p "$dest"

name="$(basename "$src")-$(date '+%Y%m%d-%H%M%S').tar.gz"
tmp="$dest/.${name}.partial"

# 先写临时文件, 成功后再改名, 避免留下半截的归档
trap 'rm -f "$tmp"' EXIT
log "archiving $src -> $dest/$name"
run tar -czf "$tmp" -C "$(dirname "$src")" "$(basename "$src")"
run mv "$tmp" "$dest/$name"
trap - EXIT

# Archives sort by name == sort by date, thanks to the timestamp format.
mapfile -t archives < <(
    find "$dest" -maxdepth 1 -type f -name "$(basename "$src")-*.tar.gz" | sort -r
)

if (( ${#archives[@]} > keep )); then
    for old in "${archives[@]:keep}"; do
        log "removing old archive $(basename "$old")"
        run rm -f -- "$old"
    done
fi

log "done; ${#archives[@]} archive(s) present before pruning, keeping $keep"
