# devvm lab guest: a reader for the small YAML subset of NoCloud seed files.
#
# Prints one line per scalar: PATH<TAB>VALUE, where PATH joins mapping keys
# with "/", a list of scalars adds "[]" to its key and the N-th (from 0)
# mapping in a list adds "[N]".  A block scalar (key: | or key: |-) prints one
# line per line of the block, all with the same PATH.  Flow lists of scalars
# ([a, b]) are read too.  Anything else (anchors, flow mappings, multi-line
# plain scalars, folded scalars) is not supported.
#   ethernets:            ->  ethernets/eth0/addresses[]  10.99.0.10/24
#     eth0:                   ethernets/eth0/routes[0]/to default
#       addresses: [10.99.0.10/24]
#       routes:
#         - to: default
#           via: 10.99.0.1
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function unq(s) {
    s = trim(s)
    if (s ~ /^".*"$/) { s = substr(s, 2, length(s) - 2); gsub(/\\"/, "\"", s); gsub(/\\\\/, "\\", s) }
    else if (s ~ /^'.*'$/) { s = substr(s, 2, length(s) - 2); gsub(/''/, "'", s) }
    else { sub(/[ \t]+#.*$/, "", s) }
    return s
}
function curpath(   i, p) {
    p = ""
    for (i = 1; i <= n; i++) p = (p == "" ? "" : p "/") fkey[i]
    gsub(/\/\[/, "[", p)
    return p
}
function join(p, k) { if (k ~ /^\[/) return p k; return (p == "" ? k : p "/" k) }
function emit(k, v) { print join(curpath(), k) "\t" v }
function push(k, ind, isitem) { n++; fkey[n] = k; find[n] = ind; fitem[n] = isitem; fcnt[n] = 0 }
function flow(k, v,   a, i, m, x) {
    v = trim(v); v = substr(v, 2, length(v) - 2)
    m = split(v, a, ",")
    for (i = 1; i <= m; i++) { x = unq(a[i]); if (x != "") emit(k "[]", x) }
}
# handle "key: value" / "key:" / "key: |" found at indentation ind
function keyval(s, ind,   k, v, c) {
    c = index(s, ":")
    k = unq(substr(s, 1, c - 1)); v = trim(substr(s, c + 1))
    if (v == "") { push(k, ind, 0); return }
    if (v ~ /^[|][-+]?$/) { blk = 1; blkpath = join(curpath(), k); blkparent = ind; blkind = -1; return }
    if (v ~ /^\[.*\]$/) { flow(k, v); return }
    emit(k, unq(v))
}
BEGIN { n = 0; blk = 0 }
{
    line = $0; sub(/\r$/, "", line)
    if (blk) {
        if (line ~ /^[ \t]*$/) { if (blkind >= 0) print blkpath "\t"; next }
        match(line, /^ */); ind = RLENGTH
        if (ind > blkparent) {
            if (blkind < 0) blkind = ind
            print blkpath "\t" substr(line, blkind + 1)
            next
        }
        blk = 0
    }
    if (line ~ /^[ \t]*(#.*)?$/) next
    if (line ~ /^(---|\.\.\.)[ \t]*$/) next
    match(line, /^ */); ind = RLENGTH; s = substr(line, ind + 1)
    if (s ~ /^-( |$)/) {
        while (n > 0 && (find[n] > ind || (find[n] == ind && fitem[n]))) n--
        s = trim(substr(s, 2))
        if (s ~ /^("[^"]*"|'[^']*'|[A-Za-z0-9_.\/-]+)[ \t]*:( |$)/) {
            push("[" fcnt[n]++ "]", ind, 1)
            keyval(s, ind + 2)
        } else {
            emit("[]", unq(s))
        }
        next
    }
    while (n > 0 && find[n] >= ind) n--
    if (index(s, ":") > 0) keyval(s, ind)
}
