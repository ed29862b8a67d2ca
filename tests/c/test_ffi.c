/* Tests of devvm's C API: errors (NULL arguments, bad UTF-8, bad config, unknown and
 * unauthorized users, bad names), a C-written IpAllocator inside the real pipeline (the
 * other steps use devvm's in-memory reference backends), progress callbacks, listing,
 * and frees. Built and run by scripts/test-c under AddressSanitizer and valgrind.
 * Prints "N passed, N failed". */
#define _GNU_SOURCE
#include <devvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>

static int passed, failed;
#define CHECK(cond, ...) do { \
    if (cond) { passed++; } else { failed++; \
        fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        fprintf(stderr, __VA_ARGS__); fprintf(stderr, " (last error: %s)\n", \
            devvm_last_error_message() ? devvm_last_error_message() : "none"); } \
} while (0)

/* ---- a C IpAllocator: a tiny table of leases in 10.77.0.10 .. 10.77.0.10+CAP-1 ---- */
#define CAP 3
struct pool {
    pthread_mutex_t mu;
    char vm[CAP][64];
    char owner[CAP][160]; /* the request id that holds each lease */
    int calls_allocate, calls_release;
};

static int find(struct pool *p, const char *vm) {
    for (int i = 0; i < CAP; i++) if (strcmp(p->vm[i], vm) == 0) return i;
    return -1;
}

static int32_t c_allocate(void *ud, const char *vm, const char *owner, char *ip, size_t ip_len,
                          uint8_t *prefix, char *err, size_t err_len) {
    struct pool *p = ud;
    pthread_mutex_lock(&p->mu);
    p->calls_allocate++;
    int i = find(p, vm);
    if (i >= 0 && strcmp(p->owner[i], owner) != 0) {
        snprintf(err, err_len, "%s is held by %s", vm, p->owner[i]);
        pthread_mutex_unlock(&p->mu);
        return DEVVM_ERR_ALREADY_EXISTS;
    }
    if (i < 0) i = find(p, "");
    if (i < 0) {
        snprintf(err, err_len, "the C pool is full");
        pthread_mutex_unlock(&p->mu);
        return DEVVM_ERR_EXHAUSTED;
    }
    snprintf(p->vm[i], sizeof p->vm[i], "%s", vm);
    snprintf(p->owner[i], sizeof p->owner[i], "%s", owner);
    snprintf(ip, ip_len, "10.77.0.%d", 10 + i);
    *prefix = 24;
    pthread_mutex_unlock(&p->mu);
    return DEVVM_OK;
}

