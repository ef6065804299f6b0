#!/usr/bin/env bash
# Installs GVFDiffusion into a virtual environment (.venv by default). Safe to run again: it only
# installs what changed since the last run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

usage() {
  cat <<'EOF'
Usage: ./setup.sh [--cpu | --cuda] [--dev] [--render] [--venv DIR] [--force]

  --cpu      CPU-only install: the CPU build of torch 2.13.0 (never the multi-GB CUDA build).
  --cuda     GPU install: keep the machine's own CUDA torch (the venv sees the system site-packages)
             and add the GPU extra (gsplat, which compiles its kernels on first use).
             Without --cpu or --cuda, --cuda is chosen when `nvidia-smi -L` lists a GPU.
  --dev      also install the test and benchmark tools (pytest).
  --render   also make the Blender venv .venv-render (bpy, Python 3.11) used by data_rendering/.
  --venv DIR put the environment in DIR instead of .venv.
  --force    reinstall the requirements even if nothing changed.
  -h, --help show this help.

Environment: PYTHON (interpreter that creates the venv; default python3), CPU_TORCH (the torch
requirement on CPU machines; default torch==2.13.0).
EOF
}

mode="" dev=0 render=0 venv=".venv" force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --cuda) mode=cuda ;;
    --dev) dev=1 ;;
    --render) render=1 ;;
    --venv) shift; venv="${1:?--venv needs a directory}" ;;
    --force) force=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PYTHON="${PYTHON:-python3}"
CPU_TORCH="${CPU_TORCH:-torch==2.13.0}"
if [ -z "$mode" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then mode=cuda; else mode=cpu; fi
fi

# Create the venv. On GPU machines it inherits the system site-packages so the preinstalled CUDA torch is used.
if [ ! -x "$venv/bin/python" ]; then
  echo "setup.sh: creating $venv ($mode)"
  if [ "$mode" = cuda ]; then "$PYTHON" -m venv --system-site-packages "$venv"; else "$PYTHON" -m venv "$venv"; fi
fi
py="$venv/bin/python"
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

reqs=(requirements.txt)
[ "$mode" = cuda ] && reqs+=(requirements-gpu.txt)
[ "$dev" = 1 ] && reqs+=(requirements-dev.txt)
stamp="$venv/.gvf-setup-stamp"
want="$mode $CPU_TORCH $(cat "${reqs[@]}" pyproject.toml | sha256sum | cut -c1-16)"
if [ "$force" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  touch "$stamp"  # keeps make's dependency on the stamp satisfied
  echo "setup.sh: $venv is up to date ($mode)"
else
  if [ "$mode" = cpu ]; then
    # Torch first, exactly pinned; then everything else under a constraint that keeps that torch.
    if ! "$py" -c 'import torch' 2>/dev/null; then
      echo "setup.sh: installing $CPU_TORCH, CPU build (about 200 MB; a minute or two)"
      pip_install "$CPU_TORCH"
    fi
  elif ! "$py" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    echo "setup.sh: --cuda needs a CUDA build of torch visible to $PYTHON; install one first (https://pytorch.org)" >&2
    exit 1
  fi
  tver=$("$py" -c 'import torch; print(torch.__version__)')
  constraints="$venv/.torch-constraint.txt"
  echo "torch==${tver}" > "$constraints"
  for r in "${reqs[@]}"; do
    # Say what is coming: pip -q is silent for the minute the larger packages take.
    echo "setup.sh: installing $r: $(grep -v '^\s*#' "$r" | sed 's/[<>=!~;[ ].*//' | grep . | tr '\n' ' ')"
    pip_install -r "$r" -c "$constraints"
  done
  # The project itself, editable: its packages import from anywhere without sys.path edits (pyproject.toml).
  echo "setup.sh: installing this project (pip install -e .)"
  pip_install --no-deps -e .
  echo "$want" > "$stamp"
  echo "setup.sh: installed into $venv (torch $tver, $mode)"
fi

if [ "$render" = 1 ]; then
  # bpy wheels exist for CPython 3.11 only; Blender pins its own numpy, hence a separate venv.
  rpy="${RENDER_PYTHON:-python3.11}"
  command -v "$rpy" >/dev/null 2>&1 || { echo "setup.sh: --render needs $rpy (bpy wheels are built for CPython 3.11)" >&2; exit 1; }
  [ -x .venv-render/bin/python ] || "$rpy" -m venv .venv-render
  .venv-render/bin/python -c 'import bpy' 2>/dev/null || .venv-render/bin/python -m pip install -q "bpy==4.2.*"
  .venv-render/bin/python -m pip install -q --no-deps -e .  # blender_render.py imports datasets/ and utils/
  echo "setup.sh: Blender venv ready in .venv-render"
fi
