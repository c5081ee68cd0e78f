#!/usr/bin/env bash
# What the tests need from the system, installed and started where missing: README's test command runs
# this first (and CI runs that command). Quick and quiet when everything is already there: it looks before
# it calls apt-get, and needs no root at all then.
#
#   - Debian packages (the one list, PACKAGES below): headless Chromium and its WebDriver for the report
#     and viewer browser tests; Xvfb (+ xauth for xvfb-run) and the X/GL libraries that a PyPI Qt binding
#     loads, for napari under Xvfb.
#   - a single-node SLURM on localhost for the workflow's SLURM test: workflow/scripts/slurm-localhost.sh up
#     (munge, slurmdbd + MariaDB, two count-only GPUs), unless `slurm-localhost.sh status` already answers.
#
# Installing needs root: run as root (CI), or as a user with sudo. Debian 12 (bookworm) or similar.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    chromium chromium-driver
    xvfb xauth
    libgl1 libegl1 libxkbcommon-x11-0 libdbus-1-3 libfontconfig1
    libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-xinerama0
    libxcb-shape0
)
SLURM=workflow/scripts/slurm-localhost.sh

log() { echo "setup-system: $*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() { # run a command as root: directly when root, else through sudo
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "'$*' needs root: run $0 as root, or install sudo"
    fi
}

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

command -v dpkg-query >/dev/null && command -v apt-get >/dev/null \
    || die "needs a Debian-based system (dpkg, apt-get); install by hand: ${PACKAGES[*]}, and SLURM"

missing=()
for package in "${PACKAGES[@]}"; do
    installed "$package" || missing+=("$package")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if "$SLURM" status >/dev/null 2>&1; then
    log "SLURM on localhost answers"
else
    log "starting SLURM on localhost ($SLURM up)"
    as_root "$SLURM" up
fi
log "ready: ${#PACKAGES[@]} Debian packages present (${#missing[@]} installed now), SLURM up"
