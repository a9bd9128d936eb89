#!/bin/sh
# Install the system tools the test suite needs, when missing (Debian/Ubuntu).
#   systemd-analyze (package systemd): tests/test_units.py verifies the units.
#   chromium (package chromium): tests/test_ui_browser.py drives the dashboard
#   through Playwright pointed at this browser (Playwright downloads none).
# With the argument `bench`, also the tools of `poller bench`:
#   wrk (package wrk): the CPU floor of one HTTP request.
# Idempotent: does nothing when every tool is present. Runs apt-get update at
# most once. Needs root (or sudo) only when something is missing.
set -eu

case "${1:-}" in
    "") bench=no ;;
    bench) bench=yes ;;
    *) echo "usage: $0 [bench]" >&2; exit 2 ;;
esac

missing=""
tools="systemd-analyze, chromium"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
[ -x /usr/bin/chromium ] || missing="$missing chromium"
if [ "$bench" = yes ]; then
    tools="$tools, wrk"
    command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
fi

if [ -z "$missing" ]; then
    echo "sysdeps: all present ($tools)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "sysdeps: missing package(s):$missing, and apt-get is not available;" >&2
    echo "sysdeps: install them with this system's package manager" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "sysdeps: missing package(s):$missing; run as root to install them" >&2
        exit 1
    fi
fi

echo "sysdeps: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# shellcheck disable=SC2086  # word splitting of the package list is wanted
$SUDO apt-get install -y -q --no-install-recommends $missing
command -v systemd-analyze >/dev/null 2>&1 || {
    echo "sysdeps: systemd-analyze still missing after installing systemd" >&2
    exit 1
}
[ -x /usr/bin/chromium ] || {
    echo "sysdeps: /usr/bin/chromium still missing after installing chromium" >&2
    exit 1
}
if [ "$bench" = yes ]; then
    command -v wrk >/dev/null 2>&1 || {
        echo "sysdeps: wrk still missing after installing it" >&2
        exit 1
    }
fi
echo "sysdeps: done"
