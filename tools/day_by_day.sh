#!/bin/bash
# Day-by-day vs one run (docs/results.md, section 5): per seed, four `mdaf-rec train` runs, one after the other:
#   base    days up to FIRST_DAY - 1 from scratch          (--to-date)
#   warm    base warm-started on FIRST_DAY only            (--init-from base --from-date/--to-date)
#   warmopt the same, with base's optimizer state          (--init-optimizer)
#   full    all days up to FIRST_DAY from scratch          (--to-date)
# then prints the table (tools/day_by_day_table.py). Wall seconds of each command go to OUT/MODEL/times.txt.
#
#   DATA=data/ub OUT=runs/days MODEL=dnn SEEDS="1 2 3" PREV_DAY=2017-11-30 DAY=2017-12-01 tools/day_by_day.sh [--set k=v ...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/ub} OUT=${OUT:-runs/days} MODEL=${MODEL:-mdaf_bst} SEEDS=${SEEDS:-"1 2 3"}
PREV_DAY=${PREV_DAY:-2017-11-30} DAY=${DAY:-2017-12-01}
R=$OUT/$MODEL
mkdir -p "$R"
for S in $SEEDS; do
  run() {
    local name=$1; shift
    /usr/bin/time -f "${name}_s$S %e" -a -o "$R/times.txt" mdaf-rec train --config "configs/$MODEL.yaml" --data "$DATA" \
      --set train.seed="$S" --out "$R/${name}_s$S" "$@" > "$R/${name}_s$S.log" 2>&1
  }
  run base --to-date "$PREV_DAY" "${@}"
  run warm --init-from "$R/base_s$S" --from-date "$DAY" --to-date "$DAY" "${@}"
  run warmopt --init-from "$R/base_s$S" --init-optimizer --from-date "$DAY" --to-date "$DAY" "${@}"
  run full --to-date "$DAY" "${@}"
done
python tools/day_by_day_table.py "$R"
