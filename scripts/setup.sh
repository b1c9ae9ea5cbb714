#!/usr/bin/env bash
# Idempotent set-up: system packages the tests and demo need, then the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "${PY:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml
.venv/bin/python -m pip install -q -e '.[all]'
echo "setup: ok ($(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"
