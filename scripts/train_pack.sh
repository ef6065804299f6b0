#!/usr/bin/env bash
# Train a pretrained pack from nothing, in one command: synthetic data -> VAEs (phase 1 static, phase 2 joint) ->
# latents -> DiT -> pack -> held-out evaluation, then a table of minutes per stage.
#
#   scripts/train_pack.sh                       # configs/small on this machine (one GPU: about 25 minutes)
#   scripts/train_pack.sh --scale tiny --num 24 --vae-set train.max_steps=20 --dit-set train.max_steps=20
#   scripts/train_pack.sh --real data/real      # synthetic + real animations (python -m data_rendering.game_assets)
#   scripts/train_pack.sh --real-bundle b.zip   # the same from a bundle (game_assets --bundle), without the packages
#
# Rerun the same command to continue: finished stages are skipped (their stamps are in <runs>/done/), an interrupted
# training stage resumes from its last checkpoint, the data generator keeps the objects it already wrote. SIGTERM or
# SIGINT (e.g. `timeout 500 scripts/train_pack.sh`) lets the running trainer save a checkpoint before the script stops.
# The pack is written to <runs>/pack (never over assets/pack: copy it there yourself).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The project root on the import path for scripts/*.py also where `pip install -e .` has not run (a bare GPU machine).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

usage() {
  cat <<'EOF'
Usage: scripts/train_pack.sh [options]
  --scale NAME     configs/NAME/{vae,diffusion}.yml (default: small)
  --data DIR       dataset root (default: data/NAME)
  --runs DIR       runs, pack, evaluation and stage stamps (default: runs/NAME, runs/NAME_mixed with --real)
  --real DIR       also train on the prepared real animations in DIR (data_rendering.game_assets --out DIR, made
                   with the scale's frames, views and resolution): its samples are hard-linked into the data root,
                   its train.txt joins the synthetic one, and the pack is evaluated on both test lists
  --real-bundle FILE  the same from a game_assets bundle (game_assets --bundle FILE): a first stage unbundles it
                   into DATA_real with the scale's frames, views and resolution, which is then used as --real
  --num N          synthetic objects (default: 2000)
  --test-fraction F  held-out share of them (default: 0.06)
  --seed S         data seed (default: 2)
  --workers N      data-generation processes (default: all cores)
  --vae-set K=V    override for main_vae.py / encode_latent.py (repeatable)
  --dit-set K=V    override for main_latent.py (repeatable)
  --eval-limit N   evaluate on the first N held-out objects only (default: all)
  --python PY      interpreter (default: .venv/bin/python if present, else python3)
EOF
}

scale=small data="" runs="" real="" real_bundle="" num=2000 test_fraction=0.06 seed=2 workers="" eval_limit=""
vae_set=() dit_set=()
py=.venv/bin/python; [ -x "$py" ] || py=python3
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) scale="$2"; shift ;;
    --data) data="$2"; shift ;;
    --runs) runs="$2"; shift ;;
    --real) real="$2"; shift ;;
    --real-bundle) real_bundle="$2"; shift ;;
    --num) num="$2"; shift ;;
    --test-fraction) test_fraction="$2"; shift ;;
    --seed) seed="$2"; shift ;;
    --workers) workers="$2"; shift ;;
    --vae-set) vae_set+=("$2"); shift ;;
    --dit-set) dit_set+=("$2"); shift ;;
    --eval-limit) eval_limit="$2"; shift ;;
    --python) py="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "train_pack.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
vae_cfg=configs/$scale/vae.yml dit_cfg=configs/$scale/diffusion.yml
for f in "$vae_cfg" "$dit_cfg"; do [ -f "$f" ] || { echo "train_pack.sh: $f not found (--scale $scale)" >&2; exit 2; }; done
data=${data:-data/$scale}
# --real-bundle: the unbundled samples are a prepared folder beside the data root, used as --real's (unbundling into
# the data root itself would append the real names to the synthetic lists, whose test.txt is the evaluation's).
if [ -n "$real_bundle" ]; then
  [ -z "$real" ] || { echo "train_pack.sh: give --real or --real-bundle, not both" >&2; exit 2; }
  [ -e "$real_bundle" ] || { echo "train_pack.sh: $real_bundle not found (--real-bundle)" >&2; exit 2; }
  real=${data}_real
fi
runs=${runs:-runs/$scale${real:+_mixed}}
[ -z "$real" ] || [ -n "$real_bundle" ] || [ -f "$real/train.txt" ] ||
  { echo "train_pack.sh: $real/train.txt not found (--real)" >&2; exit 2; }
workers=${workers:-$(nproc)}
mkdir -p "$runs/done" "$data"
times="$runs/minutes.tsv"

# On a GPU: bf16 autocast for both trainers and a compiled DiT step. The CPU keeps float32 and eager.
gpu=$("$py" -c 'import torch; print(int(torch.cuda.is_available()))')
if [ "$gpu" = 1 ]; then
  vae_set=(train.mixed_precision=bf16 "${vae_set[@]}")
  dit_set=(train.mixed_precision=bf16 train.compile=true "${dit_set[@]}")
