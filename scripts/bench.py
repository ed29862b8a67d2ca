#!/usr/bin/env python3
"""devvm benchmarks in the lab, contenders alternated round by round in one run.

Run by scripts/bench inside the lab's namespace (it sets up what is missing). Prints
medians and ratios, writes target/bench/results.json and one PNG plot per comparison.

  e2e       end to end against the seed's sequence as a script (scripts/bench-seed:
            ldapsearch, a fixed address, nsupdate A+PTR, cp of the template or a qemu-img
            overlay, virt-install --import, wait for SSH, what knife bootstrap does over
            ssh), the three alternated round by round; devvm's rounds also give the
            pipeline numbers below
  throughput  1, 2, 4 and 8 provisions at once (CLI processes, the fleet's hosts): VMs
            ready per minute, p50/p95 time to ready, collisions (none allowed)
  disk      the disk from a template: devvm's way (a qcow2 overlay on the cached
            template, `qemu-img create -b`) against a full copy (`cp`), for templates of
            1, 8 and 40 GiB virtual size with a quarter of it allocated
  faces     the same provision from Rust, Python and C: each face's example program
            (examples/provision.rs, examples/provision.py, examples/c/provision.c, all built
            in release mode), from starting it to its provision call returning
  peer      devvm (CLI, the cloud-init bootstrapper) against kcli (scripts/bench-kcli) to a
            VM answering SSH, same template, host and bridge
  guests    the lab's busybox guest and its real Debian 12 guest (systemd, cloud-init,
            OpenSSH), same size, under TCG: time to SSH (devvm CLI, cloud-init bootstrapper)
  pipeline  devvm end to end (the CLI, Chef bootstrap) on the lab template: per-step
            latencies (p50/p95) and the pipeline's overhead, i.e. everything that is not
            the guest's own boot (libvirt asked to start it -> SSH answers) or the bootstrap command
            (chef-client's run), as a fraction of end to end

Ratios are what count: absolute seconds on a loaded 2-core machine are noisy.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "bench")
GIB = 1 << 30


def p(q, xs):
    """The q-quantile (0..1) of xs, nearest rank."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, int(round(q * (len(xs) - 1)))))
    return xs[k]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def drop_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------
# disk from template


