#!/usr/bin/env bash
# Provisions a real Kubernetes 1.20.2 API server (etcd + kube-apiserver, optionally kube-controller-manager)
# on 127.0.0.1 for integration tests, using only Debian bookworm's package archive.
#
#   scripts/envtest.sh build        build/copy binaries into the cache, print the bin dir (instant when cached)
#   scripts/envtest.sh start [DIR]  start etcd + apiserver on free ports, write DIR/kubeconfig, print DIR
#   scripts/envtest.sh stop DIR     stop what `start DIR` started
#
# Env: PHILOTES_CACHE (default ~/.cache/philotes), WITH_KCM=1 (also run kube-controller-manager: garbage
# collection, default service accounts), K8S_REUSE_BIN (an existing folder with kube-apiserver,
# kube-controller-manager and etcd to copy instead of building them; default ~/.cache/k8s-1.20.2-debian/bin,
# set it empty to always build).
#
# Kubernetes 1.20.2 is built from Debian's `kubernetes` source package with Debian's Go 1.19; etcd 3.4.23 comes
# from Debian's etcd-server. kubectl is built from the same tree (Debian bookworm has no kubectl package).
set -euo pipefail

CACHE=${PHILOTES_CACHE:-$HOME/.cache/philotes}
BIN=$CACHE/k8s-1.20.2/bin
K8S_PKG_VERSION=1.20.5+really1.20.2-1.1+deb12u1
K8S_BINS=(kube-apiserver kube-controller-manager kubectl)

log() { echo "envtest: $*" >&2; }
die() { log "$*"; exit 1; }

# Runs a command as root (directly, or through sudo).
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}

# Installs Debian packages for the given commands when a command is missing. Args: cmd:package ...
ensure_cmds() {
  local missing=() pair
  for pair in "$@"; do command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  as_root apt-get -q update >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "${missing[@]}" >&2
}

have_all() {
  local b
  for b in "${K8S_BINS[@]}" etcd; do [ -x "$BIN/$b" ] || return 1; done
}

cmd_build() {
  if have_all; then echo "$BIN"; return 0; fi
  ensure_cmds openssl:openssl make:make tar:tar gzip:gzip find:findutils
  mkdir -p "$BIN"

  # Reuse binaries from an earlier build of the same recipe when there is one.
  local reuse=${K8S_REUSE_BIN-$HOME/.cache/k8s-1.20.2-debian/bin} b
  if [ -n "$reuse" ] && [ -d "$reuse" ]; then
    for b in "${K8S_BINS[@]}" etcd; do
      if [ ! -x "$BIN/$b" ] && [ -x "$reuse/$b" ]; then log "reusing $reuse/$b"; cp "$reuse/$b" "$BIN/$b.tmp"; mv "$BIN/$b.tmp" "$BIN/$b"; fi
    done
  fi
  if have_all; then echo "$BIN"; return 0; fi

  local work
  work=$(mktemp -d "${TMPDIR:-/tmp}/philotes-k8sbuild.XXXXXX")
  # shellcheck disable=SC2064  # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  (build_from_source "$work") >&2
  rm -rf "$work"; trap - EXIT
  have_all || die "build finished but binaries are missing in $BIN"
  echo "$BIN"
}

