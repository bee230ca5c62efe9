#!/usr/bin/env bash
# Build the FuxiCTR model-code folder the runner reads (--fuxictr-src): FuxiCTR's tree at FUXICTR_COMMIT
# plus model_zoo/DCNv3 from 20c8af2^ (DCNv3 was deleted from model_zoo in commit 20c8af2).
# Nothing of FuxiCTR is committed to this repository.
#
#   tools/peers/fuxictr_src.sh DEST [GIT_SOURCE]
#     DEST        folder to create (e.g. /work/fuxictr-src); must not exist yet
#     GIT_SOURCE  a FuxiCTR clone / bare git dir, or a URL (default https://github.com/reczoo/FuxiCTR)
set -euo pipefail
DEST=${1:?usage: fuxictr_src.sh DEST [GIT_SOURCE]}
SRC=${2:-https://github.com/reczoo/FuxiCTR}
# Commit the results were produced with (reczoo/FuxiCTR main, 2026-06-05, fuxictr/version.py 2.3.10).
FUXICTR_COMMIT=${FUXICTR_COMMIT:-0245987fdc1d43c36164ea496a02324885a8557a}
DCNV3_COMMIT=20c8af2f43990d0423d7a520dec0390ed73cf3d3   # its parent still has model_zoo/DCNv3

[ -e "$DEST" ] && { echo "$DEST exists; remove it first" >&2; exit 1; }
tmp=""
if [ -d "$SRC" ]; then
  GIT=(git --git-dir="$(git -C "$SRC" rev-parse --absolute-git-dir)")
else
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  git clone --bare --quiet "$SRC" "$tmp/FuxiCTR.git"
  GIT=(git --git-dir="$tmp/FuxiCTR.git")
fi
mkdir -p "$DEST"
"${GIT[@]}" archive "$FUXICTR_COMMIT" | tar -x -C "$DEST"
"${GIT[@]}" archive "${DCNV3_COMMIT}^" model_zoo/DCNv3 | tar -x -C "$DEST"
echo "$FUXICTR_COMMIT (+ model_zoo/DCNv3 from ${DCNV3_COMMIT}^)" > "$DEST/FUXICTR_SRC_COMMIT"
ls "$DEST/model_zoo/DNN/DNN_torch/src/DNN.py" "$DEST/model_zoo/DCNv3/src/DCNv3.py" "$DEST/model_zoo/BST/src/BST.py"
