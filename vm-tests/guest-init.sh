#!/bin/sh
# /init of the vm-tests guest: runs as PID 1 (busybox sh) inside a Debian 6.12 kernel under qemu.
#
# The host harness (vm-tests/run) boots this twice with the same ext4 `-O verity` disk:
#   velo.phase=1  create the store, snapshot, and run every case that needs no raw block writes;
#                 then record which object and image the host should tamper with.
#   velo.phase=2  after the host flipped one byte in that object's and that image's data blocks
#                 (through the disk image file, the filesystem unmounted), run the tamper cases.
#
# Every case prints exactly one marker line, `VMTEST PASS <name>` or `VMTEST FAIL <name>: <why>`;
# the host counts them. Everything else the guest prints is detail for a human.
#
# All checks use the project's own static `velo` binary; fs-verity digests are checked
# independently with `fsverity` (fsverity-utils: `measure` = the kernel's FS_IOC_MEASURE_VERITY,
# `digest` = computed in userspace).

/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt
/bin/busybox mount -t devtmpfs dev /dev
# The initramfs may have no /dev/console: take the console explicitly.
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
export LD_LIBRARY_PATH=/usr/lib/vmlibs   # for fsverity (dynamically linked; velo is static)
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp

S=/mnt/store          # the velo store, on the ext4 -O verity disk
STATE=/mnt/vmtest     # what phase 1 tells the host and phase 2 (on the same disk)
ASIDE=/mnt/aside      # originals moved aside while a case replaces them (same filesystem: mv keeps verity)
T=/tmp/tree           # the tree snapshotted as ref vmtest/a (regenerated identically every boot)
TB=/tmp/treeb         # the same plus one file: ref vmtest/b (its image is the one tampered with)
M=/tmp/mnt            # mount point

uptime_s() { cut -d' ' -f1 /proc/uptime; }
T0=$(uptime_s)
PHASE=$(sed -n 's/.*velo\.phase=\([0-9]\).*/\1/p' /proc/cmdline)

finish() {
    echo "guest: tests took $(awk -v a="$T0" -v b="$(uptime_s)" 'BEGIN{printf "%.2f", b-a}') s" \
        "(kernel boot before /init: ${T0} s)"
    cd /
    umount "$M" 2>/dev/null
    sync
    umount /mnt 2>/dev/null || echo "guest: warning: could not unmount the store disk"
    sync
    echo "VMTEST DONE phase $PHASE"
    poweroff -f
}

# A failure outside any case: say why (the host reports the cases it then misses) and stop.
setup_fail() {
    echo "guest: SETUP FAILED (phase $PHASE): $*"
    dmesg | tail -n 20 | sed 's/^/  kmsg: /'
    finish
}

# ---------------------------------------------------------------------------------------------
# Helpers for cases. A case runs in a subshell; `bad REASON` ends it with a failure.

bad() {
    echo "$*" | tr '\n' ' ' > /tmp/.reason
    exit 1
}

V() { /bin/velo --store "$S" "$@"; }

# Runs one case: NAME FUNCTION. Prints its kernel messages and its one marker line.
run_case() {
    name=$1
    shift
    rm -f /tmp/.reason
    echo "--- case $name"
    dmesg -c > /dev/null
    ("$@")
    rc=$?
    dmesg -c | sed 's/^/  kmsg: /'
    if grep -q " $M " /proc/mounts; then
        V umount "$M" > /dev/null 2>&1 || umount -l "$M"
    fi
    if [ "$rc" -eq 0 ]; then
        echo "VMTEST PASS $name"
    else
        echo "VMTEST FAIL $name: $(cat /tmp/.reason 2> /dev/null || echo "case exited $rc without a reason")"
    fi
}

# Hex fs-verity digest computed in userspace (sha256, 4 KiB blocks; velo's naming rule).
digest_of() {
    fsverity digest --hash-alg=sha256 --block-size=4096 "$1" | sed -n 's/^sha256:\([0-9a-f]*\) .*/\1/p'
}

# Hex digest from the kernel (FS_IOC_MEASURE_VERITY); fails if verity is not enabled on FILE.
measure() {
    out=$(fsverity measure "$1" 2>&1) || { echo "$out"; return 1; }
    echo "$out" | sed -n 's/^sha256:\([0-9a-f]*\) .*/\1/p'
}

# Store path of the object holding FILE's bytes.
obj_path() {
    d=$(digest_of "$1")
    echo "$S/objects/$(echo "$d" | cut -c1-2)/$(echo "$d" | cut -c3-)"
}

