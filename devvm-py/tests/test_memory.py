"""The binding against devvm-core's in-memory reference backends: conversions, errors,
events, custom Python backends. Fast; needs no lab."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import devvm
from conftest import write_memory_config
from helpers import PyHypervisor, PyImages, PyDns, PyIpam

STEPS = ["user", "placement", "ip", "dns", "image", "disk", "domain", "bootstrap"]


def test_provision_and_deprovision_with_events(memory_config: Path) -> None:
    events: list[devvm.Event] = []
    with devvm.Provisioner.from_config(str(memory_config)) as p:
        assert p.list() == []
        vm = p.provision("alice", name="web-1", on_event=events.append)
        assert isinstance(vm, devvm.Vm)
        assert (vm.name, vm.owner, vm.template) == ("web-1", "alice", "debian-12")
        assert vm.fqdn == "web-1.lab.example"
        assert vm.ip.startswith("10.20.0.")
        assert vm.host in ("host-a", "host-b")
        assert vm.created.tzinfo is not None
        d = vm.to_dict()
        assert d["name"] == "web-1" and d["ip"] == vm.ip and isinstance(d["created"], str)
        assert p.list() == [vm]
        assert p.get_vm("web-1") == vm

        # Every event of the run arrived, in order, before provision returned.
        assert [e.seq for e in events] == list(range(len(events)))
        assert events[0].type == "run_started" and events[0].operation == "provision"
        assert events[-1].type == "run_finished" and events[-1].is_terminal
        assert events[-1].provisioned == vm
        finished = {e.step for e in events if e.type == "step_finished"}
        assert finished == set(STEPS)
        for e in events:
            assert e.vm == "web-1" and e.request_id == vm.request_id
            assert e.to_dict() == json.loads(e.to_json())
            assert e.to_dict()["type"] == e.type
        ip_done = next(e for e in events if e.type == "step_finished" and e.step == "ip")
        assert ip_done.summary and ip_done.result["ip"] == vm.ip

        # Same request id again: the same VM.
        assert p.provision("alice", request_id=vm.request_id, name="web-1") == vm

        p.deprovision("web-1")
        assert p.list() == []
        with pytest.raises(devvm.NotFound) as e:
            p.deprovision("web-1")
        assert e.value.kind == "not_found"
        report = p.recover()
        assert isinstance(report, devvm.RecoveryReport) and report.is_empty
        assert report.to_dict() == {
            "completed": [],
            "rolled_back": [],
            "removed": [],
            "still_held": [],
            "unreadable": [],
        }
    with pytest.raises(RuntimeError):
        p.list()


def test_sizes_and_defaults(memory_config: Path) -> None:
    p = devvm.Provisioner.from_config(memory_config)
    vm = p.provision("bob", vcpus=1, memory_mib=1024)
    assert vm.owner == "bob" and vm.name.startswith("bob-")
    p.deprovision(vm.name)
    with pytest.raises(devvm.InvalidInput):
        p.provision("bob", vcpus=0)
    with pytest.raises(TypeError):
        p.provision("bob", memory_mib=1024, memory_mb=1024)


def disk_gib_of_run(p: devvm.Provisioner, **kw) -> int:
    """The disk size the run's disk step made (from its step_finished event)."""
    seen: list = []
    vm = p.provision("alice", on_event=seen.append, **kw)
    p.deprovision(vm.name)
    (disk,) = [e.to_dict() for e in seen if e.type == "step_finished" and e.step == "disk"]
    return disk["result"]["size_gib"]


def test_a_partial_size_takes_the_rest_from_the_config_defaults(tmp_path: Path) -> None:
    config = write_memory_config(tmp_path)
    text = config.read_text().replace("[defaults]\n", "[defaults]\nvcpus = 1\nmemory_mib = 512\ndisk_gib = 7\n")
    config.write_text(text)
    p = devvm.Provisioner.from_config(config)
    assert disk_gib_of_run(p, vcpus=2) == 7, "the config's disk, not the built-in 40"
    assert disk_gib_of_run(p, memory_mib=1024) == 7
    assert disk_gib_of_run(p, disk_gib=9) == 9
    assert disk_gib_of_run(p, disk_gb=11) == 11, "the old keyword still works"