def make_template(path, size_gib):
    """A qcow2 template of size_gib virtual size with a quarter of it written (64 MiB
    runs spread over the image, so a copy moves real bytes)."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, f"{size_gib}G"])
    allocated = size_gib * GIB // 4
    chunk = 64 << 20
    runs = max(1, allocated // chunk)
    stride = size_gib * GIB // runs
    for i in range(runs):
        run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P {i % 251} {i * stride} {chunk}", path])


def bench_disk(sizes, rounds, workdir):
    results = []
    for size in sizes:
        template = os.path.join(workdir, f"template-{size}g.qcow2")
        print(f"   making a {size} GiB template ({size / 4:g} GiB allocated)", flush=True)
        make_template(template, size)
        overlay_t, copy_t = [], []
        for r in range(rounds):
            dst_o = os.path.join(workdir, f"overlay-{r}.qcow2")
            dst_c = os.path.join(workdir, f"copy-{r}.qcow2")
            order = [("overlay", dst_o), ("copy", dst_c)]
            if r % 2:
                order.reverse()
            for kind, dst in order:
                # Start each from a clean page cache state: the last copy's dirty pages
                # must not be flushed on the next contender's time.
                os.sync()
                if kind == "overlay":
                    t = timed(lambda: run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", template, dst]))
                    overlay_t.append(t)
                else:
                    # The seed's way: a copy of the template, synced so the time is the
                    # disk's, not the page cache's.
                    t = timed(lambda: (shutil.copyfile(template, dst), os.sync()))
                    copy_t.append(t)
                drop_file(dst)
        drop_file(template)
        row = {
            "template_gib": size,
            "allocated_gib": size / 4,
            "overlay_s": overlay_t,
            "copy_s": copy_t,
            "overlay_median_s": statistics.median(overlay_t),
            "copy_median_s": statistics.median(copy_t),
        }
        row["copy_over_overlay"] = row["copy_median_s"] / row["overlay_median_s"]
        results.append(row)
        print(f"   {size:>3} GiB: overlay {row['overlay_median_s'] * 1000:8.1f} ms   "
              f"copy {row['copy_median_s'] * 1000:9.1f} ms   copy/overlay {row['copy_over_overlay']:8.1f}x",
              flush=True)
    flat = results[-1]["overlay_median_s"] / results[0]["overlay_median_s"]
    print(f"   overlay cost, largest over smallest template: {flat:.2f}x (goal: flat, ~1x)")
    return {"rows": results, "overlay_largest_over_smallest": flat}


def plot_disk(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    rows = res["rows"]
    xs = [r["template_gib"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [r["overlay_median_s"] * 1000 for r in rows], "o-", label="devvm: qcow2 overlay")
    ax.plot(xs, [r["copy_median_s"] * 1000 for r in rows], "s-", label="seed: full copy (cp)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x} GiB" for x in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for r in rows:
        ax.annotate(f"{r['copy_over_overlay']:.0f}x", (r["template_gib"], r["copy_median_s"] * 1000),
                    textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_xlabel("template size (virtual; a quarter allocated)")
    ax.set_ylabel("time to a usable disk (ms, median)")
    ax.set_title("Disk from template")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# pipeline overhead


def parse_run(lines):
    """Per-step durations, total, guest boot and bootstrap command seconds of one run."""
    events = [json.loads(l) for l in lines if l.strip().startswith("{")]
    events = [e for e in events if "type" in e and "at" in e]

    def at(e):
        return datetime.fromisoformat(e["at"].replace("Z", "+00:00")).timestamp()

    started = {}
    steps = {}
    boot_from = boot_to = cmd_from = cmd_to = started_at = None
    t0 = t1 = None
    for e in events:
        t = at(e)
        kind = e["type"]
        if kind == "run_started":
            t0 = t
        elif kind in ("run_finished", "run_failed"):
            t1 = t
            if kind == "run_failed":
                raise RuntimeError("the run failed: " + json.dumps(e.get("error")))
        elif kind == "step_started":
            started[e["step"]] = t
        elif kind == "step_finished":
            steps[e["step"]] = t - started[e["step"]]
        elif kind == "step_progress":
            m = e.get("message", "")
            # The guest's boot: from asking libvirt to start it (QEMU's own start-up is
            # the guest's, and the seed's virt-install pays it the same) to its SSH
            # server answering. Older runs only say "started domain".
            if e["step"] == "domain" and m.startswith("starting domain"):
                boot_from = t
            elif e["step"] == "domain" and m.startswith("started domain"):
                started_at = t
                if boot_from is None:
                    boot_from = t
            elif e["step"] == "domain" and m.startswith("ssh answers"):
                boot_to = t
            elif e["step"] == "bootstrap" and m.startswith("running chef-client"):
                cmd_from = t
            elif e["step"] == "bootstrap" and m.startswith("Chef Client finished"):
                cmd_to = t
    if None in (t0, t1, boot_from, boot_to, cmd_from, cmd_to):
        raise RuntimeError("the run's events lack a marker (domain started, ssh answers, chef-client)")
    total = t1 - t0
    boot = boot_to - boot_from
    command = cmd_to - cmd_from
    return {"total_s": total, "guest_boot_s": boot, "bootstrap_command_s": command,
            "overhead_s": total - boot - command, "steps_s": steps,
            # QEMU's start-up (libvirt asked -> domain running), part of the boot above
            "qemu_start_s": started_at - boot_from if started_at else 0.0}


def lab_config(workdir, one_host=False, tag=""):
    """A devvm config of the lab; with one_host, only the lab's first host is a
    placement host."""
    config = os.path.join(workdir, f"devvm{tag}.toml")
    env = dict(os.environ)
    if one_host:
        env["DEVVM_LAB_HOST_URIS"] = env["DEVVM_LAB_LIBVIRT_URI"]
    with open(config, "w") as f:
        f.write(run([os.path.join(ROOT, "scripts", "lab-config"), os.path.join(workdir, "state" + tag)], env=env).stdout)
    return config


DEVVM = os.path.join(ROOT, "target", "release", "devvm")


def fresh_neighbours():
    """Forgets the lab bridge's neighbour (ARP) entries, untimed, before each contender:
    an address an earlier round or run used is otherwise reached through a stale entry
    of the old guest's MAC, and the next guest there waits seconds for it to fail."""
    subprocess.run(["ip", "neigh", "flush", "dev", os.environ["DEVVM_LAB_BRIDGE"]],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def devvm_once(config, parse=True):
    """One provision through the CLI (then its deprovision, untimed): the run's parsed
    events (with parse), and the CLI's wall time."""
    fresh_neighbours()
    wall = time.perf_counter()
    out = run([DEVVM, "--config", config, "--json", "provision", "--user", "bob"])
    wall = time.perf_counter() - wall
    lines = out.stdout.splitlines()
    name = None
    for l in lines:
        try:
            v = json.loads(l)
        except ValueError:
            continue
        if isinstance(v.get("vm"), dict):
            name = v["vm"]["name"]
    try:
        one = parse_run(lines) if parse else {}
    finally:
        if name:
            run([DEVVM, "--config", config, "deprovision", name])
    one["cli_wall_s"] = wall
    return one


def pipeline_summary(runs):
    order = ["user", "placement", "ip", "dns", "image", "disk", "domain", "bootstrap"]
    steps = sorted({s for one in runs for s in one["steps_s"]}, key=lambda s: order.index(s) if s in order else 99)
    per_step = {s: {"p50_s": p(0.5, [o["steps_s"][s] for o in runs if s in o["steps_s"]]),
                    "p95_s": p(0.95, [o["steps_s"][s] for o in runs if s in o["steps_s"]])} for s in steps}
    fractions = [o["overhead_s"] / o["total_s"] for o in runs]
    summary = {
        "rounds": runs,
        "per_step": per_step,
        "total_p50_s": p(0.5, [o["total_s"] for o in runs]),
        "overhead_fraction_p50": p(0.5, fractions),
        "overhead_fraction_p95": p(0.95, fractions),
    }
    print("   step        p50 ms    p95 ms")
    for s, v in per_step.items():
        print(f"   {s:<10} {v['p50_s'] * 1000:8.0f}  {v['p95_s'] * 1000:8.0f}")
    summary["qemu_start_p50_s"] = p(0.5, [o["qemu_start_s"] for o in runs])
    print(f"   pipeline overhead: p50 {summary['overhead_fraction_p50'] * 100:.1f} %, "
          f"p95 {summary['overhead_fraction_p95'] * 100:.1f} % of end to end (goal <= 5 %); "
          f"the guest's boot counts from asking libvirt to start it (QEMU's start-up, "
          f"p50 {summary['qemu_start_p50_s'] * 1000:.0f} ms, is the guest's)")
    return summary


def print_round(r, one):
    print(f"   round {r + 1}: devvm {one['total_s']:.2f} s end to end, guest boot {one['guest_boot_s']:.2f} s, "
          f"chef-client {one['bootstrap_command_s']:.2f} s, overhead {one['overhead_s']:.2f} s "
          f"({one['overhead_s'] / one['total_s'] * 100:.1f} %)", flush=True)


def bench_pipeline(rounds, workdir):
    config = lab_config(workdir)
    runs = []
    for r in range(rounds):
        one = devvm_once(config)
        runs.append(one)
        print_round(r, one)
    return pipeline_summary(runs)


def seed_once(kind, r):
    """The seed's sequence (scripts/bench-seed) with a copy or an overlay: its time to a
    bootstrapped VM; the teardown is not timed."""
    name = f"bench-seed-{kind}-{r}"
    # Each contender and round its own address: reusing one just released would wait on
    # the old guest's neighbour entry.
    ip = f"{os.environ['DEVVM_LAB_SUBNET'].rsplit('.', 1)[0]}.{(200 if kind == 'cp' else 227) + r % 27}"
    uri = os.environ.get("DEVVM_LAB_LIBVIRT_URI")
    script = os.path.join(ROOT, "scripts", "bench-seed")
    fresh_neighbours()
    try:
        wall = time.perf_counter()
        run([script, "up", name, ip, uri, kind])
        return time.perf_counter() - wall
    finally:
        run([script, "down", name, ip, uri])


def bench_e2e(rounds, workdir):
    """devvm, the seed's script with cp, and with an overlay, alternated round by round,
    all on the lab's first host (the seed's script has one libvirt URI)."""
    config = lab_config(workdir, one_host=True)
    # One untimed round of each first: devvm caches the template on the host (which the
    # seed's script then copies), and neither contender pays for a cold page cache.
    print("   warm-up round (not counted)", flush=True)
    devvm_once(config)
    seed_once("cp", 26)
    times = {"devvm": [], "seed_cp": [], "seed_overlay": []}
    runs = []
    contenders = ["devvm", "seed_cp", "seed_overlay"]
    for r in range(rounds):
        order = contenders[r % 3:] + contenders[:r % 3]
        for c in order:
            if c == "devvm":
                one = devvm_once(config)
                runs.append(one)
                times["devvm"].append(one["cli_wall_s"])
            else:
                times[c].append(seed_once(c.split("_")[1], r))
        print(f"   round {r + 1}: " + ", ".join(f"{c} {times[c][-1]:.2f} s" for c in contenders), flush=True)
    med = {c: statistics.median(v) for c, v in times.items()}
    res = {
        "times_s": times,
        "median_s": med,
        "devvm_over_seed_cp": med["devvm"] / med["seed_cp"],
        "devvm_over_seed_overlay": med["devvm"] / med["seed_overlay"],
        "pipeline": pipeline_summary(runs),
    }
    print(f"   medians: devvm {med['devvm']:.2f} s, seed+cp {med['seed_cp']:.2f} s, "
          f"seed+overlay {med['seed_overlay']:.2f} s")
    print(f"   devvm / seed with cp: {res['devvm_over_seed_cp']:.2f}x (goal <= 0.7x); "
          f"devvm / seed with overlay: {res['devvm_over_seed_overlay']:.2f}x (goal < 1x)")
    return res


def plot_e2e(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = {"devvm": "devvm (CLI)", "seed_cp": "seed script, cp", "seed_overlay": "seed script, overlay"}
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(res["times_s"])
    ax.boxplot([res["times_s"][n] for n in names], labels=[labels[n] for n in names])
    for i, n in enumerate(names, 1):
        ax.annotate(f"{res['median_s'][n]:.1f} s", (i, res["median_s"][n]), textcoords="offset points",
                    xytext=(28, 0), va="center")
    ax.set_ylabel("seconds to a bootstrapped VM")
    ax.set_title(f"End to end: devvm {res['devvm_over_seed_cp']:.2f}x the seed's script (cp), "
                 f"{res['devvm_over_seed_overlay']:.2f}x (overlay)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def provision_at_once(config, n):
    """n CLI provisions started together: each one's seconds to ready, the VMs, and the
    seconds until the last was ready."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()

    def one(_):
        out = subprocess.run([DEVVM, "--config", config, "--json", "provision", "--user", "bob"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        done = time.perf_counter() - t0
        vm = None
        for l in out.stdout.splitlines():
            try:
                v = json.loads(l)
            except ValueError:
                continue
            if isinstance(v.get("vm"), dict):
                vm = v["vm"]
        return done, vm

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    return [r[0] for r in results], [r[1] for r in results if r[1]], time.perf_counter() - t0


def bench_throughput(levels, rounds, workdir):
    """N provisions at once through N CLI processes, on one host and on the fleet's hosts:
    VMs ready per minute, p95 time to ready, and collisions (two VMs given one address or
    name: any is a bug)."""
    out = {}
    for scope, one_host in (("one_host", True), ("fleet", False)):
        config = lab_config(workdir, one_host=one_host, tag="-" + scope)
        rows = []
        for n in levels:
            walls, rates, collisions, hosts = [], [], 0, set()
            for _ in range(rounds):
                times, vms, elapsed = provision_at_once(config, n)
                try:
                    if len(vms) != n:
                        raise RuntimeError(f"{n - len(vms)} of {n} concurrent provisions failed")
                    walls += times
                    collisions += (n - len({vm["ip"] for vm in vms})) + (n - len({vm["name"] for vm in vms}))
                    hosts |= {vm["host"] for vm in vms}
                    rates.append(n / elapsed * 60)
                finally:
                    for vm in vms:
                        run([DEVVM, "--config", config, "deprovision", vm["name"]])
            row = {"concurrent": n, "ready_per_minute": statistics.median(rates), "p95_ready_s": p(0.95, walls),
                   "p50_ready_s": p(0.5, walls), "collisions": collisions, "hosts_used": len(hosts)}
            rows.append(row)
            print(f"   {scope:<8} {n} at once: {row['ready_per_minute']:5.1f} VMs ready/min, "
                  f"p50 {row['p50_ready_s']:5.1f} s, p95 {row['p95_ready_s']:5.1f} s to ready, "
                  f"{collisions} collisions, {len(hosts)} host(s)", flush=True)
        base = rows[0]["ready_per_minute"]
        for r in rows:
            r["speedup_over_one"] = r["ready_per_minute"] / base
        print(f"   {scope}: speed-up over one at a time: "
              + ", ".join(f"{r['concurrent']}: {r['speedup_over_one']:.2f}x" for r in rows))
        out[scope] = rows
    return out


def plot_throughput(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    collisions = 0
    for scope, rows in res.items():
        xs = [r["concurrent"] for r in rows]
        collisions += sum(r["collisions"] for r in rows)
        ax.plot(xs, [r["ready_per_minute"] for r in rows], "o-", label=scope.replace("_", " "))
        ax2.plot(xs, [r["p95_ready_s"] for r in rows], "s-", label=scope.replace("_", " "))
        ax.set_xticks(xs)
        ax2.set_xticks(xs)
    ax.set_xlabel("provisions at once")
    ax.set_ylabel("VMs ready per minute")
    ax2.set_xlabel("provisions at once")
    ax2.set_ylabel("p95 seconds to ready")
    ax.legend()
    ax2.legend()
    fig.suptitle(f"Throughput (collisions: {collisions})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pipeline(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = res["rounds"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(1, len(runs) + 1)
    boot = [o["guest_boot_s"] for o in runs]
    cmd = [o["bootstrap_command_s"] for o in runs]
    over = [o["overhead_s"] for o in runs]
    ax.bar(xs, boot, label="guest boot (start -> SSH answers)")
    ax.bar(xs, cmd, bottom=boot, label="chef-client")
    ax.bar(xs, over, bottom=[a + b for a, b in zip(boot, cmd)], label="devvm pipeline overhead")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_title(f"devvm end to end: overhead p50 {res['overhead_fraction_p50'] * 100:.1f} %")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kcli_once(r):
    """kcli (scripts/bench-kcli) making a VM from the cached template on the lab's first
    host: seconds until its SSH port answers; the teardown is not timed."""
    name = f"bench-kcli-{r}"
    ip = f"{os.environ['DEVVM_LAB_SUBNET'].rsplit('.', 1)[0]}.{240 + r % 14}"
    script = os.path.join(ROOT, "scripts", "bench-kcli")
    fresh_neighbours()
    try:
        wall = time.perf_counter()
        run([script, "up", name, ip])
        return time.perf_counter() - wall
    finally:
        run([script, "down", name])


def devvm_ssh_once(config):
    """devvm's CLI with the cloud-init bootstrapper (nothing run over SSH): seconds until
    the provision returned, i.e. the guest's SSH server answered and its seed is gone."""
    return devvm_once(config, parse=False)["cli_wall_s"]


def bench_peer(rounds, workdir):
    """devvm against kcli, to a VM answering SSH on the same template, host and bridge.
    devvm does more on the way (LDAP, a lease, DNS A+PTR, the seed's removal)."""
    config = lab_config(workdir, one_host=True, tag="-peer")
    with open(config) as f:
        text = f.read()
    # The same VM without a configuration-management run: cloud-init's seed only.
    text = text[:text.index("[bootstrap]")] + '[bootstrap]\nbackend = "cloud-init"\n'
    with open(config, "w") as f:
        f.write(text)
    print("   warm-up round (not counted)", flush=True)
    devvm_ssh_once(config)
    kcli_once(13)
    times = {"devvm": [], "kcli": []}
    for r in range(rounds):
        for c in (["devvm", "kcli"] if r % 2 == 0 else ["kcli", "devvm"]):
            times[c].append(devvm_ssh_once(config) if c == "devvm" else kcli_once(r))
        print(f"   round {r + 1}: devvm {times['devvm'][-1]:.2f} s, kcli {times['kcli'][-1]:.2f} s", flush=True)
    med = {c: statistics.median(v) for c, v in times.items()}
    res = {"times_s": times, "median_s": med, "devvm_over_kcli": med["devvm"] / med["kcli"]}
    print(f"   medians: devvm {med['devvm']:.2f} s, kcli {med['kcli']:.2f} s; devvm / kcli: "
          f"{res['devvm_over_kcli']:.2f}x")
    return res


def plot_peer(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = {"devvm": "devvm (CLI, cloud-init)", "kcli": "kcli create vm"}
    names = list(res["times_s"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([res["times_s"][n] for n in names], labels=[labels[n] for n in names])
    for i, n in enumerate(names, 1):
        ax.annotate(f"{res['median_s'][n]:.2f} s", (i, res["median_s"][n]), textcoords="offset points",
                    xytext=(28, 0), va="center")
    ax.set_ylabel("seconds to a VM answering SSH")
    ax.set_title(f"A peer tool: devvm {res['devvm_over_kcli']:.2f}x kcli (same template, host, bridge)",
                 fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def guest_once(config, template):
    """One provision of `template` through the CLI with the cloud-init bootstrapper: the
    guest's boot (libvirt asked to start it -> its SSH server answers) and the CLI's wall
    time; the deprovision is not timed."""
    fresh_neighbours()
    wall = time.perf_counter()
    out = run([DEVVM, "--config", config, "--json", "provision", "--user", "bob", "--template", template])
    wall = time.perf_counter() - wall
    name, start, answered = None, None, None
    for l in out.stdout.splitlines():
        try:
            e = json.loads(l)
        except ValueError:
            continue
        if isinstance(e.get("vm"), dict):
            name = e["vm"]["name"]
        m = e.get("message", "")
        if e.get("type") == "step_progress" and e.get("step") == "domain":
            t = datetime.fromisoformat(e["at"].replace("Z", "+00:00")).timestamp()
            if m.startswith("starting domain"):
                start = t
            elif m.startswith("ssh answers"):
                answered = t
    if name:
        run([DEVVM, "--config", config, "deprovision", name])
    if start is None or answered is None:
        raise RuntimeError(f"no boot markers in the events of {template}")
    return {"boot_s": answered - start, "wall_s": wall}


def bench_guests(rounds, workdir):
    """The lab's two templates, the busybox guest and the real Debian 12 one (systemd,
    cloud-init, OpenSSH), at the same size (1 vCPU, 512 MiB) under TCG: time to SSH."""
    config = lab_config(workdir, one_host=True, tag="-guests")
    with open(config) as f:
        text = f.read()
    text = text[:text.index("[bootstrap]")] + '[bootstrap]\nbackend = "cloud-init"\n'
    text = text.replace("memory_mib = 256\n", "memory_mib = 512\n", 1)
    with open(config, "w") as f:
        f.write(text)
    templates = {"busybox": os.environ["DEVVM_LAB_TEMPLATE"], "debian": os.environ["DEVVM_LAB_TEMPLATE_DEBIAN"]}
    print("   warm-up round (not counted; brings the Debian template to the host)", flush=True)
    for t in templates.values():
        guest_once(config, t)
    res = {k: [] for k in templates}
    for r in range(rounds):
        for k in (list(templates) if r % 2 == 0 else list(reversed(templates))):
            res[k].append(guest_once(config, templates[k]))
        print("   round " + str(r + 1) + ": " + ", ".join(
            f"{k} boot {res[k][-1]['boot_s']:.1f} s (provision {res[k][-1]['wall_s']:.1f} s)" for k in templates),
            flush=True)
    med = {k: statistics.median(x["boot_s"] for x in v) for k, v in res.items()}
    out = {"rounds": res, "boot_median_s": med, "debian_over_busybox": med["debian"] / med["busybox"]}
    print(f"   time to SSH, median: busybox {med['busybox']:.1f} s, Debian {med['debian']:.1f} s "
          f"({out['debian_over_busybox']:.1f}x)")
    return out


FACES = {
    # face: (argv after the config, the line that says the provision returned)
    "rust": ([os.path.join(ROOT, "target", "release", "examples", "provision"), "--config", "{config}", "--user", "bob"],
             " is up: "),
    "python": ([os.environ.get("DEVVM_BENCH_PYTHON", "/var/lib/devvm-lab/bench-pyvenv/bin/python"),
                os.path.join(ROOT, "examples", "provision.py"), "{config}", "--user", "bob"], ", owner bob, template "),
    "c": ([os.path.join(OUT, "provision-c"), "{config}", "bob"], " is up: "),
}


def face_once(face, config):
    """One provision through a face's example program: seconds from starting the program
    to the line that says its provision call returned (the program then deprovisions,
    untimed)."""
    argv, marker = FACES[face]
    argv = [a.replace("{config}", config) for a in argv]
    fresh_neighbours()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    ready = None
    for line in proc.stdout:
        if ready is None and marker in line:
            ready = time.perf_counter() - t0
    err = proc.stderr.read()
    if proc.wait() != 0 or ready is None:
        raise RuntimeError(f"the {face} example failed (exit {proc.returncode}): {err.strip()[-500:]}")
    return ready


def bench_faces(rounds, workdir):
    """The same provision from Rust, Python and C (each face's example program, all on
    the lab's first host), alternated round by round."""
    config = lab_config(workdir, one_host=True, tag="-faces")
    faces = list(FACES)
    print("   warm-up round (not counted)", flush=True)
    for f in faces:
        face_once(f, config)
    times = {f: [] for f in faces}
    for r in range(rounds):
        for f in faces[r % 3:] + faces[:r % 3]:
            times[f].append(face_once(f, config))
        print(f"   round {r + 1}: " + ", ".join(f"{f} {times[f][-1]:.2f} s" for f in faces), flush=True)
    med = {f: statistics.median(v) for f, v in times.items()}
    res = {"times_s": times, "median_s": med,
           "python_over_rust": med["python"] / med["rust"], "c_over_rust": med["c"] / med["rust"]}
    print(f"   medians: " + ", ".join(f"{f} {med[f]:.2f} s" for f in faces))
    print(f"   python / rust: {res['python_over_rust']:.3f}x, c / rust: {res['c_over_rust']:.3f}x (goal <= 1.05x)")
    return res


def plot_faces(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(res["times_s"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([res["times_s"][n] for n in names], labels=[n.capitalize() if n != "c" else "C" for n in names])
    for i, n in enumerate(names, 1):
        ax.annotate(f"{res['median_s'][n]:.2f} s", (i, res["median_s"][n]), textcoords="offset points",
                    xytext=(28, 0), va="center")
    ax.set_ylabel("seconds from program start to a ready VM")
    ax.set_title(f"Faces: Python {res['python_over_rust']:.3f}x, C {res['c_over_rust']:.3f}x the Rust example",
                 fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("comparisons", nargs="*", default=["e2e", "disk", "throughput", "faces", "peer", "guests"],
                    choices=["e2e", "disk", "pipeline", "throughput", "faces", "peer", "guests"])
    ap.add_argument("--levels", default="1,2,4,8", help="provisions at once (throughput)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="1,8,40", help="template sizes in GiB (disk)")
    ap.add_argument("--workdir", default=None, help="scratch directory for the disk comparison (big)")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    # Comparisons not run this time keep their last result.
    results = {}
    try:
        with open(os.path.join(OUT, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        pass
    results.update({"machine": {"cpus": os.cpu_count()}, "when": datetime.now().isoformat(timespec="seconds")})
    scratch = tempfile.mkdtemp(prefix="devvm-bench-", dir=args.workdir)
    try:
        if "disk" in args.comparisons:
            print("== disk from template: overlay vs full copy", flush=True)
            results["disk"] = bench_disk([int(s) for s in args.sizes.split(",")], args.rounds, scratch)
            plot_disk(results["disk"], os.path.join(OUT, "disk.png"))
        if "e2e" in args.comparisons:
            print("== end to end: devvm vs the seed's sequence as a script (cp, overlay)", flush=True)
            results["e2e"] = bench_e2e(args.rounds, scratch)
            plot_e2e(results["e2e"], os.path.join(OUT, "e2e.png"))
            plot_pipeline(results["e2e"]["pipeline"], os.path.join(OUT, "pipeline.png"))
        if "throughput" in args.comparisons:
            print("== throughput: provisions at once through the CLI, on the fleet", flush=True)
            results["throughput"] = bench_throughput([int(x) for x in args.levels.split(",")], args.rounds, scratch)
            plot_throughput(results["throughput"], os.path.join(OUT, "throughput.png"))
        if "faces" in args.comparisons:
            print("== faces: the same provision from Rust, Python and C", flush=True)
            results["faces"] = bench_faces(args.rounds, scratch)
            plot_faces(results["faces"], os.path.join(OUT, "faces.png"))
        if "peer" in args.comparisons:
            print("== a peer tool: devvm vs kcli, to a VM answering SSH", flush=True)
            results["peer"] = bench_peer(args.rounds, scratch)
            plot_peer(results["peer"], os.path.join(OUT, "peer.png"))
        if "guests" in args.comparisons:
            print("== guests: time to SSH of the busybox and the real Debian template", flush=True)
            results["guests"] = bench_guests(args.rounds, scratch)
        if "pipeline" in args.comparisons:
            print("== pipeline overhead (devvm CLI, Chef bootstrap, lab template)", flush=True)
            results["pipeline"] = bench_pipeline(args.rounds, scratch)
            plot_pipeline(results["pipeline"], os.path.join(OUT, "pipeline.png"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"results: {os.path.join(OUT, 'results.json')}; plots: {OUT}/*.png")


if __name__ == "__main__":
    sys.exit(main())
