#!/usr/bin/env bash
# Builds the binaries of the local control plane from Go modules (see cluster/README.md):
#   kube-apiserver, kube-controller-manager, kubectl   (k8s.io/kubernetes, cluster/go/kubernetes)
#   etcd                                               (go.etcd.io/etcd/server/v3, cluster/go/etcd)
#   training-operator                                  (github.com/kubeflow/training-operator,
#                                                       cluster/go/training-operator)
#   jobset                                             (sigs.k8s.io/jobset, cluster/go/jobset)
#   trainer                                            (github.com/kubeflow/trainer/v2,
#                                                       cluster/go/trainer)
#   kueue                                              (sigs.k8s.io/kueue, cluster/go/kueue)
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
own_gocache=${GOCACHE:-yes}  # a GOCACHE from the environment is the user's: never emptied here
export GOCACHE=${GOCACHE:-$cache/go/build}
# -modcacherw: the module cache can be deleted with rm -rf. -mod=readonly: go.mod/go.sum are
# never rewritten by a build; a missing go.sum line is an error, not a silent download.
export GOFLAGS="-buildvcs=false -modcacherw -mod=readonly"
export CGO_ENABLED=0
# Every module says `go 1.26.0`; the local go (1.26.8 on the polyglot machines) is enough, and
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
jobset_version=$(modversion jobset sigs.k8s.io/jobset)
trainer_version=$(modversion trainer github.com/kubeflow/trainer/v2)
kueue_version=$(modversion kueue sigs.k8s.io/kueue)
# Tests validate rendered TrainJobs against the CRD of the previous minor release too; only its
# CRD is fetched (go mod download), nothing of it is built.
trainer_prev_version=v2.2.0

if [[ ${1:-} == --print-bindir ]]; then
    for c in kube-apiserver kube-controller-manager kubectl; do echo "$c=$bin/$c-$kube_version"; done
    echo "etcd=$bin/etcd-$etcd_version"
    echo "training-operator=$bin/training-operator-$to_version"
    echo "jobset=$bin/jobset-$jobset_version"
    echo "trainer=$bin/trainer-$trainer_version"
    echo "kueue=$bin/kueue-$kueue_version"
    echo "trainer-crds-${trainer_prev_version%.*}=$bin/trainer-crds-$trainer_prev_version"
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
    [[ $moddir == "$last_moddir" ]] || trim_cache
    last_moddir=$moddir
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

# trim_cache: empty the build cache once a module's binaries are built (build calls it when the
# module changes; once more at the end). Each module pins its own k8s.io and controller-runtime
# versions, so one module's compiled packages are of little use to the next, and all of them kept
# (5.7 GB, beside 2 GB of module sources) ran a CI machine's disk full in the last build.
trim_cache() {
    if [[ $own_gocache == yes && -d $GOCACHE ]]; then go clean -cache; fi
}
last_moddir=

# copy_manifests OUT MODULE_DIR MODULE CRDS DIR...: the release's CRDs (folder CRDS of the module)
# into OUT/manifests/crds and each DIR into OUT/manifests/, so that starting a controller needs
# only the bin folder, not the module cache. Written whole or not at all (a .tmp folder renamed).
copy_manifests() {
    local out=$1 moddir=$2 module=$3 crds=$4
    shift 4
    [[ -d $out/manifests ]] && return 0
    local src
    src=$(cd "$here/go/$moddir" && go list -m -f '{{.Dir}}' "$module")
    rm -rf "$out/manifests.tmp"
    mkdir -p "$out/manifests.tmp"
    cp -r "$src/$crds" "$out/manifests.tmp/crds"
    for dir in "$@"; do cp -r "$src/$dir" "$out/manifests.tmp/"; done
    chmod -R u+w "$out/manifests.tmp"
    mv "$out/manifests.tmp" "$out/manifests"
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

jobset_out=$bin/jobset-$jobset_version
build jobset "$jobset_version" jobset sigs.k8s.io/jobset "-ldflags=-s -w"
# Its CRD, RBAC and webhook configurations (kustomize bases of the release), as above.
copy_manifests "$jobset_out" jobset sigs.k8s.io/jobset config/components/crd/bases \
    config/components/rbac config/components/webhook config/components/manager

trainer_out=$bin/trainer-$trainer_version
build trainer "$trainer_version" trainer \
    github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager "-ldflags=-s -w"
# v2.3.0 still ships plain CRDs under manifests/base/crds (the Helm chart's templates/crd is
# generated from them); its RBAC, webhooks, manager config and the default runtimes, as above.
copy_manifests "$trainer_out" trainer github.com/kubeflow/trainer/v2 manifests/base/crds \
    manifests/base/rbac manifests/base/webhook manifests/base/manager manifests/base/runtimes

kueue_out=$bin/kueue-$kueue_version
# GitVersion stamped as its Makefile does, so that its "Initializing" log line names the release
build kueue "$kueue_version" kueue sigs.k8s.io/kueue/cmd/kueue \
    "-ldflags=-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue_version"
# Its CRDs, RBAC and webhook configurations (config/components of the release), as above.
copy_manifests "$kueue_out" kueue sigs.k8s.io/kueue config/components/crd/bases \
    config/components/rbac config/components/webhook config/components/manager

# The previous release's TrainJob CRD only. go mod download checks it against the checksum
# database (GONOSUMDB etc. apply as usual); -mod=readonly does not concern it.
prev_out=$bin/trainer-crds-$trainer_prev_version
if [[ ! -f $prev_out/trainer.kubeflow.org_trainjobs.yaml ]]; then
    src=$(cd "$here/go/trainer" && GOFLAGS=-modcacherw go mod download -json \
        "github.com/kubeflow/trainer/v2@$trainer_prev_version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
    rm -rf "$prev_out.tmp"
    mkdir -p "$prev_out.tmp"
    cp "$src/manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml" "$prev_out.tmp/"
    chmod -R u+w "$prev_out.tmp"
    rm -rf "$prev_out"
    mv "$prev_out.tmp" "$prev_out"
fi

trim_cache
echo "== all built in $(( $(date +%s) - total_start ))s; binaries under $bin"
