#!/bin/sh
# Install the Debian packages moonlit builds against, if any are missing.
set -e
PKGS="liblua5.4-dev libutf8proc-dev libjansson-dev libopenblas-dev libstb-dev libreadline-dev libncurses-dev python3"
missing=""
for p in $PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "installing:$missing"
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
