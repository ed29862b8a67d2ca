#!/usr/bin/env bash
# devvm lab smoke test. Run it with `scripts/lab smoke`, which runs this file
# inside the lab's network namespace with the DEVVM_LAB_* environment.
#
# Boots a guest from a qcow2 overlay of the template through libvirt (IP and
# authorized key on the kernel command line, hostname and SSH host key from a
# vfat cidata seed), logs in with SSH, runs the chef-client stand-in; adds and
# removes DNS records with nsupdate+TSIG; finds LDAP users; downloads the
# template from Glance and checks its checksums. Prints one line per check and
# "N passed, N failed"; removes everything it created.
set -uo pipefail

: "${DEVVM_LAB:?run this through scripts/lab smoke}"
URI=$DEVVM_LAB_LIBVIRT_URI
POOL=$DEVVM_LAB_POOL
TPL=$DEVVM_LAB_TEMPLATE_DIR
NAME=devvm-lab-smoke-$$
IP=10.99.0.250
DNS_IP=10.99.0.249
DNS_NAME=smoke-$$.$DEVVM_LAB_DNS_ZONE
CONSOLE=$DEVVM_LAB_CONSOLE_DIR/$NAME.log
VOL=$NAME.qcow2
SEED=$NAME-cidata.img
BOOT_DEADLINE=${DEVVM_LAB_SMOKE_BOOT_SECONDS:-120}

tmp=$(mktemp -d /tmp/devvm-lab-smoke.XXXXXX)
passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
bad() { echo "not ok - $1${2:+: $2}"; failed=$((failed + 1)); }
# check NAME CMD...: run CMD, its output to $tmp/out
check() {
    local name=$1; shift
    if "$@" > "$tmp/out" 2>&1; then ok "$name"; return 0; fi
    bad "$name" "$(tail -n 3 "$tmp/out" | tr '\n' ' ')"
    return 1
}
virsh_lab() { virsh -q -c "$URI" "$@"; }

