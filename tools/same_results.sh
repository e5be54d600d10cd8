#!/usr/bin/env bash
# Do two commits make the same synthetic sets? Tiny runs (embedded dataset, no download) of every
# built-in method x parameterisation at REV and at the working tree, then synthetic.npz compared
# byte for byte. A refactor should print "identical" on every line.
#
#   tools/same_results.sh <rev> [out_dir]          # ~6 min on 2 cores
set -euo pipefail
rev=${1:?usage: tools/same_results.sh <rev> [out_dir]}
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${2:-$(mktemp -d)}
python=${PYTHON:-$repo/.venv/bin/python}
before=$out/tree-$rev
git -C "$repo" worktree add -f -q "$before" "$rev"
trap 'git -C "$repo" worktree remove --force "$before"' EXIT
for tree in "$before" "$repo"; do
  tag=$([ "$tree" = "$repo" ] && echo now || echo "$rev")
  for m in esp dm tm; do for p in pixels latents; do
    (cd "$tree" && PYTHONPATH="$tree" TF_CPP_MIN_LOG_LEVEL=3 "$python" -m esp_tf.train \
      --data_dir="$out/tfds" --nodownload --workdir="$out/$tag/${m}_$p" --experts_dir="$out/$tag/experts" \
      --method=$m --param=$p --num_experts=1 --expert_epochs=2 --max_start_epoch=1 --segment_length=1 \
      --iterations=3 --inner_steps=2 --real_per_class=4 --width=8 --depth=2 --phases=experts,condense \
      --log_every=1 --ckpt_every=1 --baselines= > "$out/$tag-${m}_$p.log" 2>&1) \
      || { echo "$tag $m $p failed: see $out/$tag-${m}_$p.log"; exit 1; }
  done; done
done
for m in esp dm tm; do for p in pixels latents; do
  if cmp -s "$out/$rev/${m}_$p/synthetic.npz" "$out/now/${m}_$p/synthetic.npz"; then
    echo "$m $p: identical"
  else
    echo "$m $p: DIFFERENT"
  fi
done; done
