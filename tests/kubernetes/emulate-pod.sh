#!/bin/sh
# Emulates, without a cluster, what the kubelet and a container runtime do for
# deploy/kubernetes/app-deployment.yaml and velo-cleaner-daemonset.yaml, with mount namespaces:
#
#   node      a mount namespace of its own (nothing leaks into the caller's), where the kubelet's
#             directory is a shared mount, as the kubelet makes it;
#   app       started first, in its own namespace; the pod's `deps` volume bound at
#             /app/node_modules and made a slave (mountPropagation: HostToContainer);
#   init      in its own namespace; the volume bound with shared propagation (Bidirectional),
#             the node's store as the hostPath; runs deploy/velo-k8s-init, as the manifest does;
#   cleaner   deploy/velo-k8s-cleaner --once, as the DaemonSet runs it, in the node's view.
#
# It checks that the app sees the pulled tree byte for byte, that a restarted init container
# is fine, that the cleaner leaves a live pod's mount alone, and that once the pod is gone the
# cleaner leaves nothing mounted. Environment: T (a scratch dir), SRC (the tree that was pushed,
# to compare with), DEPLOY (the deploy/ dir), POD_UID, VELO_SOURCE, VELO_REF, VELO_STORE,
# VELO_PLAIN_HTTP, and velo on PATH. Prints "POD EMULATION OK" at the end.
set -eu

if [ -z "${IN_NODE:-}" ]; then
    IN_NODE=1 exec unshare --mount --propagation private "$0" "$@"
fi

fail() {
    echo "FAIL: $*"
    exit 1
}

wait_for() { # wait_for FILE: poll with a deadline (~20 s)
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        [ "$i" -lt 2000 ] || fail "timed out waiting for $1"
        sleep 0.01
    done
}

velo_mounts() { # velo mounts under $T in a mountinfo file: "mountpoint source" (the machine
    # may have velo mounts of its own elsewhere)
    awk -v t="$T/" '{ for (i = 7; $i != "-"; i++); if ($(i + 2) ~ /^velo:/ && index($5, t) == 1) print $5, $(i + 2) }' "$1"
}

KUBELET=$T/kubelet
VOL=$KUBELET/pods/$POD_UID/volumes/kubernetes.io~empty-dir/deps
POD_CGROUP=$T/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod$(printf %s "$POD_UID" | tr - _).slice
APP_VIEW=$T/app-root/app/node_modules
INIT_VIEW=$T/init-root/velo/node_modules

mkdir -p "$KUBELET" "$VOL" "$POD_CGROUP" "$APP_VIEW" "$INIT_VIEW"
mount --bind "$KUBELET" "$KUBELET"
mount --make-rshared "$KUBELET"

# The app container starts first (it waits for nothing: HostToContainer must deliver the mount
# made after it started).
mkfifo "$T/app.stop"
unshare --mount --propagation unchanged sh -ec '
    mount --bind "$1" "$2"
    mount --make-rslave "$2"
    : > "$3"
    exec cat "$4" > /dev/null
' app "$VOL" "$APP_VIEW" "$T/app.ready" "$T/app.stop" &
APP=$!
# Whatever happens, the app container ends with the script (it holds the caller's pipes).
trap 'kill "$APP" 2>/dev/null || true' EXIT
wait_for "$T/app.ready"

run_init() {
    unshare --mount --propagation unchanged sh -ec '
        mount --bind "$1" "$2"
        mount --make-shared "$2"
        VELO_TARGET="$2" exec "$3/velo-k8s-init"
    ' init "$VOL" "$INIT_VIEW" "$DEPLOY"
}
run_init > "$T/init.log" 2>&1 || { cat "$T/init.log"; fail "the init container failed"; }
cat "$T/init.log"

# The init container is gone; its mount stays on the node, in the pod's volume.
velo_mounts /proc/self/mountinfo | grep -q "^$VOL velo:" || fail "no velo mount at $VOL on the node"
# The app container sees the tree, byte for byte, read-only.
nsenter -t "$APP" -m -- diff -r --no-dereference "$SRC" "$APP_VIEW" || fail "the app sees a different tree"
if nsenter -t "$APP" -m -- sh -c ": > '$APP_VIEW/new-file'" 2>/dev/null; then
    fail "the app could write into the mount"
fi
echo "app sees $(nsenter -t "$APP" -m -- find "$APP_VIEW" | wc -l) entries"

# A restarted init container (pod restart) finds its mount and is fine.
run_init > "$T/init2.log" 2>&1 || { cat "$T/init2.log"; fail "the restarted init container failed"; }
grep -q "already shows" "$T/init2.log" || { cat "$T/init2.log"; fail "restart did not find the mount"; }
if [ "$(velo_mounts /proc/self/mountinfo | grep -c "^$VOL ")" != 1 ]; then
    velo_mounts /proc/self/mountinfo
    fail "a restart stacked a second mount"
fi

# The cleaner leaves a live pod alone.
KUBELET_DIR=$KUBELET CGROUP_ROOT=$T/cgroup "$DEPLOY/velo-k8s-cleaner" --once > "$T/clean1.log" 2>&1 \
    || { cat "$T/clean1.log"; fail "the cleaner failed"; }
velo_mounts /proc/self/mountinfo | grep -q "^$VOL velo:" || fail "the cleaner unmounted a live pod's tree"

# The pod goes away: its containers end, then the kubelet removes its cgroup.
echo stop > "$T/app.stop"
wait "$APP" || true
rmdir "$POD_CGROUP"
KUBELET_DIR=$KUBELET CGROUP_ROOT=$T/cgroup "$DEPLOY/velo-k8s-cleaner" --once > "$T/clean2.log" 2>&1 \
    || { cat "$T/clean2.log"; fail "the cleaner failed"; }
cat "$T/clean2.log"
grep -q "pod $POD_UID is gone" "$T/clean2.log" || fail "the cleaner did not notice the pod is gone"
if [ -n "$(velo_mounts /proc/self/mountinfo)" ]; then
    velo_mounts /proc/self/mountinfo
    fail "velo mounts are left on the node"
fi
# Nothing of the pod's volume is mounted any more: the kubelet can remove it.
if awk -v v="$VOL" 'index($5, v) == 1' /proc/self/mountinfo | grep -q .; then
    fail "something is still mounted in the pod's volume"
fi
rm -rf "$KUBELET/pods/$POD_UID" || fail "the pod's volume cannot be removed"
echo "POD EMULATION OK"