# The image digest from a `velo snapshot --json` output file.
json_digest() { sed -n 's/.*"digest":"\([0-9a-f]\{64\}\)".*/\1/p' "$1"; }

# FILE must fail to read with EIO (open or read).
expect_eio() {
    if cat "$1" > /dev/null 2> /tmp/.err; then
        bad "reading $1 succeeded; expected EIO"
    fi
    grep -q -e "Input/output error" -e "I/O error" /tmp/.err || bad "reading $1 failed, but not with EIO: $(cat /tmp/.err)"
    echo "  $1: $(cat /tmp/.err) (as expected)"
}

# FILE must read back byte-identical to ORIG.
expect_same() {
    cmp "$1" "$2" > /tmp/.err 2>&1 || bad "$1 does not read back like $2: $(cat /tmp/.err)"
}

# Moves FILE aside and puts REPLACEMENT in its place (mode 0444, verity as the caller left it).
# swap_back undoes it. One swap at a time.
swap_in() {
    mkdir -p "$ASIDE"
    [ -e "$ASIDE/orig" ] && bad "internal: a previous swap was not undone"
    mv "$1" "$ASIDE/orig" || bad "cannot move $1 aside"
    echo "$1" > "$ASIDE/path"
    cp "$2" "$1" && chmod 0444 "$1" || bad "cannot put the replacement at $1"
}
swap_back() {
    [ -e "$ASIDE/orig" ] || return 0
    p=$(cat "$ASIDE/path")
    rm -f "$p" && mv "$ASIDE/orig" "$p" && rm -f "$ASIDE/path" ||
        echo "guest: warning: could not restore $p; later cases may fail because of it"
}

# Flips (XOR 0xff) the byte at OFFSET of FILE.
flip_byte() {
    b=$(od -An -tu1 -j "$2" -N1 "$1" | tr -d ' ')
    printf "\\$(printf %03o $((b ^ 255)))" | dd of="$1" bs=1 seek="$2" count=1 conv=notrunc 2> /dev/null
}

# Nothing may be mounted at $M after a refused mount.
expect_not_mounted() {
    if grep -q " $M " /proc/mounts; then bad "something is mounted at $M: $(grep " $M " /proc/mounts)"; fi
}

# Entry lists, types, contents, symlink targets and modes of two trees must be equal;
# with `meta`, also sizes, owners and mtimes of files and directories.
compare_trees() {
    (cd "$1" && find . | sort) > /tmp/.la
    (cd "$2" && find . | sort) > /tmp/.lb
    diff /tmp/.la /tmp/.lb > /tmp/.d || bad "entry lists of $1 and $2 differ: $(head -8 /tmp/.d)"
    while read -r p; do
        a=$1/$p
        b=$2/$p
        if [ -L "$a" ]; then
            [ -L "$b" ] || bad "$p: a symlink in the tree but not in the mount"
            [ "$(readlink "$a")" = "$(readlink "$b")" ] ||
                bad "$p: symlink target $(readlink "$b"), expected $(readlink "$a")"
            continue
        elif [ -d "$a" ]; then
            [ -d "$b" ] && [ ! -L "$b" ] || bad "$p: a directory in the tree but not in the mount"
        else
            [ -f "$b" ] && [ ! -L "$b" ] || bad "$p: a regular file in the tree but not in the mount"
            cmp "$a" "$b" > /tmp/.err 2>&1 || bad "$p: contents differ: $(cat /tmp/.err)"
        fi
        fmt='%a'
        [ "$3" = meta ] && fmt='mode %a owner %u:%g size %s mtime %Y'
        [ -d "$a" ] && [ "$3" = meta ] && fmt='mode %a owner %u:%g mtime %Y'
        sa=$(stat -c "$fmt" "$a")
        sb=$(stat -c "$fmt" "$b")
        [ "$sa" = "$sb" ] || bad "$p: metadata differs: mount has '$sb', tree has '$sa'"
    done < /tmp/.la
    echo "  $(wc -l < /tmp/.la) entries identical ($1 vs $2${3:+, with metadata})"
}

