#!/usr/bin/env bash
# The Debian packages the tests start for real: PostgreSQL (Optuna studies shared
# by several workers) and Chromium with its driver (the review page in a real
# browser). Installs what is missing when it can (root, or password-less sudo,
# with apt-get); otherwise says what to install and leaves the tests that need
# them to skip. Starts no service: the tests start their own servers and stop them.
set -euo pipefail

PACKAGES=(postgresql chromium chromium-driver)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
    echo "tests/system-packages.sh: not a Debian system; the tests that need ${missing[*]} will skip." >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "tests/system-packages.sh: missing ${missing[*]}; install them with" \
         "'sudo apt-get install ${missing[*]}' (the tests that need them skip until then)." >&2
    exit 0
fi

# Debian starts a package's service on install unless policy-rc.d says no; the
# tests run their own PostgreSQL in a temporary directory, so nothing may linger.
policy=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
    "${as_root[@]}" chmod +x "$policy"
    ours=1
fi
cleanup() { [ "$ours" -eq 1 ] && "${as_root[@]}" rm -f "$policy"; return 0; }
trap cleanup EXIT

echo "tests/system-packages.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
