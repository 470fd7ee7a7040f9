#!/usr/bin/env bash
# `make images`: build the Dockerfile's two targets as $REGISTRY/codistill/{operator,trainer}:$TAG
# with the first of docker, podman or buildah found; PUSH=1 also pushes them.
#   REGISTRY      required, e.g. localhost:5000 or ghcr.io/you; no default: nobody publishes
#                 codistill's images, and a public namespace we do not own could serve anyone's
#   TAG           default: the chart's appVersion, the tag the chart uses by default
#   PYTHON_IMAGE  the base image, e.g. python:3.11.13-slim-bookworm@sha256:<digest> for a release
#                 build pinned by digest (default: the Dockerfile's tag)
set -euo pipefail
cd "${BASH_SOURCE[0]%/*}/.."

registry=${REGISTRY:-}
registry=${registry%/}
if [[ -z $registry ]]; then
  echo "images: set REGISTRY= to where the images go," \
    "e.g. REGISTRY=localhost:5000 or REGISTRY=ghcr.io/you" >&2
  exit 2
fi
case ${PUSH:-} in
  "" | 0 | 1) ;;
  *) echo "images: PUSH: expected 1 (push) or empty, got '${PUSH}'" >&2; exit 2 ;;
esac

tag=${TAG:-}
if [[ -z $tag ]]; then
  while IFS= read -r line; do
    if [[ $line =~ ^appVersion:\ *\"?([^\"[:space:]]+) ]]; then tag=${BASH_REMATCH[1]}; fi
  done < charts/codistill/Chart.yaml
fi
if [[ -z $tag ]]; then
  echo "images: TAG: empty, and charts/codistill/Chart.yaml has no appVersion" >&2
  exit 2
fi

tool=""
for candidate in docker podman buildah; do
  if command -v "$candidate" > /dev/null; then tool=$candidate; break; fi
done
if [[ -z $tool ]]; then
  echo "images: no container tool found: install docker, podman or buildah" >&2
  exit 127
fi

# `build` and `push` mean the same in all three tools (buildah's `build` is its `bud`).
build=("$tool" build)
if [[ -n ${PYTHON_IMAGE:-} ]]; then build+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"); fi
images=("$registry/codistill/operator:$tag" "$registry/codistill/trainer:$tag")
"${build[@]}" --target operator -t "${images[0]}" .
"${build[@]}" --target trainer -t "${images[1]}" .
# Pushed only once both are built: a failed build publishes neither.
for image in "${images[@]}"; do
  if [[ ${PUSH:-} == 1 ]]; then "$tool" push "$image"; fi
  echo "images: $image"
done
