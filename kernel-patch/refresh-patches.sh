#!/bin/bash
# Regenerate the diffs of kernel-patch/0*.patch and of the UML harness fix
# kernel-patch/uml-host/0*.patch after editing the kernel source, keeping
# each patch's header (everything up to its first "---" line) and its file
# list (the "+++ b/..." lines).  A new file goes into an
# existing patch by adding a "+++ b/path" line there by hand first.
#
# usage: kernel-patch/refresh-patches.sh PRISTINE_TREE EDITED_TREE
#   PRISTINE_TREE  unpacked /usr/src/linux-source-6.12.tar.xz, unmodified
#   EDITED_TREE    the same with the whole series applied and edited (e.g.
#                  target/uml/src/linux-source-6.12)
# The patches touch disjoint files, so each one is a plain diff of its files.
# (The negative control is not regenerated: it applies on top of patch 3.)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -eq 2 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
orig=$1 work=$2

for p in "$here"/uml-host/0*.patch "$here"/0*.patch; do
	tmp=$(mktemp)
	sed -n '1,/^---$/p' "$p" > "$tmp"
	grep -qx -- '---' "$tmp" || { echo "$p: no '---' line" >&2; rm -f "$tmp"; exit 1; }
	sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$p" | while IFS= read -r f; do
		diff -up --label "a/$f" --label "b/$f" "$orig/$f" "$work/$f" || [ $? -eq 1 ]
	done >> "$tmp"
	if cmp -s "$tmp" "$p"; then
		rm -f "$tmp"
	else
		mv "$tmp" "$p"
		echo "updated $(basename "$p")"
	fi
done
