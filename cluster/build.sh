#!/usr/bin/env bash
# Builds the binaries of the local control plane from Go modules (see cluster/README.md):
#   kube-apiserver, kube-controller-manager, kubectl   (k8s.io/kubernetes, cluster/go/kubernetes)
#   etcd                                               (go.etcd.io/etcd/server/v3, cluster/go/etcd)
#   training-operator                                  (github.com/kubeflow/training-operator,
#                                                       cluster/go/training-operator)
# Each lands in .cache/cluster/bin/<component>-<version>/<component>; one already there is kept.
# The versions are the ones the modules' go.mod files require (go.sum pins everything else).
#
#   cluster/build.sh                 build what is missing
#   cluster/build.sh --print-bindir  only print the folders (one "name=dir" a line), build nothing
#   CLUSTER_CACHE=DIR                another cache root (default .cache/cluster)
#   GOMODCACHE / GOCACHE             respected when set; default .cache/cluster/go/{mod,build}
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cache=${CLUSTER_CACHE:-$root/.cache/cluster}
bin=$cache/bin

export GOMODCACHE=${GOMODCACHE:-$cache/go/mod}
export GOCACHE=${GOCACHE:-$cache/go/build}
# -modcacherw: the module cache can be deleted with rm -rf. -mod=readonly: go.mod/go.sum are
# never rewritten by a build; a missing go.sum line is an error, not a silent download.
export GOFLAGS="-buildvcs=false -modcacherw -mod=readonly"
export CGO_ENABLED=0
# All three modules say `go 1.26.0`; the local go (1.26.8 on the polyglot machines) is enough, and
# an older local go fetches go1.26.0 from the module proxy (GOTOOLCHAIN=auto). A version needing a
# newer Go than the local one would need e.g. `export GOTOOLCHAIN=go1.27.3` here.
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
export GOPROXY=${GOPROXY:-https://proxy.golang.org,direct}

modversion() { # modversion MODULE_DIR MODULE_PATH
    (cd "$here/go/$1" && go list -m -f '{{.Version}}' "$2")
}

kube_version=$(modversion kubernetes k8s.io/kubernetes)
etcd_version=$(modversion etcd go.etcd.io/etcd/server/v3)
to_version=$(modversion training-operator github.com/kubeflow/training-operator)

if [[ ${1:-} == --print-bindir ]]; then
    for c in kube-apiserver kube-controller-manager kubectl; do echo "$c=$bin/$c-$kube_version"; done
    echo "etcd=$bin/etcd-$etcd_version"
    echo "training-operator=$bin/training-operator-$to_version"
    exit 0
fi

total_start=$(date +%s)

# build NAME VERSION MODULE_DIR PACKAGE [go build flags...]
build() {
    local name=$1 version=$2 moddir=$3 pkg=$4
    shift 4
    local out=$bin/$name-$version
    if [[ -x $out/$name ]]; then
        echo "== $name $version: cached ($out/$name)"
        return 0
    fi
    echo "== $name $version: building $pkg"
    local start tmp
    start=$(date +%s)
    tmp=$(mktemp -d "$bin/.tmp-$name.XXXXXX")
    # one go build at a time; nice so the machine stays usable on 2 cores
    (cd "$here/go/$moddir" && nice -n 10 go build -trimpath -o "$tmp/$name" "$@" "$pkg")
    chmod 755 "$tmp"
    rm -rf "$out"
    mv "$tmp" "$out"
    echo "== $name $version: built in $(( $(date +%s) - start ))s"
}

mkdir -p "$bin"

# Version stamping the way kubernetes' hack/lib/version.sh does it, so that `kubectl version`
# and /version say v1.36.x instead of v0.0.0-master.
kube_minor=${kube_version#v1.}; kube_minor=${kube_minor%%.*}
kube_ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kube_ldflags+=" -X $p.gitVersion=$kube_version -X $p.gitMajor=1 -X $p.gitMinor=$kube_minor"
    kube_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

build kube-apiserver "$kube_version" kubernetes k8s.io/kubernetes/cmd/kube-apiserver \
    -tags providerless "-ldflags=$kube_ldflags"
build kube-controller-manager "$kube_version" kubernetes k8s.io/kubernetes/cmd/kube-controller-manager \
    -tags providerless "-ldflags=$kube_ldflags"
build kubectl "$kube_version" kubernetes k8s.io/kubernetes/cmd/kubectl \
    -tags providerless "-ldflags=$kube_ldflags"

build etcd "$etcd_version" etcd go.etcd.io/etcd/server/v3 \
    "-ldflags=-s -w"

to_out=$bin/training-operator-$to_version
build training-operator "$to_version" training-operator \
    github.com/kubeflow/training-operator/cmd/training-operator.v1 "-ldflags=-s -w"
# The CRDs and RBAC of the same release travel with the binary, so that starting it needs only
# the bin folder, not the module cache.
# So do its standalone install manifests (release/), which manifests/training-operator patches.
if [[ ! -d $to_out/manifests || ! -d $to_out/release ]]; then
    src=$(cd "$here/go/training-operator" && go list -m -f '{{.Dir}}' github.com/kubeflow/training-operator)
    rm -rf "$to_out/manifests" "$to_out/release"
    mkdir -p "$to_out/manifests" "$to_out/release/overlays"
    cp -r "$src/manifests/base/crds" "$src/manifests/base/rbac" "$src/manifests/base/webhook" "$to_out/manifests/"
    cp -r "$src/manifests/base" "$to_out/release/"
    cp -r "$src/manifests/overlays/standalone" "$to_out/release/overlays/"
    chmod -R u+w "$to_out/manifests" "$to_out/release"
fi

echo "== all built in $(( $(date +%s) - total_start ))s; binaries under $bin"
