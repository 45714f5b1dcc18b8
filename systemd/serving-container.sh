#!/usr/bin/env bash
# Worked example: a serving container reads weights from a kitfs mount on the host.
#
#   systemd/serving-container.sh REF IMAGE [COMMAND...]
#   systemd/serving-container.sh 127.0.0.1:5000/team/llama:v3 my-server:latest sha256sum /models/llama/models/weights.safetensors
#
# What it needs and why:
# - allow_other: the container's processes run as a user other than the mounting one (here
#   uid 1000), and FUSE lets only the mounting user in without it.
# - a shared parent: /mnt/models is bind-mounted onto itself and made rshared, and the container
#   binds it with bind-propagation=rslave. Then a kit mounted (or remounted after a restart of
#   the kitfs unit) under /mnt/models after the container started still shows up inside it.
#   Docker refuses rslave on a source that is not a shared or slave mount, which is why the
#   parent is made shared (systemd hosts usually have / shared already; this makes sure).
# - readonly in the container too.
set -euo pipefail
REF=$1; IMAGE=$2; shift 2
NAME=$(basename "${REF%%[:@]*}")
mkdir -p /mnt/models
mountpoint -q /mnt/models || mount --bind /mnt/models /mnt/models
mount --make-rshared /mnt/models
mkdir -p "/mnt/models/$NAME"
kitfs mount "$REF" "/mnt/models/$NAME" --allow-other
docker run --rm --network none --user 1000:1000 \
  --mount type=bind,source=/mnt/models,target=/models,readonly,bind-propagation=rslave \
  "$IMAGE" "$@"
