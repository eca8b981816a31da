#!/usr/bin/env bash
# Installs Debian's chromium for tests/test_browser.py (Python Playwright drives it; no browser download).
# Idempotent: does nothing when /usr/bin/chromium already exists.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "browser_setup: /usr/bin/chromium present ($(/usr/bin/chromium --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "browser_setup: need root or sudo to apt-get install chromium" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y chromium
/usr/bin/chromium --version
