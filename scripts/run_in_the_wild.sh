#!/usr/bin/env bash
# Animate every video in a folder (mp4, mov, mkv, webm, avi, gif, or sub-folders of frames).
#
#   scripts/run_in_the_wild.sh <videos folder> [--canonical DIR|FILE.ply] [--pack DIR] [--out DIR] [inference options]
#
# Canonical Gaussians: a PLY per video, <name>.ply beside the videos or in --canonical DIR (any image-to-3D tool's 3DGS
# PLY works), else made from the first frame by --trellis DIR|REPO (TRELLIS-image-large). Weights: --pack DIR (default assets/pack), or
# --dit/--motion-vae/--stats-dir for other weights. Before anything runs, the script lists what is missing.
# Outputs: <out>/<video name>/ (see inference_dpm_latent.py); exit status 1 if any video failed.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage; exit 0; fi
if [[ $# -lt 1 || "$1" == -* ]]; then usage >&2; exit 2; fi
videos=$1; shift
canonical=""; pack=""; out=""; trellis=""; explicit_weights=0; rest=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --canonical) canonical=$2; shift 2 ;;
        --pack) pack=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --trellis) trellis=$2; rest+=("$1" "$2"); shift 2 ;;
        --dit|--motion-vae|--stats-dir) explicit_weights=1; rest+=("$1" "$2"); shift 2 ;;
        *) rest+=("$1"); shift ;;
    esac
done
[[ -d $videos ]] || { echo "error: $videos is not a folder of videos" >&2; exit 2; }
out=${out:-outputs/in_the_wild/$(basename "$videos")}
[[ -n $pack || $explicit_weights == 1 ]] || pack=assets/pack
canonical_dir=${canonical:-$videos}

PY=python
[[ -x .venv/bin/python ]] && PY=.venv/bin/python

problems=()
if [[ -n $pack ]]; then
    for f in dit.safetensors motion_vae.safetensors deformation_mean.pt deformation_std.pt static_mean.pt static_std.pt; do
        [[ -f $pack/$f ]] || problems+=("weights: $pack/$f is missing (train with main_vae.py / encode_latent.py / main_latent.py and gather with scripts/make_pack.py, or pass --dit, --motion-vae, --stats-dir)")
    done
fi
count=0
shopt -s nullglob nocaseglob
for v in "$videos"/*; do
    name=$(basename "$v"); stem=${name%.*}
    if [[ -f $v ]]; then
        case ${name##*.} in mp4|mov|mkv|webm|avi|gif) ;; *) continue ;; esac
    elif [[ -d $v ]]; then
        frames=("$v"/*.png "$v"/*.jpg "$v"/*.jpeg "$v"/*.webp)
        [[ ${#frames[@]} -gt 0 ]] || continue
        stem=$name
    else
        continue
    fi
    count=$((count + 1))
    if [[ -f $canonical_dir ]]; then :
    elif [[ ! -f $canonical_dir/$stem.ply && -z $trellis ]]; then
        problems+=("canonical: no $canonical_dir/$stem.ply for video $name (give --trellis <TRELLIS-image-large folder or repo> to make it from the first frame, or a PLY from any image-to-3D tool)")
    fi
done
[[ $count -gt 0 ]] || problems+=("input: no videos or frame folders in $videos")
if [[ ${#problems[@]} -gt 0 ]]; then
    echo "run_in_the_wild.sh: cannot run; missing:" >&2
    printf '  - %s\n' "${problems[@]}" >&2
    exit 2
fi

args=(--input "$videos" --canonical "$canonical_dir" --out "$out")
[[ -n $pack ]] && args+=(--pack "$pack")
echo "run_in_the_wild.sh: $count video(s) -> $out"
exec "$PY" inference_dpm_latent.py "${args[@]}" ${rest[@]+"${rest[@]}"}