static int32_t c_release(void *ud, const char *vm, const char *owner, char *err, size_t err_len) {
    struct pool *p = ud;
    pthread_mutex_lock(&p->mu);
    p->calls_release++;
    int32_t rc = DEVVM_OK;
    int i = find(p, vm);
    if (i >= 0 && strcmp(p->owner[i], owner) != 0) {
        snprintf(err, err_len, "%s", p->owner[i]); /* someone else's: left alone */
        rc = DEVVM_LEFT_ALONE;
    } else if (i >= 0) {
        p->vm[i][0] = p->owner[i][0] = '\0';
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

static int32_t c_lease(void *ud, const char *vm, char *ip, size_t ip_len, uint8_t *prefix,
                       bool *found, char *err, size_t err_len) {
    (void)err; (void)err_len;
    struct pool *p = ud;
    pthread_mutex_lock(&p->mu);
    int i = find(p, vm);
    *found = i >= 0;
    if (i >= 0) { snprintf(ip, ip_len, "10.77.0.%d", 10 + i); *prefix = 24; }
    pthread_mutex_unlock(&p->mu);
    return DEVVM_OK;
}

static int held(struct pool *p) {
    int n = 0;
    for (int i = 0; i < CAP; i++) n += p->vm[i][0] != '\0';
    return n;
}

/* ---- a C DnsUpdater: a table of fqdn -> ip records (A and PTR together) ---- */
#define RECS 8
struct zone {
    pthread_mutex_t mu;
    char fqdn[RECS][128];
    char ip[RECS][64];
};

static int32_t c_publish(void *ud, const char *fqdn, const char *ip, char *err, size_t err_len) {
    struct zone *z = ud;
    pthread_mutex_lock(&z->mu);
    int32_t rc = DEVVM_OK;
    int free_slot = -1;
    for (int i = 0; i < RECS; i++) {
        if (z->fqdn[i][0] == '\0') { if (free_slot < 0) free_slot = i; continue; }
        int same_name = strcmp(z->fqdn[i], fqdn) == 0, same_ip = strcmp(z->ip[i], ip) == 0;
        if (same_name && same_ip) { free_slot = -2; break; }
        if (same_name || same_ip) {
            snprintf(err, err_len, "%s is taken in the C zone", same_name ? fqdn : ip);
            rc = DEVVM_ERR_CONFLICT;
            break;
        }
    }
    if (rc == DEVVM_OK && free_slot >= 0) {
        snprintf(z->fqdn[free_slot], sizeof z->fqdn[0], "%s", fqdn);
        snprintf(z->ip[free_slot], sizeof z->ip[0], "%s", ip);
    }
    pthread_mutex_unlock(&z->mu);
    return rc;
}

static int32_t c_remove(void *ud, const char *fqdn, const char *ip, char *err, size_t err_len) {
    struct zone *z = ud;
    pthread_mutex_lock(&z->mu);
    int32_t rc = DEVVM_OK;
    for (int i = 0; i < RECS; i++) {
        if (strcmp(z->fqdn[i], fqdn) != 0) continue;
        if (strcmp(z->ip[i], ip) == 0) {
            z->fqdn[i][0] = z->ip[i][0] = '\0';
        } else {
            snprintf(err, err_len, "whoever published %s -> %s", fqdn, z->ip[i]);
            rc = DEVVM_LEFT_ALONE;
        }
    }
    pthread_mutex_unlock(&z->mu);
    return rc;
}

static int32_t c_resolve(void *ud, const char *fqdn, char *ip, size_t ip_len, char *err, size_t err_len) {
    (void)err; (void)err_len;
    struct zone *z = ud;
    pthread_mutex_lock(&z->mu);
    ip[0] = '\0';
    for (int i = 0; i < RECS; i++) if (strcmp(z->fqdn[i], fqdn) == 0) snprintf(ip, ip_len, "%s", z->ip[i]);
    pthread_mutex_unlock(&z->mu);
    return DEVVM_OK;
}

static int32_t c_reverse(void *ud, const char *ip, char *fqdn, size_t fqdn_len, char *err, size_t err_len) {
    (void)err; (void)err_len;
    struct zone *z = ud;
    pthread_mutex_lock(&z->mu);
    fqdn[0] = '\0';
    for (int i = 0; i < RECS; i++) if (z->ip[i][0] && strcmp(z->ip[i], ip) == 0) snprintf(fqdn, fqdn_len, "%s", z->fqdn[i]);
    pthread_mutex_unlock(&z->mu);
    return DEVVM_OK;
}

static int records(struct zone *z) {
    int n = 0;
    for (int i = 0; i < RECS; i++) n += z->fqdn[i][0] != '\0';
    return n;
}

/* ---- progress callback ---- */
struct seen { int events, finished, failed_runs, left_alone; char last_kind[32]; char disk[512]; };
static void on_event(const devvm_event *e, void *ud) {
    struct seen *s = ud;
    s->events++;
    snprintf(s->last_kind, sizeof s->last_kind, "%s", e->kind);
    if (strcmp(e->kind, "step_finished") == 0) s->finished++;
    if (strcmp(e->kind, "run_failed") == 0) s->failed_runs++;
    if (strcmp(e->kind, "left_alone") == 0) s->left_alone++;
    if (strcmp(e->kind, "step_finished") == 0 && e->step && strcmp(e->step, "disk") == 0)
        snprintf(s->disk, sizeof s->disk, "%s", e->json);
}

/* `text` with its one occurrence of `from` replaced by `to` (a new string), or NULL when
 * `from` does not occur exactly once. */
static char *replace_once(const char *text, const char *from, const char *to) {
    const char *at = strstr(text, from);
    if (!at || strstr(at + 1, from)) return NULL;
    char *out = NULL;
    if (asprintf(&out, "%.*s%s%s", (int)(at - text), text, to, at + strlen(from)) < 0) abort();
    return out;
}

/* The config of every devvm test suite (devvm-core/src/testkit/reference.toml, given as
 * the first argument), with [ip] and [dns] left to this program's C backends and
 * non-default [defaults] sizes for the partial-size test. NULL if it cannot be made. */
static char *reference_config(const char *path) {
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) return NULL;
    char *text = NULL;
    size_t cap = 0;
    ssize_t n = getdelim(&text, &cap, '\0', f);
    fclose(f);
    if (n <= 0) { free(text); return NULL; }
    const char *swaps[][2] = {
        {"[ip]\nbackend = \"memory\"", "[ip]\nbackend = \"custom\""},
        {"[dns]\nbackend = \"memory\"", "[dns]\nbackend = \"custom\""},
        {"[defaults]\n", "[defaults]\nvcpus = 1\nmemory_mib = 512\ndisk_gib = 7\n"},
    };
    for (size_t i = 0; text && i < sizeof swaps / sizeof swaps[0]; i++) {
        char *next = replace_once(text, swaps[i][0], swaps[i][1]);
        if (!next) fprintf(stderr, "reference config: no single %s\n", swaps[i][0]);
        free(text);
        text = next;
    }
    return text;
}

static char *write_file(const char *dir, const char *name, const char *text) {
    char *path;
    if (asprintf(&path, "%s/%s", dir, name) < 0) abort();
    FILE *f = fopen(path, "w");
    if (!f) abort();
    fputs(text, f);
    fclose(f);
    return path;
}

int main(int argc, char **argv) {
    char tmpl[] = "/tmp/devvm-c-test.XXXXXX";
    char *dir = mkdtemp(tmpl);
    if (!dir) { perror("mkdtemp"); return 2; }
    char *config_text = reference_config(argc > 1 ? argv[1] : NULL);
    if (!config_text) {
        fprintf(stderr, "usage: %s devvm-core/src/testkit/reference.toml\n", argv[0]);
        return 2;
    }
    char *config = write_file(dir, "devvm.toml", config_text);
    char *bad_config = write_file(dir, "bad.toml", "state_dir = \"s\"\ncolour = \"blue\"\n");

    /* NULL arguments: refused with a status and a message, never a crash. */
    devvm_provisioner *p = NULL;
    CHECK(devvm_provisioner_new(NULL, NULL, &p) == DEVVM_ERR_NULL_ARGUMENT && p == NULL, "NULL path");
    CHECK(strstr(devvm_last_error_message(), "config_path") != NULL, "message names the argument");
    CHECK(devvm_provisioner_new(config, NULL, NULL) == DEVVM_ERR_NULL_ARGUMENT, "NULL out");
    devvm_vm *vm = NULL;
    devvm_request req = { .user = "alice" };
    CHECK(devvm_provision(NULL, &req, NULL, NULL, &vm) == DEVVM_ERR_NULL_ARGUMENT, "NULL provisioner");
    CHECK(devvm_deprovision(NULL, "x", NULL, NULL) == DEVVM_ERR_NULL_ARGUMENT, "NULL provisioner");
    CHECK(devvm_list(NULL, NULL) == DEVVM_ERR_NULL_ARGUMENT, "NULL out");
    CHECK(devvm_recover(NULL, NULL) == DEVVM_ERR_NULL_ARGUMENT, "NULL provisioner");
    CHECK(devvm_vm_name(NULL) == NULL && devvm_vm_list_len(NULL) == 0 && devvm_vm_list_get(NULL, 0) == NULL, "NULL getters");
    devvm_provisioner_free(NULL);
    devvm_vm_free(NULL);
    devvm_vm_list_free(NULL);

    /* Bad config: an unknown key is named; a missing file is not found. */
    CHECK(devvm_provisioner_new(bad_config, NULL, &p) == DEVVM_ERR_INVALID_INPUT, "unknown key");
    CHECK(strstr(devvm_last_error_message(), "colour") != NULL, "the key is named: %s", devvm_last_error_message());
    CHECK(devvm_provisioner_new("/nonexistent/devvm.toml", NULL, &p) == DEVVM_ERR_NOT_FOUND, "missing config");
    /* The config leaves [ip] to the program: without a C allocator it cannot build. */
    CHECK(devvm_provisioner_new(config, NULL, &p) == DEVVM_ERR_INVALID_INPUT, "ip backend missing");

    /* A C-written IpAllocator. */
    struct pool pool = { .mu = PTHREAD_MUTEX_INITIALIZER };
    devvm_ip_allocator ip = { .user_data = &pool, .allocate = c_allocate, .release = c_release, .lease = c_lease };
    devvm_ip_allocator broken = ip;
    broken.lease = NULL;
    struct zone zone = { .mu = PTHREAD_MUTEX_INITIALIZER };
    devvm_dns_updater dns = { .user_data = &zone, .zone = "c.example", .publish = c_publish,
                              .remove = c_remove, .resolve = c_resolve, .reverse = c_reverse };
    devvm_backends with_broken = { .ip = &broken, .dns = &dns };
    CHECK(devvm_provisioner_new(config, &with_broken, &p) == DEVVM_ERR_NULL_ARGUMENT, "NULL function in table");
    devvm_backends backends = { .ip = &ip, .dns = &dns };
    CHECK(devvm_provisioner_new(config, &backends, &p) == DEVVM_OK && p != NULL, "provisioner");
    if (!p) { fprintf(stderr, "cannot continue\n"); return 1; }

    /* Bad requests change nothing. */
    devvm_request unknown = { .user = "nobody" };
    CHECK(devvm_provision(p, &unknown, NULL, NULL, &vm) == DEVVM_ERR_NOT_FOUND && vm == NULL, "unknown user");
    devvm_request outsider = { .user = "mallory" };
    CHECK(devvm_provision(p, &outsider, NULL, NULL, &vm) == DEVVM_ERR_UNAUTHORIZED, "not an owner");
    devvm_request bad_name = { .user = "alice", .name = "no_underscores" };
    CHECK(devvm_provision(p, &bad_name, NULL, NULL, &vm) == DEVVM_ERR_INVALID_INPUT, "bad vm name");
    devvm_request bad_user = { .user = "(uid=*)" };
    CHECK(devvm_provision(p, &bad_user, NULL, NULL, &vm) == DEVVM_ERR_INVALID_INPUT, "filter metacharacters");
    const char bad_utf8[] = { (char)0xff, (char)0xfe, 0 };
    devvm_request utf8 = { .user = bad_utf8 };
    CHECK(devvm_provision(p, &utf8, NULL, NULL, &vm) == DEVVM_ERR_INVALID_UTF8, "bad utf-8");
    CHECK(held(&pool) == 0, "nothing leased after bad requests");

    /* A real run through the pipeline, with progress. */
    struct seen seen = {0};
    devvm_request ok = { .user = "alice", .name = "c-vm-1", .vcpus = 1, .memory_mib = 512, .disk_gib = 2 };
    CHECK(devvm_provision(p, &ok, on_event, &seen, &vm) == DEVVM_OK && vm != NULL, "provision");
    if (vm) {
        CHECK(strcmp(devvm_vm_name(vm), "c-vm-1") == 0, "name %s", devvm_vm_name(vm));
        CHECK(strcmp(devvm_vm_ip(vm), "10.77.0.10") == 0, "the C allocator's address: %s", devvm_vm_ip(vm));
        CHECK(strcmp(devvm_vm_fqdn(vm), "c-vm-1.c.example") == 0, "the C zone's fqdn: %s", devvm_vm_fqdn(vm));
        CHECK(strcmp(devvm_vm_owner(vm), "alice") == 0, "owner");
        CHECK(strcmp(devvm_vm_template(vm), "debian-12") == 0, "template");
        CHECK(devvm_vm_created(vm) > 1700000000, "created");
    }
    CHECK(seen.finished == 8, "8 steps finished, saw %d", seen.finished);
    CHECK(strcmp(seen.last_kind, "run_finished") == 0, "ends with run_finished, saw %s", seen.last_kind);
    CHECK(held(&pool) == 1, "one lease held");
    CHECK(records(&zone) == 1, "one record in the C zone");

    /* A partial size: what is left at 0 comes from the config's [defaults] (disk 7 GiB),
     * not from built-in values. */
    struct seen seen_p = {0};
    devvm_vm *vp = NULL;
    devvm_request partial = { .user = "alice", .name = "c-vm-p", .vcpus = 2 };
    CHECK(devvm_provision(p, &partial, on_event, &seen_p, &vp) == DEVVM_OK, "partial size");
    CHECK(strstr(seen_p.disk, "\"size_gib\":7") != NULL, "the config's disk size: %s", seen_p.disk);
    CHECK(devvm_deprovision(p, "c-vm-p", NULL, NULL) == DEVVM_OK, "deprovision partial");
    devvm_vm_free(vp);

    /* Same name again: refused, and the failed run is rolled back. */
    devvm_vm *dup = NULL;
    devvm_request again = { .user = "alice", .name = "c-vm-1" };
    CHECK(devvm_provision(p, &again, NULL, NULL, &dup) == DEVVM_ERR_ALREADY_EXISTS && dup == NULL, "name in use");

    /* Fill the C pool: the error the C code returns comes back, and the run rolls back. */
    devvm_vm *v2 = NULL, *v3 = NULL, *v4 = NULL;
    devvm_request r2 = { .user = "alice", .name = "c-vm-2" }, r3 = { .user = "alice", .name = "c-vm-3" },
                  r4 = { .user = "alice", .name = "c-vm-4" };
    CHECK(devvm_provision(p, &r2, NULL, NULL, &v2) == DEVVM_OK, "second");
    CHECK(devvm_provision(p, &r3, NULL, NULL, &v3) == DEVVM_OK, "third");
    struct seen seen4 = {0};
    CHECK(devvm_provision(p, &r4, on_event, &seen4, &v4) == DEVVM_ERR_EXHAUSTED && v4 == NULL, "C pool full");
    CHECK(strstr(devvm_last_error_message(), "the C pool is full") != NULL, "C message: %s", devvm_last_error_message());
    CHECK(seen4.failed_runs == 1, "run_failed delivered");

    /* Free one address, then ask for a name the C zone already holds for another
     * address: the C conflict comes back and the run's lease is released again. */
    CHECK(devvm_deprovision(p, "c-vm-3", NULL, NULL) == DEVVM_OK, "deprovision 3");
    snprintf(zone.fqdn[RECS - 1], sizeof zone.fqdn[0], "c-vm-5.c.example");
    snprintf(zone.ip[RECS - 1], sizeof zone.ip[0], "192.0.2.99");
    devvm_vm *v5 = NULL;
    devvm_request r5 = { .user = "alice", .name = "c-vm-5" };
    struct seen seen5 = {0};
    CHECK(devvm_provision(p, &r5, on_event, &seen5, &v5) == DEVVM_ERR_CONFLICT && v5 == NULL, "C dns conflict");
    CHECK(strstr(devvm_last_error_message(), "taken in the C zone") != NULL, "C message: %s", devvm_last_error_message());
    CHECK(held(&pool) == 2, "the conflicting run's lease was released, %d held", held(&pool));
    CHECK(strcmp(zone.ip[RECS - 1], "192.0.2.99") == 0, "the foreign record is untouched");
    CHECK(seen5.left_alone == 1, "the foreign record is reported left alone (%d)", seen5.left_alone);
    zone.fqdn[RECS - 1][0] = zone.ip[RECS - 1][0] = '\0';

    /* A lease of that name that another tool holds: refused, and the rollback leaves it. */
    int slot = find(&pool, "");
    snprintf(pool.vm[slot], sizeof pool.vm[0], "c-vm-6");
    snprintf(pool.owner[slot], sizeof pool.owner[0], "another-tool");
    devvm_vm *v6 = NULL;
    devvm_request r6 = { .user = "alice", .name = "c-vm-6" };
    struct seen seen6 = {0};
    CHECK(devvm_provision(p, &r6, on_event, &seen6, &v6) == DEVVM_ERR_ALREADY_EXISTS && v6 == NULL, "foreign C lease");
    CHECK(strcmp(pool.vm[slot], "c-vm-6") == 0 && strcmp(pool.owner[slot], "another-tool") == 0,
          "the foreign lease survives the rollback");
    CHECK(seen6.left_alone == 1, "the foreign lease is reported left alone (%d)", seen6.left_alone);
    CHECK(records(&zone) == 2, "no record was published for it, %d", records(&zone));
    pool.vm[slot][0] = pool.owner[slot][0] = '\0';

    devvm_vm_list *list = NULL;
    CHECK(devvm_list(p, &list) == DEVVM_OK && devvm_vm_list_len(list) == 2, "two vms listed");
    CHECK(devvm_vm_list_get(list, 2) == NULL, "out of range is NULL");
    devvm_vm_list_free(list);

    /* A live migration moves c-vm-1 to the other host; its address stays. */
    const char *other = (vm && strcmp(devvm_vm_host(vm), "host-a") == 0) ? "host-b" : "host-a";
    devvm_vm *moved = NULL;
    struct seen seen_m = {0};
    CHECK(devvm_migrate(p, "c-vm-1", other, on_event, &seen_m, &moved) == DEVVM_OK && moved != NULL, "migrate");
    if (moved) {
        CHECK(strcmp(devvm_vm_host(moved), other) == 0, "moved to %s", devvm_vm_host(moved));
        CHECK(strcmp(devvm_vm_ip(moved), "10.77.0.10") == 0, "the same address: %s", devvm_vm_ip(moved));
    }
    CHECK(seen_m.events > 0 && strcmp(seen_m.last_kind, "run_finished") == 0, "migration events end with %s", seen_m.last_kind);
    devvm_vm_free(moved);
    /* The fleet view and the planned moves come back as JSON text. */
    char *json = NULL;
    CHECK(devvm_hosts(p, &json) == DEVVM_OK && json != NULL, "hosts");
    if (json) CHECK(strstr(json, "\"c-vm-1\"") != NULL && strstr(json, other) != NULL, "hosts names the vm and its host: %s", json);
    devvm_string_free(json);
    json = NULL;
    CHECK(devvm_drain(p, other, true, &json) == DEVVM_OK && json != NULL, "drain, dry run");
    if (json) CHECK(strstr(json, "\"vm\":\"c-vm-1\"") != NULL, "the plan moves c-vm-1: %s", json);
    devvm_string_free(json);
    json = NULL;
    CHECK(devvm_rebalance(p, true, &json) == DEVVM_OK && json != NULL, "rebalance, dry run");
    devvm_string_free(json);
    CHECK(devvm_drain(p, "no-such-host", true, &json) == DEVVM_ERR_NOT_FOUND && json == NULL, "unknown host");
    CHECK(devvm_hosts(p, NULL) == DEVVM_ERR_NULL_ARGUMENT, "NULL out");
    devvm_string_free(NULL);
    devvm_vm *none = (devvm_vm *)&seen_m;
    CHECK(devvm_migrate(p, "no-such-vm", other, NULL, NULL, &none) == DEVVM_ERR_NOT_FOUND && none == NULL, "unknown vm");
    CHECK(devvm_migrate(p, NULL, other, NULL, NULL, &none) == DEVVM_ERR_NULL_ARGUMENT, "NULL name");

    /* Deprovision releases the C lease. */
    struct seen seen_d = {0};
    CHECK(devvm_deprovision(p, "c-vm-1", on_event, &seen_d) == DEVVM_OK, "deprovision");
    CHECK(seen_d.events > 0, "deprovision events");
    CHECK(devvm_deprovision(p, "c-vm-2", NULL, NULL) == DEVVM_OK, "deprovision 2");
    CHECK(devvm_deprovision(p, "c-vm-1", NULL, NULL) == DEVVM_ERR_NOT_FOUND, "already gone");
    CHECK(held(&pool) == 0, "every C lease released, %d held", held(&pool));
    CHECK(records(&zone) == 0, "every C record removed, %d left", records(&zone));
    uint32_t cleaned = 99;
    CHECK(devvm_recover(p, &cleaned) == DEVVM_OK && cleaned == 0, "nothing to recover");

    devvm_vm_free(vm);
    devvm_vm_free(v2);
    devvm_vm_free(v3);
    devvm_provisioner_free(p);

    /* The C backends go through the backend registry: a section may name them. */
    char *named_text = NULL;
    if (asprintf(&named_text, "%s", config_text) < 0) abort();
    char *at = strstr(named_text, "[dns]\nbackend = \"custom\"");
    CHECK(at != NULL, "the config has a custom dns section");
    char *named_cfg = NULL;
    if (at) {
        *at = '\0';
        char *text = NULL;
        if (asprintf(&text, "%s[dns]\nbackend = \"in-house-dns\"%s", named_text,
                     at + strlen("[dns]\nbackend = \"custom\"")) < 0) abort();
        named_cfg = write_file(dir, "named.toml", text);
        free(text);
    }
    devvm_provisioner *pn = NULL;
    CHECK(devvm_provisioner_new(named_cfg, NULL, &pn) == DEVVM_ERR_INVALID_INPUT && pn == NULL,
          "without the C backend the name is unknown");
    CHECK(strstr(devvm_last_error_message(), "in-house-dns") != NULL, "named: %s", devvm_last_error_message());
    CHECK(devvm_provisioner_new(named_cfg, &backends, &pn) == DEVVM_OK && pn != NULL, "named C backend");
    if (pn) {
        devvm_vm *vn = NULL;
        devvm_request rn = { .user = "alice", .name = "c-vm-n" };
        CHECK(devvm_provision(pn, &rn, NULL, NULL, &vn) == DEVVM_OK && vn != NULL, "provision with the named backend");
        if (vn) CHECK(strcmp(devvm_vm_fqdn(vn), "c-vm-n.c.example") == 0, "the C zone: %s", devvm_vm_fqdn(vn));
        CHECK(devvm_deprovision(pn, "c-vm-n", NULL, NULL) == DEVVM_OK, "deprovision named");
        devvm_vm_free(vn);
        devvm_provisioner_free(pn);
    }
    free(named_text);
    free(named_cfg);
    free(config);
    free(config_text);
    free(bad_config);
    char *cmd;
    if (asprintf(&cmd, "rm -rf '%s'", dir) >= 0) { if (system(cmd) != 0) failed++; free(cmd); }

    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