def test_error_classes_carry_kind_step_retryable(memory_config: Path) -> None:
    p = devvm.Provisioner.from_config(memory_config)
    with pytest.raises(devvm.UserNotFound) as e:
        p.provision("nobody")
    err = e.value
    assert isinstance(err, devvm.NotFound) and isinstance(err, devvm.Error)
    assert (err.kind, err.step, err.retryable, err.undo_failures) == ("not_found", "user", False, [])
    assert err.backend == "memory"
    assert str(err).startswith("user: ")

    with pytest.raises(devvm.Unauthorized) as e:
        p.provision("mallory")
    assert e.value.kind == "unauthorized" and e.value.step == "user"

    with pytest.raises(devvm.InvalidInput) as e:
        p.provision("alice", name="not a label")
    assert e.value.kind == "invalid_input" and e.value.step is None

    vm = p.provision("alice", name="taken")
    with pytest.raises(devvm.AlreadyExists):
        p.provision("alice", name="taken")
    p.deprovision(vm.name)
    assert p.list() == []

    for cls, kind, retryable in [
        (devvm.Unavailable, "unavailable", True),
        (devvm.Timeout, "timeout", True),
        (devvm.Conflict, "conflict", False),
        (devvm.Cancelled, "cancelled", False),
        (devvm.BackendError, "backend", False),
        (devvm.SubnetExhausted, "exhausted", False),
    ]:
        assert issubclass(cls, devvm.Error)
        assert (cls.kind, cls.retryable) == (kind, retryable)


def test_missing_custom_backend_is_invalid_input(tmp_path: Path) -> None:
    cfg = write_memory_config(tmp_path, custom=("ip",))
    with pytest.raises(devvm.InvalidInput, match="ip allocator"):
        devvm.Provisioner.from_config(cfg)
    with pytest.raises(TypeError, match="allocate"):
        devvm.Provisioner.from_config(cfg, ip=object())
    with pytest.raises(TypeError, match="unknown custom backend"):
        devvm.Provisioner.from_config(cfg, ipam=object())
    with pytest.raises(devvm.NotFound):
        devvm.Provisioner.from_config(tmp_path / "missing.toml")


def test_features_and_a_backend_the_wheel_lacks(tmp_path: Path) -> None:
    """``devvm.FEATURES`` names the backend features the wheel was built with (every one
    in the default wheel); a config naming a backend whose feature is missing (``libvirt``
    in the portable manylinux wheel) is ``InvalidInput`` saying so."""
    from conftest import replace_section

    known = {"ldap", "rfc2136", "glance", "libvirt", "ssh", "cloud-init", "sqlite", "postgres"}
    assert isinstance(devvm.FEATURES, tuple) and set(devvm.FEATURES) <= known
    cfg = write_memory_config(tmp_path)
    cfg.write_text(replace_section(cfg.read_text(), "hypervisor", 'backend = "libvirt"'))
    if "libvirt" in devvm.FEATURES:
        try:
            devvm.Provisioner.from_config(cfg).close()
        except devvm.Error as e:
            assert "not in this devvm wheel" not in str(e)
    else:
        with pytest.raises(devvm.InvalidInput, match=r"\[hypervisor\] backend \"libvirt\" is not in this devvm wheel") as e:
            devvm.Provisioner.from_config(cfg)
        assert "pip install ./devvm-py" in str(e.value)
        # A Python backend may still serve the section under that name.
        p = devvm.Provisioner.from_config(cfg, hypervisor=PyHypervisor())
        assert p.backends["domain"] == "python:PyHypervisor"
        p.close()


