#!/usr/bin/env bash
# Build the payload of a GPU run on a vLLM release whose torch the device image lacks (vLLM 0.32: torch 2.13).
#
#   bench/gpu/payload.sh WHEEL_DIR [MODEL_DIR...]
#
# WHEEL_DIR holds every wheel to carry (torch, triton, the CUDA libraries the image has in older
# versions, vllm and the Python dependencies the image lacks; bench/gpu/README.md lists them). The
# wheels travel as they are (already compressed), except vllm's, from which the FlashAttention-2
# kernels (Hopper runs FA3) and the vllm-rs binary are dropped. MODEL_DIRs (dummy model folders)
# travel too. Everything is one uncompressed tar split into parts under .gpu/p032/part-N (git-ignored:
# /.gpu/ in .git/info/exclude), sized so that a part plus the working tree stays under the device tool's
# 64 MiB a call; .gpu/p032/last/env.sh is the prefix of the bench call:
#
#   . .gpu/p032/last/env.sh && python3 -m bench.gpu.run_gpu_bench ...
#
# On the device env.sh joins the parts from /tmp/acc32, checks sha256, installs the wheels with
# pip --no-index --no-deps --target /tmp/pl32/site (once per warm machine) and exports the environment.
set -euo pipefail
WHEELS=$(cd "${1:?usage: payload.sh WHEEL_DIR [MODEL_DIR...]}" && pwd); shift
ROOT=$(git rev-parse --show-toplevel)
G=$ROOT/.gpu/p032
git -C "$ROOT" check-ignore -q .gpu/x || { echo "payload.sh: add /.gpu/ to .git/info/exclude first" >&2; exit 1; }
TREE_MIB=$(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- | awk '{s+=$1} END {printf "%d", s/1048576 + 1}')
PART_MIB=${PART_MIB:-$(( 62 - TREE_MIB ))}
[ "$PART_MIB" -gt 56 ] && PART_MIB=56
rm -rf "$G"; mkdir -p "$G/stage/wheels" "$G/stage/models" "$G/last"
for w in "$WHEELS"/*.whl; do
  b=$(basename "$w")
  if [[ $b == vllm-* ]]; then
    cp "$w" "$G/stage/wheels/$b"
    zip -q -d "$G/stage/wheels/$b" 'vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' 'vllm/vllm-rs'
  else
    ln "$w" "$G/stage/wheels/$b" 2>/dev/null || cp "$w" "$G/stage/wheels/$b"
  fi
done
for d in "$@"; do cp -rL "$d" "$G/stage/models/"; done
(cd "$G/stage/wheels" && ls) > "$G/stage/WHEELS.txt"
tar -C "$G/stage" --owner=0 --group=0 -cf "$G/payload.tar" .
SHA=$(sha256sum "$G/payload.tar" | cut -d' ' -f1)
(cd "$G" && split -b "${PART_MIB}M" -d -a 3 payload.tar chunk.)
n=0
for c in "$G"/chunk.*; do n=$((n + 1)); mkdir -p "$G/part-$n"; mv "$c" "$G/part-$n/payload.tar.${c##*.}"; done
rm -rf "$G/stage" "$G/payload.tar"
printf 'SHA256=%s\nPARTS=%s\n' "$SHA" "$n" > "$G/last/manifest"
cat > "$G/last/env.sh" <<'EOF'
# Sourced by the bench call: joins the parts in /tmp/acc32, installs the wheels once per warm machine.
_p32() {
  local here acc=/tmp/acc32 pl=/tmp/pl32 i t0 files=""
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); . "$here/manifest" || return 1
  if [ "$(cat "$pl/.sha" 2>/dev/null)" != "$SHA256" ]; then
    for i in $(seq 0 $((PARTS - 1))); do
      f=$acc/payload.tar.$(printf %03d "$i")
      [ -f "$f" ] || { echo "payload: MISSING part $((i + 1)) of $PARTS: resend every part" >&2; return 3; }
      files="$files $f"
    done
    # shellcheck disable=SC2086
    [ "$(cat $files | sha256sum | cut -d' ' -f1)" = "$SHA256" ] || { echo "payload: sha256 mismatch" >&2; return 4; }
    t0=$(date +%s); rm -rf "$pl"; mkdir -p "$pl/site"
    # shellcheck disable=SC2086
    cat $files | tar -xf - -C "$pl" && rm -f $files
    python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-warn-script-location --no-warn-conflicts --target "$pl/site" "$pl"/wheels/*.whl || return 5
    rm -rf "$pl/wheels" "$pl/site/bin"
    echo "$SHA256" > "$pl/.sha"
    echo "payload: installed in $(( $(date +%s) - t0 )) s ($(du -sm "$pl" | cut -f1) MiB)"
  fi
  export GPU_PL=$pl/models PYTHONPATH=$pl/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1 \
    PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1
}
_p32; _p32_rc=$?; unset -f _p32; (exit $_p32_rc)
EOF
echo "payload.sh: $n parts of <= ${PART_MIB} MiB (tree ${TREE_MIB} MiB), sha256 ${SHA:0:16}"
echo "calls: run carry=[\".gpu/p032/part-K\"] command=\"mkdir -p /tmp/acc32 && mv .gpu/p032/part-K/* /tmp/acc32/\" for K=1..$n,"
echo "then carry=[\".gpu/p032/last\", \".gpu/tree\"] command=\". .gpu/p032/last/env.sh && cd .gpu/tree && ...\""