# The test tree: files > 64 bytes (objects) incl. a 1 MiB one (two-level Merkle tree), files
# <= 64 bytes (inline in the image), an empty file, an executable, a duplicate (dedup), a
# hardlink, relative/absolute/dangling symlinks, nested and empty dirs. Deterministic.
make_tree() {
    rm -rf "$1"
    mkdir -p "$1/sub/dir" "$1/empty-dir"
    cd "$1" || return 1
    seq 1 3000 > big1.bin                                     # 13893 B, 4 blocks (block 1 is tampered)
    seq 10000 12000 > big2.txt                                # replaced by an unverified copy
    yes "velo rift verity test line" | head -c 9000 > big3.txt  # replaced by other content
    seq 1 200000 | head -c 1048576 > sub/large.bin
    seq 500 600 > sub/dir/nested.txt
    cp sub/dir/nested.txt sub/dup.txt
    ln sub/dir/nested.txt sub/hard.txt
    echo "a small file, inline in the image" > small.txt
    : > empty.txt
    printf '#!/bin/sh\necho hello\n' > run.sh
    chmod 0755 run.sh
    chmod 0600 big3.txt
    ln -s big2.txt link
    ln -s ../big1.bin sub/uplink
    ln -s /nonexistent/target dangling
    find . -exec touch -h -d "2024-01-02 03:04:05" {} +
    cd /
}

# ---------------------------------------------------------------------------------------------
# Phase 1 cases.

