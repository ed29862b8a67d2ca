"""The binding against the lab's real services: LDAP, libvirt/QEMU, BIND, Glance.

Run inside the lab's namespace (``scripts/test-python`` does). Each provision boots a
real guest under TCG (a few seconds).
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import devvm
from conftest import lab_toml, replace_section
from helpers import PyDns, PyIpam

STEPS = ["user", "placement", "ip", "dns", "image", "disk", "domain", "bootstrap"]


def unique(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000) % 10**8:x}"


def domains(lab: dict[str, str]) -> list[str]:
    if not shutil.which("virsh"):
        return []
    names = []
    for uri in lab.get("host_uris", lab["libvirt_uri"]).split():
        out = subprocess.run(
            ["virsh", "-c", uri, "list", "--all", "--name"],
            capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
        ).stdout
        names += [line.strip() for line in out.splitlines() if line.strip()]
    return names


def dig(lab: dict[str, str], *args: str) -> str:
    return subprocess.run(
        ["dig", "+short", "-p", lab["dns_port"], f"@{lab['dns_server']}", *args],
        capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
    ).stdout.strip()


def test_real_vm_for_alice_with_events_and_the_gil_released(lab: dict[str, str], lab_config: Path) -> None:
    p = devvm.Provisioner.from_config(lab_config)
    assert p.backends["user"] == "ldap" and p.backends["domain"] == "libvirt"
    events: list[devvm.Event] = []

    # Another Python thread counts while the provision runs: it only makes progress if
    # the binding released the GIL.
    stop = threading.Event()
    ticks = [0]

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1

    spinner = threading.Thread(target=spin)
    name = unique("py-alice")
    started = datetime.now(timezone.utc)
    spinner.start()
    try:
        t0 = time.monotonic()
        vm = p.provision("alice", name=name, on_event=events.append)
        seconds = time.monotonic() - t0
    finally:
        stop.set()
        spinner.join()
    try:
        assert ticks[0] > 10_000, f"the other thread ran {ticks[0]} times in {seconds:.1f}s"

        assert vm.name == name and vm.owner == "alice"
        assert vm.fqdn == f"{name}.{lab['dns_zone']}"
        assert ipaddress.ip_address(vm.ip) in ipaddress.ip_network(lab["subnet"])
        assert vm.host in lab.get("host_uris", lab["libvirt_uri"]).split()
        assert vm.template == lab["template"]
        assert started - timedelta(seconds=5) <= vm.created <= datetime.now(timezone.utc)
        assert vm.to_dict()["ip"] == vm.ip
        assert p.get_vm(name) == vm and vm in p.list()
        assert name in domains(lab)
        assert dig(lab, vm.fqdn, "A") == vm.ip
        assert dig(lab, "-x", vm.ip) == vm.fqdn + "."

        assert events[0].type == "run_started" and events[-1].type == "run_finished"
        assert [e.seq for e in events] == list(range(len(events)))
        assert {e.step for e in events if e.type == "step_finished"} == set(STEPS)
        assert any(e.type == "step_progress" and e.step == "domain" for e in events)
        assert events[-1].provisioned == vm
    finally:
        p.deprovision(name)
    assert p.get_vm(name) is None and name not in [v.name for v in p.list()]
    assert name not in domains(lab)
    assert dig(lab, vm.fqdn, "A") == ""
    assert p.recover().is_empty


def test_unknown_user_and_outsider(lab: dict[str, str], lab_config: Path) -> None:
    p = devvm.Provisioner.from_config(lab_config)
    events: list[devvm.Event] = []
    with pytest.raises(devvm.UserNotFound) as e:
        p.provision("nobody-here", on_event=events.append)
    assert (e.value.kind, e.value.step, e.value.backend) == ("not_found", "user", "ldap")
    assert not e.value.retryable and e.value.undo_failures == []
    assert events[-1].type == "run_failed" and events[-1].error["kind"] == "not_found"

    with pytest.raises(devvm.Unauthorized) as e:
        p.provision("dave")
    assert e.value.kind == "unauthorized" and e.value.step == "user"
    assert p.list() == []


def lab_ipam(lab: dict[str, str]) -> PyIpam:
    net = ipaddress.ip_network(lab["subnet"])
    # .70-.79 lie in the lab's reserved .2-.99, which the lab's own allocator never hands out.
    pool = [str(net.network_address + i) for i in range(70, 80)]
    return PyIpam(pool, net.prefixlen, lab["gateway"])


def test_python_ip_and_dns_backends_in_the_real_pipeline(lab: dict[str, str], tmp_path: Path) -> None:
    toml = lab_toml(tmp_path / "state")
    toml = replace_section(toml, "ip", 'backend = "custom"')
    toml = replace_section(toml, "dns", 'backend = "custom"')
    cfg = tmp_path / "devvm.toml"
    cfg.write_text(toml)

    ipam = lab_ipam(lab)
    dns = PyDns("py." + lab["dns_zone"])
    p = devvm.Provisioner.from_config(cfg, ip=ipam, dns=dns)
    assert p.backends["ip"] == "py-ipam" and p.backends["dns"] == "python:PyDns"

    name = unique("py-bob")
    vm = p.provision("bob", name=name)
    try:
        assert vm.ip in ipam.addresses and ipam.leases == {name: vm.ip}
        assert vm.fqdn == f"{name}.py.{lab['dns_zone']}"
        assert dns.forward == {vm.fqdn: vm.ip} and dns.ptr == {vm.ip: vm.fqdn}
        assert name in domains(lab)  # a real guest, booted on the Python-leased address
    finally:
        p.deprovision(name)
    assert ipam.leases == {} and dns.records() == {"forward": {}, "ptr": {}}
    assert name not in domains(lab)

    # The Python backend's exception rolls the real run back.
    def refuse(vm: str, ip: str) -> dict:
        raise devvm.Conflict(f"in-house DNS refuses {vm}")

    dns.publish = refuse  # type: ignore[method-assign]
    name = unique("py-bob")
    with pytest.raises(devvm.Conflict) as e:
        p.provision("bob", name=name)
    assert e.value.step == "dns" and "in-house DNS refuses" in str(e.value)
    assert e.value.undo_failures == []
    assert ipam.leases == {} and p.list() == []
    assert name not in domains(lab)
    assert p.recover().is_empty