def test_events_iterator(memory_config: Path) -> None:
    p = devvm.Provisioner.from_config(memory_config)
    it = p.events()
    got: list[devvm.Event] = []

    def consume() -> None:
        for e in it:
            got.append(e)
            if e.type == "run_finished" and e.vm == "iter-2":
                break

    t = threading.Thread(target=consume)
    t.start()
    p.provision("alice", name="iter-1")
    p.provision("bob", name="iter-2")
    t.join(120)
    assert not t.is_alive()
    assert {e.vm for e in got} == {"iter-1", "iter-2"}
    assert [e.seq for e in got if e.vm == "iter-1"] == list(range(len([e for e in got if e.vm == "iter-1"])))
    # Both runs have finished, so every event they made is already queued: no wait needed.
    assert it.get(timeout=0) is None  # nothing else happened
    it.close()
    assert it.closed and list(it) == []

    # A new iterator sees only runs started after it was made; close() from another
    # thread ends a blocked iteration.
    with p.events() as it2:
        p.deprovision("iter-1")
        e = it2.get(timeout=120)
        assert e is not None and e.type == "run_started" and e.operation == "deprovision"
        threading.Timer(0.3, it2.close).start()
        rest = list(it2)  # ends once closed
        assert all(ev.vm == "iter-1" for ev in rest)
    p.deprovision("iter-2")


def test_callback_exception_cancels_and_rolls_back(tmp_path: Path) -> None:
    cfg = write_memory_config(tmp_path, custom=("ip",))
    ipam = PyIpam([f"10.20.0.{i}" for i in range(2, 6)], 28, "10.20.0.1")
    p = devvm.Provisioner.from_config(cfg, ip=ipam)

    def on_event(e: devvm.Event) -> None:
        if e.type == "step_finished" and e.step == "ip":
            raise ValueError("stop here")

    with pytest.raises(ValueError, match="stop here"):
        p.provision("alice", name="cb", on_event=on_event)
    assert p.list() == []
    assert ipam.leases == {}


def test_python_backends_in_the_pipeline(tmp_path: Path) -> None:
    cfg = write_memory_config(tmp_path, custom=("ip", "dns"))
    ipam = PyIpam(["10.20.0.5", "10.20.0.6"], 28, "10.20.0.1")
    dns = PyDns("py.example")
    p = devvm.Provisioner.from_config(cfg, ip=ipam, dns=dns)
    assert p.backends["ip"] == "py-ipam" and p.backends["dns"] == "python:PyDns"
    vm = p.provision("alice", name="pyvm")
    assert (vm.ip, vm.fqdn) == ("10.20.0.5", "pyvm.py.example")
    assert dns.records() == {"forward": {"pyvm.py.example": "10.20.0.5"}, "ptr": {"10.20.0.5": "pyvm.py.example"}}

    # A devvm.Error raised by Python keeps its kind; the run is rolled back.
    dns.ptr["10.20.0.6"] = "someone-else.py.example"
    with pytest.raises(devvm.Conflict) as e:
        p.provision("bob", name="clash")
    assert e.value.step == "dns" and e.value.backend == "python:PyDns"
    assert "PTR of 10.20.0.6" in str(e.value)
    assert set(ipam.leases) == {"pyvm"}

    # Any other exception is a backend error with its message; rolled back too.
    def broken(vm: str, ip: str) -> dict:
        raise RuntimeError("in-house API said 500")

    dns.publish = broken  # type: ignore[method-assign]
    with pytest.raises(devvm.BackendError, match="RuntimeError: in-house API said 500") as e:
        p.provision("bob", name="broken")
    assert e.value.kind == "backend" and e.value.step == "dns"
    assert set(ipam.leases) == {"pyvm"}

    # Exhausted at the ip step is SubnetExhausted.
    ipam.addresses = ["10.20.0.5"]
    with pytest.raises(devvm.SubnetExhausted):
        p.provision("bob", name="full")

    p.deprovision("pyvm")
    assert ipam.leases == {} and dns.forward == {}
    assert p.list() == []


