#!/bin/bash
# Chain trial on cpu64w step 9,500 (+25 steps to write a run folder), 2026-12-04.
set -e
cd /work/main
R="nice -n 10 .venv/bin/deeprecon-rt"; D=../shared/data/acdc; X=/work/exp
date -u +"%F %T gan start"
[ -f $X/gan/model.safetensors ] || $R train gan --data $D --config cpu64w --out $X/gan --threads 1 \
   --warm-start training/cpu64w/gan/compact.safetensors --set mixed_precision_cpu=true --steps 9525
date -u +"%F %T encoder start"
[ -f $X/enc/model.safetensors ] || $R train encoder --data $D --config cpu64w --gan $X/gan --out $X/enc --threads 1 --steps 300
date -u +"%F %T latents start"
[ -f $X/lat/run.json ] && grep -q finished $X/lat/run.json || $R train latents --data $D --config cpu64w --gan $X/gan --encoder $X/enc --out $X/lat --threads 1 --set steps=20 --set lr=0.05
date -u +"%F %T seg start"
$R train seg --data $D --config cpu64w --latents $X/lat --out $X/seg --threads 1 --steps 1200 --set with_real=true --warm-start training/cpu64/seg-direct/model.safetensors
date -u +"%F %T export start"
$R export $X/seg --gan $X/gan --encoder $X/enc -o $X/bundle --set steps=20 --set lr=0.05
date -u +"%F %T done"
