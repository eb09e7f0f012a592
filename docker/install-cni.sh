#!/usr/bin/env bash
# Install the weave-ipam CNI shim and a default network config on the host.
#
# Run by the DaemonSet's init container with the host's /opt/cni/bin and /etc/cni/net.d
# mounted under $HOST_ROOT. Idempotent: the shim is always replaced (atomically, so a runtime
# executing it meanwhile sees the old or the new binary, never a partial one); the conflist is
# written only when the host has none of that name, so an operator's edits are kept. To take
# a newer default conflist, delete the host's copy and restart the pod.
set -euo pipefail
export LC_ALL=C  # name order as the runtime sorts: bytes

HOST_ROOT="${HOST_ROOT:-/host}"
SRC_DIR="${WEAVE_IPAM_SRC_DIR:-/opt/weave-ipam}"
SHIM_SRC="$SRC_DIR/weave-ipam"
CONFLIST_SRC="$SRC_DIR/10-weave-ipam.conflist"
CNI_BIN_DIR="$HOST_ROOT/opt/cni/bin"
CNI_NET_DIR="$HOST_ROOT/etc/cni/net.d"
SHIM_DST="$CNI_BIN_DIR/weave-ipam"
CONFLIST_DST="$CNI_NET_DIR/10-weave-ipam.conflist"

log() { printf 'install-cni: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ -f "$SHIM_SRC" ] || die "no shim at $SHIM_SRC"
[ -f "$CONFLIST_SRC" ] || die "no conflist at $CONFLIST_SRC"
mkdir -p "$CNI_BIN_DIR" "$CNI_NET_DIR"

tmp=""
cleanup() { if [ -n "$tmp" ]; then rm -f "$tmp"; fi; }
trap cleanup EXIT

# Temporary files live in the target directory (so mv is a rename on one file system) under
# a name no runtime loads: a leading dot and no .conf/.conflist/.json extension.
tmp="$(mktemp "$CNI_BIN_DIR/.weave-ipam-tmp-XXXXXX")"
cp "$SHIM_SRC" "$tmp"
chmod 0755 "$tmp"
mv -f "$tmp" "$SHIM_DST"
tmp=""
log "installed $SHIM_DST"

if [ -e "$CONFLIST_DST" ]; then
    log "kept the existing $CONFLIST_DST"
else
    tmp="$(mktemp "$CNI_NET_DIR/.weave-ipam-tmp-XXXXXX")"
    cp "$CONFLIST_SRC" "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$CONFLIST_DST"
    tmp=""
    log "wrote $CONFLIST_DST"
fi

# The runtime uses the first config file in name order: say so if another one wins.
for f in "$CNI_NET_DIR"/*.conf "$CNI_NET_DIR"/*.conflist "$CNI_NET_DIR"/*.json; do
    [ -e "$f" ] || continue
    if [ "$f" != "$CONFLIST_DST" ] && [[ "$(basename "$f")" < "$(basename "$CONFLIST_DST")" ]]; then
        log "warning: $(basename "$f") sorts before $(basename "$CONFLIST_DST");" \
            "the runtime will use it instead"
    fi
done

# The conflist chains the reference plugins; they come with the node's CNI plugins package.
for plugin in ptp portmap; do
    [ -x "$CNI_BIN_DIR/$plugin" ] || log "warning: $CNI_BIN_DIR/$plugin is missing;" \
        "install the CNI reference plugins on this node"
done
