#!/usr/bin/env bash
# Installs Debian's chromium for tests/playground/test_browser.py (Python Playwright drives it; no browser download)
# and the fonts the playground's tokens need: CJK (fonts-noto-cjk) and Thai (fonts-thai-tlwg), which otherwise
# render as boxes. Idempotent: installs only the packages that are missing.
set -euo pipefail
PACKAGES=(chromium fontconfig fonts-noto-cjk fonts-thai-tlwg)
missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "browser_setup: need root or sudo to apt-get install ${missing[*]}" >&2; exit 1; }
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y "${missing[@]}"
fi
for lang in zh ja ko th; do
    [ -n "$(fc-list ":lang=$lang" family)" ] || { echo "browser_setup: no font for :lang=$lang after install" >&2; exit 1; }
done
echo "browser_setup: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium version unknown'); fonts for zh ja ko th"
