#!/usr/bin/env bash
# The import contract (pyproject's [tool.importlinter]) checked on the layout a wheel installs: the
# layers inside `orchard` (orchard.services, ...). import-linter reads packages from the file system,
# so the checkout's top-level folders are staged under orchard/ in a temporary directory first.
# Usage: deploy/lint-imports.sh [path/to/lint-imports]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
lint_imports="$(realpath "${1:-$(command -v lint-imports)}")"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/orchard"
cp "$repo"/orchard/*.py "$stage/orchard/"
for layer in services learner rollout verifiers; do
    cp -r "$repo/$layer" "$stage/orchard/$layer"
done
cd "$stage"  # import-linter puts the working directory first on sys.path
PYTHONPATH="$stage" "$lint_imports" --no-cache "$repo/pyproject.toml"
