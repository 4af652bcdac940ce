#!/usr/bin/env bash
# Make sure Debian's Chromium is installed at /usr/bin/chromium for the browser test
# (tests/test_browser.py drives it with Playwright; Playwright never downloads a browser here),
# plus a small CJK font so the page's Chinese title renders in screenshots instead of boxes.
# Idempotent: when both are there it only checks them (well under a second).
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
CJK_FONT=/usr/share/fonts/truetype/wqy/wqy-microhei.ttc
SUDO=""
if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo -n"; fi

say() { echo "ensure_browser: $*" >&2; }

missing=()
[[ -x "$CHROMIUM" ]] || missing+=(chromium)
[[ -f "$CJK_FONT" ]] || missing+=(fonts-wqy-microhei)
if ((${#missing[@]} == 0)); then
  say "chromium present at $CHROMIUM"
  exit 0
fi

say "installing ${missing[*]} (Debian packages)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
[[ -x "$CHROMIUM" ]] || { say "chromium is still missing at $CHROMIUM"; exit 1; }
say "ready: $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