def test_a_python_backend_is_selected_by_the_name_its_section_gives(tmp_path: Path) -> None:
    """Python backends go through the same registry as the built-in ones: a section may
    name them (``backend = "in-house-dns"``) rather than say ``custom``."""
    from conftest import replace_section

    cfg = write_memory_config(tmp_path)
    cfg.write_text(replace_section(cfg.read_text(), "dns", 'backend = "in-house-dns"'))
    with pytest.raises(devvm.InvalidInput, match="unknown backend"):
        devvm.Provisioner.from_config(cfg)
    dns = PyDns("named.example")
    p = devvm.Provisioner.from_config(cfg, dns=dns)
    vm = p.provision("alice", name="named")
    assert vm.fqdn == "named.named.example"
    p.deprovision("named")
    assert dns.records() == {"forward": {}, "ptr": {}}


def test_python_image_store_and_hypervisor_in_the_pipeline(tmp_path: Path) -> None:
    cfg = write_memory_config(tmp_path, custom=("images", "hypervisor"))
    images = PyImages(["debian-12"])
    hv = PyHypervisor()
    p = devvm.Provisioner.from_config(cfg, images=images, hypervisor=hv)
    seen: list = []
    vm = p.provision("alice", name="pyhv", on_event=seen.append)
    assert vm.disk == "/py/disks/pyhv.qcow2"
    assert ("pyhv", vm.host) in hv.domains and ("pyhv", vm.host) in images.disks
    spec = hv.specs[-1]
    assert spec["lease"]["ip"] == vm.ip and spec["fqdn"] == vm.fqdn
    # The first-boot seed: the host key the guest must present, the private half in user-data.
    assert spec["seed"]["host_key"].startswith("ssh-ed25519 ")
    assert spec["seed"]["user_data"].startswith("#cloud-config")
    assert "instance-id" in spec["seed"]["meta_data"]
    assert any(e.type == "step_progress" and e.message == "python started pyhv" for e in seen)
    # No event carries the private key.
    assert not any("PRIVATE KEY" in e.to_json() for e in seen)

    # An unknown template from Python rolls the run back: nothing held anywhere.
    with pytest.raises(devvm.NotFound):
        p.provision("alice", name="nope", template="centos")
    assert set(images.disks) == {("pyhv", vm.host)}

    p.deprovision("pyhv")
    assert hv.domains == {} and images.disks == {}


def test_a_vm_moves_between_hosts_and_a_host_drains(memory_config: Path) -> None:
    with devvm.Provisioner.from_config(str(memory_config)) as p:
        vm = p.provision("alice", name="mover")
        hosts = p.hosts()
        assert {h["host"] for h in hosts} == {"host-a", "host-b"}
        assert any(h["vms"] == ["mover"] and h["host"] == vm.host for h in hosts)
        to = "host-b" if vm.host == "host-a" else "host-a"

        events: list[devvm.Event] = []
        moved = p.migrate("mover", to, on_event=events.append)
        assert moved.host == to and moved.ip == vm.ip and moved.fqdn == vm.fqdn
        assert events[0].type == "run_started" and events[-1].type == "run_finished"
        assert {e.step for e in events if e.type == "step_started"} >= {"placement", "disk", "domain"}
        assert p.get_vm("mover").host == to

        plan = p.drain(to, dry_run=True)
        assert plan == [{"vm": "mover", "from": to, "to": vm.host}]
        assert p.get_vm("mover").host == to, "a dry run moves nothing"
        assert p.rebalance(dry_run=True) == []
        assert p.drain(to) == plan
        assert p.get_vm("mover").host == vm.host

        with pytest.raises(devvm.NotFound):
            p.migrate("nope", to)
        p.deprovision("mover")