cleanup() {
    virsh_lab destroy "$NAME" >/dev/null 2>&1
    virsh_lab undefine "$NAME" >/dev/null 2>&1
    virsh_lab vol-delete --pool "$POOL" "$VOL" >/dev/null 2>&1
    virsh_lab vol-delete --pool "$POOL" "$SEED" >/dev/null 2>&1
    rm -f "$DEVVM_LAB_POOL_DIR/$VOL" "$DEVVM_LAB_POOL_DIR/$SEED"
    if [ -f "$CONSOLE" ]; then
        [ "$failed" -eq 0 ] || cp "$CONSOLE" "$DEVVM_LAB_LOG_DIR/smoke-last-console.log"
        rm -f "$CONSOLE"
    fi
    rm -f "$DEVVM_LAB_LOG_DIR/libvirt/qemu/$NAME.log"*
    nsupdate -k "$DEVVM_LAB_TSIG_KEY_FILE" > /dev/null 2>&1 <<EOF
server $DEVVM_LAB_DNS_SERVER $DEVVM_LAB_DNS_PORT
zone $DEVVM_LAB_DNS_ZONE
update delete $DNS_NAME A
send
zone $DEVVM_LAB_DNS_REVERSE_ZONE
update delete ${DNS_IP##*.}.$DEVVM_LAB_DNS_REVERSE_ZONE PTR
send
EOF
    rm -rf "$tmp"
}
trap cleanup EXIT

echo "# devvm lab smoke test (domain $NAME, $IP)"

# ---------------------------------------------------------------- libvirt + guest
check "libvirt answers on $URI" virsh_lab list --all

cat > "$tmp/vol.xml" <<EOF
<volume>
  <name>$VOL</name>
  <capacity unit='bytes'>$(qemu-img info --output=json "$TPL/$DEVVM_LAB_TEMPLATE.qcow2" | jq '."virtual-size"')</capacity>
  <target><format type='qcow2'/></target>
  <backingStore><path>$TPL/$DEVVM_LAB_TEMPLATE.qcow2</path><format type='qcow2'/></backingStore>
</volume>
EOF
check "qcow2 overlay $VOL on the template in pool $POOL" virsh_lab vol-create "$POOL" "$tmp/vol.xml"

# cidata seed (vfat): hostname + instance-id + SSH host key
ssh-keygen -q -t ed25519 -N '' -C "$NAME" -f "$tmp/hostkey"
mkdir -p "$tmp/seed"
printf 'instance-id: %s\nlocal-hostname: %s\n' "iid-$NAME" "$NAME" > "$tmp/seed/meta-data"
{
    echo '#cloud-config'
    echo "hostname: $NAME.$DEVVM_LAB_DNS_ZONE"
    echo 'ssh_keys:'
    echo '  ed25519_private: |'
    sed 's/^/    /' "$tmp/hostkey"
    echo "  ed25519_public: $(cat "$tmp/hostkey.pub")"
} > "$tmp/seed/user-data"
seed_ok() {
    rm -f "$tmp/seed.img"
    mkfs.vfat -C -n CIDATA "$tmp/seed.img" 1024 >/dev/null &&
        mcopy -i "$tmp/seed.img" "$tmp/seed/meta-data" "$tmp/seed/user-data" ::/ &&
        install -m 0644 "$tmp/seed.img" "$DEVVM_LAB_POOL_DIR/$SEED"
}
check "cidata seed $SEED (vfat)" seed_ok

cmdline="$(cat "$TPL/cmdline") devvm.ip=$IP/24 devvm.gw=$DEVVM_LAB_GATEWAY devvm.dns=$DEVVM_LAB_DNS_SERVER devvm.authorized_key=$(base64 -w0 < "$DEVVM_LAB_SSH_PUBKEY")"
cat > "$tmp/domain.xml" <<EOF
<domain type='qemu'>
  <name>$NAME</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$TPL/vmlinuz</kernel>
    <initrd>$TPL/initrd.img</initrd>
    <cmdline>$cmdline</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$DEVVM_LAB_POOL_DIR/$VOL'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$DEVVM_LAB_POOL_DIR/$SEED'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='bridge'>
      <source bridge='$DEVVM_LAB_BRIDGE'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='$CONSOLE'/>
      <target port='0'/>
    </serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
booted=0
if check "define domain $NAME (type qemu, direct kernel boot)" virsh_lab define "$tmp/domain.xml" &&
    check "start domain $NAME" virsh_lab start "$NAME"; then
    booted=1
fi

banner() { timeout 3 bash -c "exec 3<>/dev/tcp/$IP/22 && head -c 4 <&3" 2>/dev/null; }
if [ "$booted" = 1 ]; then
    t0=$(date +%s)
    deadline=$((t0 + BOOT_DEADLINE))
    got=
    while [ "$(date +%s)" -lt "$deadline" ]; do
        got=$(banner) && [ "$got" = SSH- ] && break
        virsh_lab domstate "$NAME" 2>/dev/null | grep running >/dev/null || break
        sleep 0.5
    done
    if [ "$got" = SSH- ]; then
        ok "guest answers with an SSH banner on $IP:22 after $(( $(date +%s) - t0 ))s"
    else
        bad "guest answers with an SSH banner on $IP:22" "nothing within ${BOOT_DEADLINE}s; console: $CONSOLE (copied to $DEVVM_LAB_LOG_DIR/smoke-last-console.log)"
        booted=0
    fi
fi

if [ "$booted" = 1 ]; then
    echo "$IP $(cut -d' ' -f1,2 "$tmp/hostkey.pub")" > "$tmp/known_hosts"
    SSH=(ssh -i "$DEVVM_LAB_SSH_KEY" -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR
        -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$tmp/known_hosts" "root@$IP")
    check "ssh root@$IP true (host key from cidata verified)" "${SSH[@]}" true
    hn() { [ "$("${SSH[@]}" hostname)" = "$NAME" ]; }
    check "guest hostname is $NAME (from cidata)" hn
    bootstrap() {
        "${SSH[@]}" 'set -e; mkdir -p /etc/chef; umask 077
            cat > /etc/chef/client.rb <<E
chef_server_url "'"$DEVVM_LAB_CHEF_URL"'"
validation_client_name "devvm-validator"
node_name "'"$NAME"'"
validation_key "/etc/chef/validation.pem"
E
            echo "not a real key" > /etc/chef/validation.pem
            echo "{\"run_list\": [\"recipe[devvm::base]\", \"role[web]\"]}" > /etc/chef/first-boot.json
            echo "{\"run_list\": [\"recipe[fail]\"]}" > /etc/chef/fail.json'
    }
    check "knife-bootstrap-like files written over ssh" bootstrap
    chef_ok() { "${SSH[@]}" chef-client -j /etc/chef/first-boot.json | grep '^Chef Client finished'; }
    check "chef-client stand-in succeeds on a good bootstrap" chef_ok
    chef_fail() { ! "${SSH[@]}" chef-client -j /etc/chef/fail.json; }
    check "chef-client stand-in fails on recipe[fail]" chef_fail
    chef_http() { curl -s -o /dev/null -m 5 -w '%{http_code}' -H 'Accept: application/json' "$@"; }
    registered() { [ "$(chef_http "$DEVVM_LAB_CHEF_URL/nodes/$NAME")" = 200 ] && [ "$(chef_http "$DEVVM_LAB_CHEF_URL/clients/$NAME")" = 200 ]; }
    check "chef-client stand-in registered node and client $NAME on goiardi" registered
    unregister() {
        chef_http -X DELETE "$DEVVM_LAB_CHEF_URL/nodes/$NAME" >/dev/null
        chef_http -X DELETE "$DEVVM_LAB_CHEF_URL/clients/$NAME" >/dev/null
        [ "$(chef_http "$DEVVM_LAB_CHEF_URL/nodes/$NAME")" = 404 ] && [ "$(chef_http "$DEVVM_LAB_CHEF_URL/clients/$NAME")" = 404 ]
    }
    check "node and client $NAME deleted from goiardi" unregister
fi

if [ "$booted" = 1 ] || virsh_lab dominfo "$NAME" >/dev/null 2>&1; then
    teardown() {
        virsh_lab destroy "$NAME" >/dev/null 2>&1 || true
        virsh_lab undefine "$NAME" &&
            virsh_lab vol-delete --pool "$POOL" "$VOL" &&
            rm -f "$DEVVM_LAB_POOL_DIR/$SEED" &&
            ! virsh_lab dominfo "$NAME" >/dev/null 2>&1 &&
            [ ! -e "$DEVVM_LAB_POOL_DIR/$VOL" ]
    }
    check "destroy + undefine $NAME, delete its overlay" teardown
fi

# ---------------------------------------------------------------- DNS
# shellcheck disable=SC2120  # called through check with -k FILE
nsu() { nsupdate -t 5 "$@" <<EOF
server $DEVVM_LAB_DNS_SERVER $DEVVM_LAB_DNS_PORT
zone $DEVVM_LAB_DNS_ZONE
update add $DNS_NAME 60 A $DNS_IP
send
zone $DEVVM_LAB_DNS_REVERSE_ZONE
update add ${DNS_IP##*.}.$DEVVM_LAB_DNS_REVERSE_ZONE 60 PTR $DNS_NAME.
send
EOF
}
dig_a() { dig +short +time=2 +tries=1 -p "$DEVVM_LAB_DNS_PORT" "@$DEVVM_LAB_DNS_SERVER" "$DNS_NAME" A; }
dig_ptr() { dig +short +time=2 +tries=1 -p "$DEVVM_LAB_DNS_PORT" "@$DEVVM_LAB_DNS_SERVER" -x "$DNS_IP"; }
unsigned_refused() { ! nsu && [ -z "$(dig_a)" ]; }
check "unsigned RFC 2136 update is refused" unsigned_refused
check "nsupdate -k (TSIG $DEVVM_LAB_TSIG_KEY_NAME) adds A + PTR" nsu -k "$DEVVM_LAB_TSIG_KEY_FILE"
resolves() { [ "$(dig_a)" = "$DNS_IP" ] && [ "$(dig_ptr)" = "$DNS_NAME." ]; }
check "dig resolves $DNS_NAME and its PTR" resolves
del() {
    nsupdate -t 5 -k "$DEVVM_LAB_TSIG_KEY_FILE" <<EOF
server $DEVVM_LAB_DNS_SERVER $DEVVM_LAB_DNS_PORT
zone $DEVVM_LAB_DNS_ZONE
update delete $DNS_NAME A
send
zone $DEVVM_LAB_DNS_REVERSE_ZONE
update delete ${DNS_IP##*.}.$DEVVM_LAB_DNS_REVERSE_ZONE PTR
send
EOF
    [ -z "$(dig_a)" ] && [ -z "$(dig_ptr)" ]
}
check "nsupdate deletes them again" del

# ---------------------------------------------------------------- LDAP
lds() { ldapsearch -x -LLL -o ldif-wrap=no -H "$DEVVM_LAB_LDAP_URL" -D "$DEVVM_LAB_LDAP_BIND_DN" -y "$DEVVM_LAB_LDAP_PASSWORD_FILE" -b "$DEVVM_LAB_LDAP_BASE_DN" "$@"; }
first_user=${DEVVM_LAB_LDAP_USERS%% *}
user_found() { lds "(&(objectClass=posixAccount)(uid=$first_user))" mail sshPublicKey memberOf > "$tmp/u" &&
    grep "^mail: $first_user@" "$tmp/u" && grep '^sshPublicKey: ssh-ed25519 ' "$tmp/u" && grep "^memberOf: $DEVVM_LAB_LDAP_GROUP_DN" "$tmp/u"; }
check "ldapsearch finds $first_user (mail, sshPublicKey, memberOf)" user_found
members() { [ "$(lds -b "$DEVVM_LAB_LDAP_GROUP_DN" -s base member | grep -c '^member:')" = "$(echo $DEVVM_LAB_LDAP_USERS | wc -w)" ]; }
check "group $DEVVM_LAB_LDAP_GROUP_DN has the users $DEVVM_LAB_LDAP_USERS" members
outsider() { lds "(uid=$DEVVM_LAB_LDAP_OUTSIDER)" dn | grep '^dn:' && ! lds "(&(uid=$DEVVM_LAB_LDAP_OUTSIDER)(memberOf=$DEVVM_LAB_LDAP_GROUP_DN))" dn | grep '^dn:'; }
check "$DEVVM_LAB_LDAP_OUTSIDER exists and is outside the group" outsider
anon_refused() { [ -z "$(ldapsearch -x -LLL -H "$DEVVM_LAB_LDAP_URL" -b "$DEVVM_LAB_LDAP_BASE_DN" "(uid=$first_user)" dn 2>/dev/null)" ]; }
check "anonymous search sees no users" anon_refused

# ---------------------------------------------------------------- Glance
glance_dl() {
    local img id
    img=$(curl -sf "$DEVVM_LAB_GLANCE_URL/v2/images?name=$DEVVM_LAB_TEMPLATE") || return 1
    id=$(jq -r '.images[0].id' <<< "$img")
    [ -n "$id" ] && [ "$id" != null ] || { echo "no image $DEVVM_LAB_TEMPLATE"; return 1; }
    curl -sf -o "$tmp/template.qcow2" "$DEVVM_LAB_GLANCE_URL/v2/images/$id/file" || return 1
    [ "$(jq -r '.images[0].os_hash_algo' <<< "$img")" = sha512 ] || return 1
    [ "$(sha512sum < "$tmp/template.qcow2" | cut -d' ' -f1)" = "$(jq -r '.images[0].os_hash_value' <<< "$img")" ] || { echo "sha512 differs"; return 1; }
    [ "$(md5sum < "$tmp/template.qcow2" | cut -d' ' -f1)" = "$(jq -r '.images[0].checksum' <<< "$img")" ] || { echo "md5 differs"; return 1; }
    cmp -s "$tmp/template.qcow2" "$TPL/$DEVVM_LAB_TEMPLATE.qcow2" || { echo "differs from $TPL/$DEVVM_LAB_TEMPLATE.qcow2"; return 1; }
    for p in kernel_id ramdisk_id os_command_line; do
        [ "$(jq -r ".images[0].$p // empty" <<< "$img")" != "" ] || { echo "no $p"; return 1; }
    done
}
check "Glance download of $DEVVM_LAB_TEMPLATE matches os_hash_value (sha512) and checksum (md5)" glance_dl

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