# Issue case 1: snapshot into a store on an fs-verity filesystem; every object and image has
# fs-verity enabled and the kernel's digest equals its name.
case_snapshot_verity() {
    V snapshot "$T" --ref vmtest/a --json > /tmp/snap-a.json 2> /tmp/.err ||
        bad "velo snapshot failed: $(cat /tmp/.err)"
    echo "  $(cat /tmp/snap-a.json)"
    grep -q '"verity": *"enabled"' "$S/meta.json" ||
        bad "meta.json does not say the store has fs-verity: $(cat "$S/meta.json")"
    n=0
    for f in $(find "$S/objects" "$S/images" -type f); do
        case $f in
            "$S"/objects/*) name=$(basename "$(dirname "$f")")$(basename "$f") ;;
            *) name=$(basename "$f") ;;
        esac
        got=$(measure "$f") || bad "FS_IOC_MEASURE_VERITY failed on $f: $got"
        [ "$got" = "$name" ] || bad "$f: kernel fs-verity digest is $got"
        n=$((n + 1))
    done
    for f in $(find "$T" -type f -size +64c); do
        o=$(obj_path "$f")
        [ -f "$o" ] || bad "$f (> 64 bytes) has no object $o"
        echo "$o"
    done > /tmp/.objs.all
    sort -u /tmp/.objs.all > /tmp/.objs
    img=$S/images/$(json_digest /tmp/snap-a.json)
    [ -f "$img" ] || bad "the image named in the snapshot output is not at $img"
    # One object per distinct content > 64 bytes, plus the image; nothing else.
    want=$(($(wc -l < /tmp/.objs) + 1))
    [ "$n" -eq "$want" ] || bad "$n files in objects/ and images/; expected $want"
    echo "  $n store files ($((want - 1)) objects + 1 image): fs-verity enabled on each, kernel digest = name"
}

# Issue case 2: the mount is byte-identical and uses verity=require.
case_mount_verity_require() {
    V mount vmtest/a "$M" --json > /tmp/mount.json 2> /tmp/.err || bad "velo mount failed: $(cat /tmp/.err)"
    echo "  $(cat /tmp/mount.json)"
    grep -q '"verity": *"require"' /tmp/mount.json || bad "velo mount --json does not say verity require"
    opts=$(awk -v m="$M" '$2 == m { print $4 }' /proc/mounts)
    echo "  /proc/mounts options: $opts"
    case ",$opts," in
        *,verity=require,*) ;;
        *) bad "the mount options lack verity=require: $opts" ;;
    esac
    compare_trees "$T" "$M" meta
    V umount "$M" > /tmp/.err 2>&1 || bad "velo umount failed: $(cat /tmp/.err)"
    expect_not_mounted
}

# A tenant's size limit, on a store whose filesystem has project quotas: enforced.
case_tenant_size_limit() {
    V tenant create limited --image vmtest/a --size-limit 1M --json > /tmp/q.json 2> /tmp/.err ||
        bad "velo tenant create failed: $(cat /tmp/.err)"
    echo "  $(cat /tmp/q.json)"
    grep -q '"limit_enforcement":"project quota' /tmp/q.json || bad "the limit is not enforced: $(cat /tmp/q.json)"
    V tenant mount limited "$M" > /dev/null 2> /tmp/.err || bad "velo tenant mount failed: $(cat /tmp/.err)"
    dd if=/dev/zero of="$M/small" bs=1k count=256 2> /dev/null || bad "a write under the limit failed"
    if dd if=/dev/zero of="$M/fill" bs=1M count=3 2> /tmp/dd.err; then
        bad "wrote 3 MiB into a tenant limited to 1 MiB"
    fi
    echo "  over the limit: $(tail -n 1 /tmp/dd.err)"
    grep -qi "quota" /tmp/dd.err || bad "the write failed, but not with a quota error: $(cat /tmp/dd.err)"
    V tenant umount limited > /tmp/.err 2>&1 || bad "velo tenant umount failed: $(cat /tmp/.err)"
    expect_not_mounted
}

have_fsck() {
    V fsck --help > /dev/null 2> /tmp/.err ||
        bad "this velo has no working fsck subcommand: $(grep -m1 . /tmp/.err)"
}

# Issue case 6, baseline: fsck of an undamaged store exits 0.
case_fsck_clean() {
    have_fsck
    V fsck > /tmp/fsck.out 2>&1
    rc=$?
    sed 's/^/  fsck| /' /tmp/fsck.out
    echo "  velo fsck exit status: $rc"
    [ "$rc" -eq 0 ] || bad "velo fsck exited $rc on an undamaged store: $(head -3 /tmp/fsck.out)"
}

# Issue case 4a: an object replaced by the same bytes without fs-verity -> EIO on open.
case_object_replaced_unverified() {
    obj=$(obj_path "$T/big2.txt")
    [ -f "$obj" ] || bad "no object for big2.txt at $obj"
    cp "$obj" /tmp/repl
    swap_in "$obj" /tmp/repl
    if measure "$obj" > /dev/null 2>&1; then bad "the replacement unexpectedly has fs-verity"; fi
    V mount vmtest/a "$M" > /dev/null 2> /tmp/.err || bad "velo mount failed: $(cat /tmp/.err)"
    expect_eio "$M/big2.txt"
    expect_same "$M/big1.bin" "$T/big1.bin"
    expect_same "$M/sub/large.bin" "$T/sub/large.bin"
    echo "  other files still read correctly"
}

# Issue case 4b: an object replaced by other content, with fs-verity -> EIO on open.
# Left in place for the fsck case that follows; restored after it.
case_object_replaced_other() {
    obj=$(obj_path "$T/big3.txt")
    [ -f "$obj" ] || bad "no object for big3.txt at $obj"
    yes "tampered line" | head -c 9000 > /tmp/repl
    swap_in "$obj" /tmp/repl
    fsverity enable --hash-alg=sha256 --block-size=4096 "$obj" 2> /tmp/.err ||
        bad "fsverity enable on the replacement failed: $(cat /tmp/.err)"
    measure "$obj" > /tmp/repl.digest || bad "cannot measure the replacement"
    echo "  $obj now holds other content, kernel digest $(cat /tmp/repl.digest)"
    V mount vmtest/a "$M" > /dev/null 2> /tmp/.err || bad "velo mount failed: $(cat /tmp/.err)"
    expect_eio "$M/big3.txt"
    expect_same "$M/big1.bin" "$T/big1.bin"
    expect_same "$M/sub/dir/nested.txt" "$T/sub/dir/nested.txt"
    echo "  other files still read correctly"
}

# Issue case 6: fsck names the replaced object with its expected and found digests.
case_fsck_replaced_object() {
    have_fsck
    [ -e "$ASIDE/orig" ] || bad "the previous case left no replaced object"
    obj=$(cat "$ASIDE/path")
    rel=${obj#"$S"/}
    expected=$(basename "$(dirname "$obj")")$(basename "$obj")
    found=$(cat /tmp/repl.digest)
    V fsck > /tmp/fsck.out 2>&1
    rc=$?
    sed 's/^/  fsck| /' /tmp/fsck.out
    echo "  velo fsck exit status: $rc"
    [ "$rc" -ne 0 ] || bad "velo fsck exited 0 with a replaced object"
    grep "$rel" /tmp/fsck.out | grep "$expected" | grep -q "$found" ||
        bad "no fsck line names $rel with expected $expected and found $found"
}

# Issue case 4c: an image whose metacopy digest for one file was altered -> that file EIOs.
# The altered image is stored under its own (new) digest, so velo's own image check passes
# and only the kernel's overlay verity check stands between the reader and the wrong data.
case_metacopy_altered() {
    a=$(json_digest /tmp/snap-a.json)
    img=$S/images/$a
    [ -f "$img" ] || bad "image $img missing"
    d=$(digest_of "$T/big1.bin")
    # Byte offset of big1's digest in the image (it appears in its trusted.overlay.metacopy).
    off=$(od -An -v -tx1 "$img" | tr -d ' \n' | awk -v d="$d" '{
            s = $0; base = 0
            while ((i = index(s, d)) > 0) {
                if ((base + i) % 2 == 1) { print (base + i - 1) / 2; exit }
                base += i; s = substr(s, i + 1)
            }
        }')
    [ -n "$off" ] || bad "big1's digest $d is not in image $a"
    cp "$img" /tmp/alt.img
    chmod 0644 /tmp/alt.img
    flip_byte /tmp/alt.img $((off + 31))
    alt=$(digest_of /tmp/alt.img)
    echo "  image $a: flipped the last byte of big1's metacopy digest at offset $((off + 31)) -> image $alt"
    cp /tmp/alt.img "$S/images/$alt" && chmod 0444 "$S/images/$alt" || bad "cannot store the altered image"
    echo "$S/images/$alt" > /tmp/alt.path
    fsverity enable --hash-alg=sha256 --block-size=4096 "$S/images/$alt" 2> /tmp/.err ||
        bad "fsverity enable on the altered image failed: $(cat /tmp/.err)"
    V mount "$alt" "$M" > /dev/null 2> /tmp/.err ||
        bad "velo mount of the altered image (digest = its name) failed: $(cat /tmp/.err)"
    expect_eio "$M/big1.bin"
    expect_same "$M/big2.txt" "$T/big2.txt"
    expect_same "$M/sub/large.bin" "$T/sub/large.bin"
    echo "  other files still read correctly"
}

# Issue case 5: an image replaced under its name -> velo mount refuses it before mounting.
case_image_replaced() {
    b=$(json_digest /tmp/snap-b.json)
    a=$(json_digest /tmp/snap-a.json)
    img=$S/images/$b
    [ -n "$b" ] && [ -f "$img" ] || bad "image B ($b) missing: the second snapshot failed"
    # (a) another valid image (A's bytes) with fs-verity: the kernel measures A, not B.
    cp "$S/images/$a" /tmp/repl
    swap_in "$img" /tmp/repl
    fsverity enable --hash-alg=sha256 --block-size=4096 "$img" 2> /tmp/.err ||
        bad "fsverity enable on the replacement failed: $(cat /tmp/.err)"
    if V mount vmtest/b "$M" > /dev/null 2> /tmp/.err; then
        bad "velo mount accepted images/$b holding image $a's bytes"
    fi
    echo "  (a) replaced by another image: $(cat /tmp/.err)"
    grep -q "$a" /tmp/.err || bad "the refusal does not name the digest found ($a): $(cat /tmp/.err)"
    expect_not_mounted
    swap_back
    # (b) B's own bytes, but without fs-verity.
    cp "$img" /tmp/repl
    swap_in "$img" /tmp/repl
    if V mount vmtest/b "$M" > /dev/null 2> /tmp/.err; then
        bad "velo mount accepted images/$b without fs-verity in a verity store"
    fi
    echo "  (b) replaced by a copy without fs-verity: $(cat /tmp/.err)"
    expect_not_mounted
}

# ---------------------------------------------------------------------------------------------
# Phase 2 cases (the host flipped one byte in a data block of $TAMPER_OBJECT and $TAMPER_IMAGE).

# Issue case 3: a data block of an object flipped on disk -> reading it through the mount EIOs.
case_object_block_tampered() {
    obj=/mnt$TAMPER_OBJECT
    name=$(basename "$(dirname "$obj")")$(basename "$obj")
    [ "$(measure "$obj")" = "$name" ] ||
        bad "precondition: $obj should still measure as its name (only a data block changed)"
    [ "$(digest_of "$T/big1.bin")" = "$name" ] || bad "precondition: $obj is not big1.bin's object"
    V mount vmtest/a "$M" > /dev/null 2> /tmp/.err || bad "velo mount failed: $(cat /tmp/.err)"
    expect_eio "$M/big1.bin"
    expect_eio "$M/sub/uplink"
    for f in big2.txt big3.txt small.txt sub/large.bin sub/dir/nested.txt sub/hard.txt run.sh link; do
        expect_same "$M/$f" "$T/$f"
    done
    echo "  other files still read correctly"
    # The store file itself fails the same way: the kernel, not velo, refuses the bytes.
    expect_eio "$obj"
}

# Issue case 5: a data block of an image flipped on disk -> velo mount fails, nothing mounted.
case_image_block_tampered() {
    if V mount vmtest/b "$M" > /tmp/mount.out 2> /tmp/.err; then
        cat /tmp/mount.out
        bad "velo mount accepted image ${TAMPER_IMAGE##*/} although a byte of its block 0 was altered on disk"
    fi
    echo "  refused: $(cat /tmp/.err)"
    # The refusal must come from verification (a digest mismatch or fs-verity's EIO), not from
    # something unrelated.
    grep -q -e "Input/output error" -e "digest" /tmp/.err ||
        bad "velo mount failed, but not because of verification: $(cat /tmp/.err)"
    expect_not_mounted
}

