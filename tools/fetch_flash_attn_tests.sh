#!/usr/bin/env bash
# Populate .fa/ (git-ignored) with flash-attn's tests/test_flash_attn.py from a flash-attn git
# directory (a clone's .git, or a bare mirror), for tools/run_flash_attn_tests.py.
# flash-attn's files are never committed here. The test file imports nothing else from its
# repository (flash_attn.* comes from tools/flash_attn_compat); .fa/COMMIT records the commit.
#   tools/fetch_flash_attn_tests.sh /path/to/flash-attention/.git [REV]
set -euo pipefail
git_dir=${1:?usage: $0 FLASH_ATTN_GIT_DIR [REV]}
rev=${2:-HEAD}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/.fa/tests"
git --git-dir="$git_dir" show "$rev:tests/test_flash_attn.py" > "$root/.fa/tests/test_flash_attn.py"
git --git-dir="$git_dir" rev-parse "$rev" > "$root/.fa/COMMIT"
echo "flash-attn $(cat "$root/.fa/COMMIT"): $root/.fa/tests/test_flash_attn.py"
