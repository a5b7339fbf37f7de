#!/usr/bin/env bash
# Cut the vLLM bundle of ../shared/devbundle (made by its make.sh into .devbundle/p00, p01) into
# smaller parts, one folder per device call: a call carries at most 64 MiB *with* the working
# tree, and once benchmarks/results/ grew past ~8 MB the 56 MiB part p00 no longer fit (session 11).
# The archive and its sha256 stay the same; each new folder gets the bundle's install.sh and a
# manifest listing the new parts, so the device side runs exactly as the bundle's README says:
#
#   bash benchmarks/devbundle_resplit.sh [BUNDLE_DIR] [PART_BYTES]   # default .devbundle 30000000
#   # then, back to back: carry .devbundle/q00 -> bash .devbundle/q00/install.sh .devbundle/q00
#   #                     carry .devbundle/q01 -> bash .devbundle/q01/install.sh .devbundle/q01
#   #                     carry .devbundle/q02 -> bash .devbundle/q02/install.sh .devbundle/q02 && <work>
set -euo pipefail
dir=${1:-.devbundle}
part_bytes=${2:-30000000}
[ -f "$dir/p00/manifest" ] || { echo "no $dir/p00/manifest: run ../shared/devbundle/make.sh $dir first" >&2; exit 1; }
get() { grep -m1 "^$1=" "$dir/p00/manifest" | cut -d= -f2; }
sha=$(get archive_sha256) n=$(get parts)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for ((i = 0; i < n; i++)); do p=$(printf 'part%02d' "$i"); cat "$dir/p$(printf '%02d' "$i")/$p"; done >"$tmp/archive"
[ "$(sha256sum <"$tmp/archive" | cut -d' ' -f1)" = "$sha" ] || { echo "reassembled archive does not match the manifest" >&2; exit 1; }
split -b "$part_bytes" -d -a 2 "$tmp/archive" "$tmp/part"
pieces=("$tmp"/part[0-9][0-9])
parts=${#pieces[@]}
{
  echo "# re-split by benchmarks/devbundle_resplit.sh: the same archive in $parts parts"
  grep "^archive_" "$dir/p00/manifest"
  echo "parts=$parts"
  for f in "${pieces[@]}"; do echo "part${f##*/part}=$(sha256sum <"$f" | cut -d' ' -f1)"; done
} >"$tmp/manifest"
for f in "${pieces[@]}"; do
  k=${f##*/part}
  rm -rf "$dir/q$k" && mkdir -p "$dir/q$k"
  mv "$f" "$dir/q$k/part$k" && cp "$tmp/manifest" "$dir/q$k/manifest" && cp "$dir/p00/install.sh" "$dir/q$k/"
done
echo "wrote $parts parts of at most $part_bytes bytes into $dir/q00 .. $dir/q$(printf '%02d' $((parts - 1)))"
