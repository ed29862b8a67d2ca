/* Provision a VM through devvm's C API with live progress, then deprovision it.
 *
 *   cc provision.c $(pkg-config --cflags --libs devvm) -o provision
 *   ./provision devvm.toml alice
 */
#include <devvm.h>
#include <stdio.h>

static void on_event(const devvm_event *e, void *user_data) {
    (void)user_data;
    printf("%-10s %-14s %s\n", e->step ? e->step : "", e->kind, e->message ? e->message : "");
    fflush(stdout);
}

static int die(const char *what, devvm_status s) {
    fprintf(stderr, "%s failed (%d): %s\n", what, (int)s, devvm_last_error_message());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CONFIG USER\n", argv[0]);
        return 2;
    }
    devvm_provisioner *p = NULL;
    devvm_status s = devvm_provisioner_new(argv[1], NULL, &p);
    if (s != DEVVM_OK) return die("devvm_provisioner_new", s);

    devvm_request req = { .user = argv[2] };
    devvm_vm *vm = NULL;
    s = devvm_provision(p, &req, on_event, NULL, &vm);
    if (s != DEVVM_OK) {
        devvm_provisioner_free(p);
        return die("devvm_provision", s);
    }
    printf("%s is up: %s (%s) on %s, disk %s\n", devvm_vm_name(vm), devvm_vm_fqdn(vm),
           devvm_vm_ip(vm), devvm_vm_host(vm), devvm_vm_disk(vm));

    s = devvm_deprovision(p, devvm_vm_name(vm), on_event, NULL);
    int rc = s == DEVVM_OK ? 0 : die("devvm_deprovision", s);
    if (rc == 0) printf("%s removed\n", devvm_vm_name(vm));
    devvm_vm_free(vm);
    devvm_provisioner_free(p);
    return rc;
}
