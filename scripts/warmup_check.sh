#!/bin/bash
# The warmup check behind the default rule (docs/results/stability_defaults.md): configs/lm.py
# size=small, 200 steps at lr 2e-3, seed 0, 10 vs 40 warmup steps per variant and corpus, and the
# default run at the new rule's 48 steps. Resumable (a finished workdir is skipped).
#   bash scripts/warmup_check.sh [SHAKESPEARE_TXT]   (default data/tinyshakespeare.txt)
cd "$(dirname "$0")/.."
R=runs/warmup_check
SH=${1:-data/tinyshakespeare.txt}
run() {  # name arg warmup extra-flags...
  local name=$1 arg=$2 w=$3; shift 3
  [ -f $R/$name/DONE ] && return
  mkdir -p $R/$name; echo "[$(date +%T)] $name"
  python3 train.py --config=configs/lm.py:$arg --workdir=$R/$name --config.optim.warmup_steps=$w \
    --config.train.peak_flops=2e11 "$@" > $R/$name.log 2>&1 && touch $R/$name/DONE
  tail -1 $R/$name.log
}
S200="--config.train.steps=200"
run shakespeare_mha_w10 attn=mha,size=small 10 $S200 --config.data.path=$SH
run shakespeare_mha_w40 attn=mha,size=small 40 $S200 --config.data.path=$SH
run default_w48 attn=mla,size=small 48   # the default run under the new rule (10% of 480)
run shakespeare_mla_w10 attn=mla,size=small 10 $S200 --config.data.path=$SH
run shakespeare_mla_w40 attn=mla,size=small 40 $S200 --config.data.path=$SH
run stdlib_mha_w10 attn=mha,size=small 10 $S200 --config.train.final_eval_tokens=262144
run stdlib_mha_w40 attn=mha,size=small 40 $S200 --config.train.final_eval_tokens=262144
run shakespeare_gqa_w10 attn=gqa,size=small 10 $S200 --config.data.path=$SH --config.model.n_kv_heads=2
run shakespeare_gqa_w40 attn=gqa,size=small 40 $S200 --config.data.path=$SH --config.model.n_kv_heads=2
run shakespeare_mqa_w10 attn=mqa,size=small 10 $S200 --config.data.path=$SH
run shakespeare_mqa_w40 attn=mqa,size=small 40 $S200 --config.data.path=$SH
