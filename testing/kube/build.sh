#!/usr/bin/env bash
# Builds the test suite's Kubernetes API server, etcd and kube-apiserver,
# from their Go modules (the go.mod files beside this script), into
# $1 (default: target/kube-bin at the repository's root).
#
# A binary is rebuilt only when its go.mod, go.sum, main.go or the Go
# version changed; Go's build and module caches make a rebuild fast.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../target/kube-bin}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

command -v go >/dev/null || { echo "testing/kube/build.sh: Go is missing (the machine's Go 1.26 builds the test API server)" >&2; exit 1; }

build() {
  local module="$1" binary="$2" ldflags="${3:-}"
  local stamp
  stamp="$(cd "$here/$module" && { go version; echo "$ldflags"; cat go.mod go.sum main.go; } | sha256sum | cut -d' ' -f1)"
  if [ -x "$out/$binary" ] && [ "$(cat "$out/$binary.stamp" 2>/dev/null)" = "$stamp" ]; then
    return
  fi
  echo "==> building $binary (testing/kube/$module)" >&2
  local started=$SECONDS
  (cd "$here/$module" && go build -trimpath -mod=readonly -ldflags "$ldflags" -o "$out/$binary.new" .)
  mv "$out/$binary.new" "$out/$binary"
  echo "$stamp" >"$out/$binary.stamp"
  echo "==> built $binary in $((SECONDS - started)) s" >&2
}

build etcd etcd
# The API server reports the release it was built from (kubectl and clients
# read /version), as Kubernetes' own build stamps it.
release="$(cd "$here/apiserver" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
minor="$(echo "$release" | cut -d. -f2)"
version=k8s.io/component-base/version
build apiserver kube-apiserver "-X $version.gitVersion=$release -X $version.gitMajor=1 -X $version.gitMinor=$minor -X $version.gitTreeState=clean"
echo "$out"