# Issue case 6: fsck names the tampered object (its path and expected digest).
case_fsck_block_tampered() {
    have_fsck
    obj=/mnt$TAMPER_OBJECT
    rel=${obj#"$S"/}
    expected=$(basename "$(dirname "$obj")")$(basename "$obj")
    V fsck > /tmp/fsck.out 2>&1
    rc=$?
    sed 's/^/  fsck| /' /tmp/fsck.out
    echo "  velo fsck exit status: $rc"
    [ "$rc" -ne 0 ] || bad "velo fsck exited 0 with a tampered object"
    grep "$rel" /tmp/fsck.out | grep -q "$expected" ||
        bad "no fsck line names $rel with its expected digest $expected"
}

# ---------------------------------------------------------------------------------------------

echo "guest: phase $PHASE, kernel $(uname -r), /init started at ${T0} s"
[ -n "$PHASE" ] || setup_fail "no velo.phase= on the kernel command line"
for m in $(cat /modules/load-order); do
    insmod "/modules/$m.ko" || setup_fail "insmod $m failed"
done
# Kernel messages go to the console only through `dmesg -c` in run_case (keeps markers on their
# own lines).
echo 1 > /proc/sys/kernel/printk
mount -t ext4 -o prjquota /dev/vda /mnt || setup_fail "cannot mount the ext4 disk /dev/vda (with project quotas)"
make_tree "$T" || setup_fail "cannot create the test tree"

case $PHASE in
1)
    run_case snapshot-verity case_snapshot_verity
    rm -rf "$TB" && cp -a "$T" "$TB" && seq 7000 9000 > "$TB/only-in-b.txt" &&
        V snapshot "$TB" --ref vmtest/b --json > /tmp/snap-b.json 2> /tmp/.err ||
        echo "guest: snapshot of the second tree failed: $(cat /tmp/.err)"
    run_case mount-verity-require case_mount_verity_require
    run_case fsck-clean case_fsck_clean
    run_case object-replaced-unverified case_object_replaced_unverified
    swap_back
    run_case object-replaced-other-content case_object_replaced_other
    run_case fsck-replaced-object case_fsck_replaced_object
    swap_back
    run_case image-metacopy-digest-altered case_metacopy_altered
    [ -f /tmp/alt.path ] && rm -f "$(cat /tmp/alt.path)"
    run_case image-replaced-refused case_image_replaced
    swap_back
    run_case tenant-size-limit case_tenant_size_limit
    # Tell the host what to tamper with: big1.bin's object and image B (not used by phase 1's
    # other checks), as paths inside the disk's filesystem.
    mkdir -p "$STATE"
    o=$(obj_path "$T/big1.bin")
    b=$(json_digest /tmp/snap-b.json)
    if [ -f "$o" ] && [ -n "$b" ] && [ -f "$S/images/$b" ]; then
        printf 'TAMPER_OBJECT=%s\nTAMPER_IMAGE=%s\n' "${o#/mnt}" "/store/images/$b" > "$STATE/state"
        sed 's/^/guest: recorded /' "$STATE/state"
    else
        echo "guest: cannot record tamper targets (object $o, image '$b')"
    fi
    ;;
2)
    [ -f "$STATE/state" ] || setup_fail "phase 1 left no $STATE/state"
    TAMPER_OBJECT=$(sed -n 's/^TAMPER_OBJECT=//p' "$STATE/state")
    TAMPER_IMAGE=$(sed -n 's/^TAMPER_IMAGE=//p' "$STATE/state")
    run_case object-block-tampered case_object_block_tampered
    run_case image-block-tampered-refused case_image_block_tampered
    run_case fsck-block-tampered-object case_fsck_block_tampered
    ;;
*)
    setup_fail "unknown phase '$PHASE'"
    ;;
esac
finish
