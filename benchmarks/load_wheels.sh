#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels the load tests need on the GPU machine
# (Python 3.12, x86-64, no network there): locust and what it imports that the GPU image lacks.
# The image already has requests, msgpack, psutil, jinja2, click, markupsafe, urllib3, certifi,
# h11; pyzmq comes with the vLLM bundle (../shared/devbundle); matplotlib and pyyaml are in the image.
#
#   bash benchmarks/load_wheels.sh            # -> .whl/load/*.whl (about 7 MB; .whl/ is git-ignored)
#
# benchmarks/serving_bench.sh installs them there into /tmp/loadsite (pip --no-index --no-deps
# --target) when `import locust` fails; carry `.whl/load` in the device call.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/.whl/load}"
PY="${PYTHON:-python3}"

# Exact versions (one of each): the set pip resolves for locust 2.47.0 on Python 3.11 here.
WHEELS=(
  locust==2.47.0 configargparse==1.9.0
  gevent==26.9.0 greenlet==3.5.6 zope.event==6.2 zope.interface==8.7
  geventhttpclient==2.6.1 brotli==1.2.1
  flask==3.1.3 flask-cors==6.0.5 flask-login==0.6.3 werkzeug==3.1.9 blinker==1.9.0 itsdangerous==2.2.0
  python-socketio==5.18.1 python-engineio==4.15.1 bidict==0.24.1 simple-websocket==1.1.0 wsproto==1.3.2
  websocket-client==1.9.2
)
plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for n in 39 38 35 34 31 28 27 24 17 5; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download -q --no-deps "${plat[@]}" -d "$DEST" "${WHEELS[@]}" 2>&1 | grep -v "is ignored" || true
n=$(ls "$DEST"/*.whl 2>/dev/null | wc -l)
[ "$n" -eq "${#WHEELS[@]}" ] || { echo "load_wheels: expected ${#WHEELS[@]} wheels in $DEST, got $n" >&2; exit 1; }
echo "load_wheels: $n wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