fi
# The data generator renders what the VAE config trains on.
read -r frames views res < <("$py" -c "
from utils.config import load_config
d = load_config('$vae_cfg', [a for a in '''${vae_set[*]}'''.split() if a.startswith('data.')]).data
print(d.num_timesteps, d.num_views, d.image_resolution)")

child=""
interrupted=0
on_signal() { interrupted=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null || true; }
trap on_signal TERM INT

# stage NAME COMMAND...: skipped when stamped; otherwise run in its own session (a group signal aimed at this script
# must not reach the trainer's loader workers: only the trainer is told, and it saves before exiting), timed, stamped.
stage() {
  local name="$1"; shift
  if [ -f "$runs/done/$name" ]; then echo "== $name: done earlier, skipped"; return 0; fi
  echo "== $name: $*"
  local start=$SECONDS rc=0
  setsid "$@" & child=$!
  while :; do  # wait returns early when a trapped signal arrives; wait again until the child has really exited
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  child=""
  printf '%s\t%s\n' "$name" "$(( SECONDS - start ))" >> "$times"
  if [ "$interrupted" = 1 ]; then echo "== $name: interrupted; rerun the same command to continue"; exit 3; fi
  if [ "$rc" != 0 ]; then echo "== $name: failed (exit $rc)" >&2; exit "$rc"; fi
  touch "$runs/done/$name"
}

stage data "$py" -m data_rendering.synthetic --out "$data" --num "$num" --frames "$frames" --views "$views" \
  --res "$res" --test-fraction "$test_fraction" --seed "$seed" --workers "$workers"
train_list=$data/train.txt
if [ -n "$real" ]; then
  [ -z "$real_bundle" ] || stage unbundle "$py" -m data_rendering.game_assets.unbundle "$real_bundle" --out "$real" \
    --frames "$frames" --views "$views" --res "$res" --workers "$workers"
  # One data root for the trainers: the real samples are hard links beside the synthetic ones (no copy, no symlink
  # for the layout's confinement to refuse); their names (<game>__<model>__<clip>) never clash with obj_XXXXX.
  stage real bash -c 'set -e; while read -r n; do if [ -n "$n" ] && [ ! -e "$2/$n" ]; then cp -al "$1/$n" "$2/$n"; fi
    done < "$1/all.txt"; cp "$1/train.txt" "$2/real_train.txt"; cp "$1/test.txt" "$2/real_test.txt"
    cat "$2/train.txt" "$2/real_train.txt" > "$2/train_mixed.txt"' _ "$real" "$data"
  train_list=$data/train_mixed.txt
fi
resume() { [ -e "$1/checkpoints/latest" ] && echo "--resume latest" || true; }
# shellcheck disable=SC2046  # resume prints nothing or two words
stage vae "$py" main_vae.py --config "$vae_cfg" --data-root "$data" --list "$train_list" --out "$runs/vae" \
  $(resume "$runs/vae") "${vae_set[@]}"
stage latents "$py" encode_latent.py --config "$vae_cfg" --diffusion-config "$dit_cfg" --data-root "$data" \
  --list "$train_list" --vae-run "$runs/vae" --stats-dir "$runs/stats" \
  $( [ "$gpu" = 1 ] && echo "--precision bf16" ) "${vae_set[@]}"
# shellcheck disable=SC2046
stage dit "$py" main_latent.py --config "$dit_cfg" --data-root "$data" --list "$train_list" --out "$runs/dit" \
  $(resume "$runs/dit") data.stats_dir="$runs/stats" "${dit_set[@]}"
stage pack "$py" scripts/make_pack.py --vae-run "$runs/vae" --dit-run "$runs/dit" --stats-dir "$runs/stats" \
  --data-root "$data" --train-list "$train_list" --vae-config "$vae_cfg" --config "$dit_cfg" --out "$runs/pack" \
  --overwrite
# The pack carries the training set's mean latent (the mean-motion baseline): evaluation needs no training list.
stage evaluate "$py" scripts/evaluate.py --pack "$runs/pack" --data-root "$data" --list "$data/test.txt" \
  --out "$runs/eval" ${eval_limit:+--limit "$eval_limit"}
[ -z "$real" ] || stage evaluate_real "$py" scripts/evaluate.py --pack "$runs/pack" --data-root "$data" \
  --list "$data/real_test.txt" --out "$runs/eval_real" ${eval_limit:+--limit "$eval_limit"}

echo
echo "| stage | minutes |"
echo "|---|---|"
awk -F'\t' '{m[$1] += $2; if (!($1 in o)) { o[$1] = n++ } } END { for (s in o) k[o[s]] = s;
  for (i = 0; i < n; i++) { printf "| %s | %.1f |\n", k[i], m[k[i]] / 60; t += m[k[i]] } printf "| total | %.1f |\n", t / 60 }' "$times"
echo "pack: $runs/pack   evaluation: $runs/eval/metrics.md${real:+, real test split: $runs/eval_real/metrics.md}"