# Downloads sources and tools with a private apt config (Debian archive only; /etc/apt is left alone)
# and builds whatever of kube-apiserver, kube-controller-manager, kubectl and etcd is still missing.
build_from_source() {
  local work=$1 f
  cd "$work"
  mkdir -p apt/lists/partial apt/cache/archives/partial apt/parts tools gopath/src/k8s.io
  # The machine's Debian sources (other vendors' repos are skipped), with source packages enabled.
  for f in /etc/apt/sources.list.d/*.sources; do
    if [ ! -f "$f" ] || ! grep -q 'debian\.org' "$f"; then continue; fi
    sed 's/^Types:.*/Types: deb deb-src/' "$f" > "apt/parts/$(basename "$f")"
  done
  { grep -h '^deb .*debian\.org' /etc/apt/sources.list 2>/dev/null || true; } | sed 'p; s/^deb /deb-src /' > apt/sources.list
  if [ ! -s apt/sources.list ] && [ -z "$(ls apt/parts)" ]; then
    # Nothing usable configured: fall back to the public bookworm archive.
    printf '%s\n' "deb http://deb.debian.org/debian bookworm main" "deb-src http://deb.debian.org/debian bookworm main" \
      "deb http://deb.debian.org/debian-security bookworm-security main" > apt/sources.list
  fi
  local apt=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=$work/apt/parts"
             -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache")
  [ "$(id -u)" = 0 ] && apt+=(-o APT::Sandbox::User=root)
  apt-get "${apt[@]}" -q update
  apt-get "${apt[@]}" -q source --download-only "kubernetes=$K8S_PKG_VERSION" \
    || apt-get "${apt[@]}" -q source --download-only kubernetes   # pinned revision superseded by an update
  apt-get "${apt[@]}" -q download golang-1.19-go golang-1.19-src etcd-server rsync libpopt0 \
    golang-github-modern-go-reflect2-dev
  for f in ./*.deb; do dpkg -x "$f" root; done
  # rsync (needed by `make generated_files`) without installing it system-wide.
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/root/usr/lib/x86_64-linux-gnu exec %s/root/usr/bin/rsync "$@"\n' \
    "$work" "$work" > tools/rsync
  chmod +x tools/rsync
  tar xzf kubernetes_*.orig.tar.gz
  mv kubernetes-1.20.* gopath/src/k8s.io/kubernetes
  # k8s 1.20 vendors modern-go/reflect2 v1.0.1, which crashes (fatal error: fault in mapiternext) under
  # Go >= 1.18. Swap in Debian's reflect2 1.0.2 (API-compatible, Go 1.18+ aware).
  local r=gopath/src/k8s.io/kubernetes/vendor/github.com/modern-go/reflect2
  local src=root/usr/share/gocode/src/github.com/modern-go/reflect2
  rm -f "$r"/*.go "$r"/*.s
  cp "$src"/*.go "$src"/*.s "$r"/
  rm -f "$r"/*_test.go
  export GOROOT="$work/root/usr/lib/go-1.19" GOPATH="$work/gopath" GOCACHE="$work/gocache" \
         GO111MODULE=off GOFLAGS='' GOPROXY=off CGO_ENABLED=0 PATH="$work/tools:$work/root/usr/lib/go-1.19/bin:$PATH"
  cd gopath/src/k8s.io/kubernetes
  make generated_files   # pkg/generated/openapi/zz_generated.openapi.go and bindata (needs rsync)
  local ld="-s -w" p b
  for p in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=v1.20.2 -X $p.gitMajor=1 -X $p.gitMinor=20 -X $p.gitTreeState=clean"
    ld="$ld -X $p.gitCommit=faecb196815e248d3ecfb03c680a4507229c2a56"
  done
  for b in "${K8S_BINS[@]}"; do
    [ -x "$BIN/$b" ] && continue
    log "building $b"
    go build -o "$BIN/$b.tmp" -ldflags "$ld" "./cmd/$b"
    mv "$BIN/$b.tmp" "$BIN/$b"
  done
  [ -x "$BIN/etcd" ] || { cp "$work/root/usr/bin/etcd" "$BIN/etcd.tmp"; mv "$BIN/etcd.tmp" "$BIN/etcd"; }
}

# Prints a TCP port on 127.0.0.1 that nothing listens on and that is not among the arguments.
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 12000))   # below the usual ephemeral range (32768+)
    case " $* " in *" $p "*) continue ;; esac
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
    echo "$p"; return 0
  done
  die "no free port found"
}

# Waits until a process is gone (SIGKILL after 10s).
wait_gone() {
  local pid=$1
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}

cmd_start() {
  local dir=${1:-}
  [ -n "$dir" ] || dir=$(mktemp -d "${TMPDIR:-/tmp}/philotes-envtest.XXXXXX")
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  [ -f "$dir/apiserver.pid" ] && kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null && die "already running in $dir"
  local bin
  bin=$(cmd_build)
  ensure_cmds openssl:openssl
  rm -rf "$dir/etcd" "$dir/certs"; mkdir -p "$dir/etcd" "$dir/certs"

  local etcd_port peer_port port kcm_port token
  etcd_port=$(free_port); peer_port=$(free_port "$etcd_port"); port=$(free_port "$etcd_port" "$peer_port")
  token=$(openssl rand -hex 24)
  openssl genrsa -out "$dir/certs/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/certs/sa.key" -pubout -out "$dir/certs/sa.pub" 2>/dev/null
  (umask 077; echo "$token,admin,admin-uid,system:masters" > "$dir/certs/tokens.csv")

  "$bin/etcd" --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port" > "$dir/etcd.log" 2>&1 &
  echo $! > "$dir/etcd.pid"

  local adm=()
  [ "${WITH_KCM:-0}" = 1 ] || adm=(--disable-admission-plugins=ServiceAccount)
  "$bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" --bind-address=127.0.0.1 \
    --secure-port="$port" --insecure-port=0 --cert-dir="$dir/certs/serving" \
    --token-auth-file="$dir/certs/tokens.csv" --authorization-mode=RBAC \
    --service-account-key-file="$dir/certs/sa.pub" --service-account-signing-key-file="$dir/certs/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range=10.0.0.0/24 \
    --advertise-address=10.0.0.1 --allow-privileged=true "${adm[@]}" > "$dir/apiserver.log" 2>&1 &
  echo $! > "$dir/apiserver.pid"

  (umask 077; cat > "$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: envtest, cluster: {server: "https://127.0.0.1:$port", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: "$token"}}]
contexts: [{name: envtest, context: {cluster: envtest, user: admin, namespace: default}}]
current-context: envtest
EOF
  )

  local ok=0
  for _ in $(seq 1 120); do
    if ! kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null || ! kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null; then
      log "etcd or kube-apiserver exited; see $dir/etcd.log and $dir/apiserver.log"
      tail -n 20 "$dir/apiserver.log" >&2 || true
      cmd_stop "$dir"; exit 1
    fi
    if KUBECONFIG="$dir/kubeconfig" "$bin/kubectl" get --raw /readyz >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.5
  done
  if [ "$ok" != 1 ]; then log "kube-apiserver not ready after 60s; see $dir/apiserver.log"; cmd_stop "$dir"; exit 1; fi

  if [ "${WITH_KCM:-0}" = 1 ]; then
    kcm_port=$(free_port "$etcd_port" "$peer_port" "$port")
    "$bin/kube-controller-manager" --kubeconfig="$dir/kubeconfig" --leader-elect=false --bind-address=127.0.0.1 \
      --port=0 --secure-port="$kcm_port" --service-account-private-key-file="$dir/certs/sa.key" \
      --use-service-account-credentials=false \
      --controllers='*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service,-persistentvolume-binder,-attachdetach' \
      > "$dir/kcm.log" 2>&1 &
    echo $! > "$dir/kcm.pid"
  fi
  echo "$dir"
}

cmd_stop() {
  local dir=${1:?usage: envtest.sh stop DIR} pair name pid argv0
  for pair in kcm:kube-controller-manager apiserver:kube-apiserver etcd:etcd; do
    name=${pair%%:*}
    [ -f "$dir/$name.pid" ] || continue
    pid=$(cat "$dir/$name.pid")
    # Only signal the process we started (the pid may have been reused since).
    argv0=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | head -n 1 || true)
    if [ "$(basename "${argv0:-none}")" = "${pair#*:}" ]; then kill "$pid" 2>/dev/null || true; wait_gone "$pid"; fi
    rm -f "$dir/$name.pid"
  done
}

case "${1:-}" in
  build) cmd_build ;;
  start) shift; cmd_start "${1:-}" ;;
  stop) shift; cmd_stop "${1:-}" ;;
  *) echo "usage: $0 build | start [DIR] | stop DIR" >&2; exit 2 ;;
esac
