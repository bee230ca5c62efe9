#!/usr/bin/env bash
# Create the FuxiCTR peer venv (default: <repo>/.venv-peers) and, optionally, the FuxiCTR model-code folder.
#
#   tools/peers/setup.sh [FUXICTR_SRC_DEST]
#
# Environment: PYTHON (default python3.11), VENV (default <repo>/.venv-peers),
#              TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu to force the CPU wheel).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-$REPO/.venv-peers}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"$VENV/bin/pip" install --quiet -r "$HERE/requirements.txt"
"$VENV/bin/python" -c "import torch, fuxictr; print('torch', torch.__version__, '| fuxictr', fuxictr.__version__)"

if [ $# -ge 1 ] && [ ! -e "$1" ]; then
  "$HERE/fuxictr_src.sh" "$1"
fi
