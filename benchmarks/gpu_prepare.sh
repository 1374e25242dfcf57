#!/usr/bin/env bash
# Copy what benchmarks/gpu_check.py needs on the GPU machine, and that does not travel with the checkout,
# into .gpu/ (ignored by git through .git/info/exclude); the device call names `.gpu` in `carry` (docs/gpu.md).
#
#   bash benchmarks/gpu_prepare.sh [DATA_DIR]     # DATA_DIR: default $MOE_LENS_DATA, else ../shared/data
#
# What goes: WikiText-2's three token files (13.2 MB), checked against their SHA-256. Nothing else is needed:
# the GPU path imports torch, numpy, pandas, pyarrow, scipy and tqdm, all installed there (no wheels); POS
# tags are off (no spaCy there); the compiled CPU kernel is never built on CUDA (MOE_LENS_CPU_EXT=0 anyway).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
src="${1:-${MOE_LENS_DATA:-../shared/data}}/wikitext-2"
dest=.gpu/data/wikitext-2
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")" "$dest"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
for f in wiki.train.tokens wiki.valid.tokens wiki.test.tokens; do
  install -m 0644 "$src/$f" "$dest/$f"
done
(cd "$dest" && sha256sum -c --quiet - <<'SUMS'
9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f  wiki.train.tokens
f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8  wiki.valid.tokens
d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0  wiki.test.tokens
SUMS
)
git check-ignore -q .gpu/data/wikitext-2/wiki.train.tokens || { echo "gpu_prepare: .gpu/ is not ignored" >&2; exit 1; }
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb .gpu | cut -f1)
total=$(( tracked + ${untracked:-0} + carried ))
echo "gpu_prepare: .gpu/ ready ($(( carried / 1048576 )) MiB); what travels: $(( total / 1048576 )) MiB of 64 MiB"
[ "$total" -lt $(( 64 * 1048576 )) ] || { echo "gpu_prepare: over the 64 MiB a device call carries" >&2; exit 1; }
