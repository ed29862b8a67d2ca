"""Backends written in Python, used by the tests (and as examples of the protocols in
``devvm.backends``)."""

from __future__ import annotations

import ipaddress
import threading
from typing import Optional

import devvm


class PyIpam:
    """An ``IpAllocator`` over a fixed list of addresses, in memory."""

    backend = "py-ipam"

    def __init__(self, addresses: list[str], prefix_len: int, gateway: Optional[str] = None):
        self.addresses = list(addresses)
        self.prefix_len = prefix_len
        self.gateway = gateway
        self.leases: dict[str, str] = {}
        self.owners: dict[str, str] = {}
        self.lock = threading.Lock()
        self.calls: list[str] = []

    def _lease(self, vm: str, ip: str) -> dict:
        return {"vm": vm, "ip": ip, "prefix_len": self.prefix_len, "gateway": self.gateway}

    def allocate(self, vm: str, owner: str) -> dict:
        with self.lock:
            self.calls.append(f"allocate {vm}")
            if vm in self.leases:
                if self.owners.get(vm) != owner:
                    raise devvm.AlreadyExists(f"{vm} is held by {self.owners.get(vm)}")
                return self._lease(vm, self.leases[vm])
            used = set(self.leases.values())
            for ip in self.addresses:
                if ip not in used:
                    self.leases[vm] = ip
                    self.owners[vm] = owner
                    return self._lease(vm, ip)
            raise devvm.Exhausted("no free address")

    def release(self, vm: str, owner: str) -> str:
        with self.lock:
            self.calls.append(f"release {vm}")
            if vm not in self.leases:
                return "absent"
            if self.owners.get(vm) != owner:
                return "foreign"
            del self.leases[vm]
            del self.owners[vm]
            return "removed"

    def lease(self, vm: str) -> Optional[dict]:
        with self.lock:
            ip = self.leases.get(vm)
            return None if ip is None else self._lease(vm, ip)


class PyDns:
    """A ``DnsUpdater`` for ``zone``, records kept in memory (as an in-house API would)."""

    def __init__(self, zone: str):
        self.zone = zone
        self.forward: dict[str, str] = {}
        self.ptr: dict[str, str] = {}
        self.lock = threading.Lock()

    def fqdn(self, vm: str) -> str:
        return f"{vm}.{self.zone}"

    def publish(self, vm: str, ip: str) -> dict:
        fqdn = self.fqdn(vm)
        with self.lock:
            if self.forward.get(fqdn, ip) != ip:
                raise devvm.Conflict(f"{fqdn} points to {self.forward[fqdn]}")
            if self.ptr.get(ip, fqdn) != fqdn:
                raise devvm.Conflict(f"PTR of {ip} names {self.ptr[ip]}")
            self.forward[fqdn] = ip
            self.ptr[ip] = fqdn
        return {"fqdn": fqdn, "ip": ipaddress.ip_address(ip)}

    def remove(self, vm: str, ip: str) -> Optional[str]:
        fqdn = self.fqdn(vm)
        with self.lock:
            other = self.forward.get(fqdn)
            removed = False
            if other == ip:
                del self.forward[fqdn]
                removed = True
            if self.ptr.get(ip) == fqdn:
                del self.ptr[ip]
                removed = True
            if removed:
                return None
            return {"outcome": "foreign", "holder": f"{fqdn} -> {other}"} if other else "absent"

    def resolve(self, vm: str) -> list:
        with self.lock:
            ip = self.forward.get(self.fqdn(vm))
            return [] if ip is None else [ip]

    def reverse(self, ip: str) -> list:
        with self.lock:
            name = self.ptr.get(ip)
            return [] if name is None else [name]

    def records(self) -> dict:
        with self.lock:
            return {"forward": dict(self.forward), "ptr": dict(self.ptr)}


class PyImages:
    """An ``ImageStore`` whose disks are dicts in memory."""

    def __init__(self, templates: list[str]):
        self.known = set(templates)
        self.disks: dict[tuple[str, str], dict] = {}
        self.lock = threading.Lock()

    def _template(self, name: str) -> dict:
        if name not in self.known:
            raise devvm.NotFound(f"no template {name}")
        return {"name": name, "path": f"/py/templates/{name}.qcow2", "digest": None, "boot": {}}

    def prepare(self, template: str, host: str, progress: devvm.Progress) -> dict:
        progress.message(f"python has {template}")
        return self._template(template)

    def templates(self) -> list[dict]:
        return [self._template(t) for t in sorted(self.known)]

    def create_disk(
        self, vm: str, host: str, template: dict, size_gib: int, owner: str, progress: devvm.Progress
    ) -> dict:
        with self.lock:
            have = self.disks.get((vm, host))
            if have is not None and have["owner"] != owner:
                raise devvm.AlreadyExists(f"the disk of {vm} is {have['owner']}'s")
            d = self.disks.setdefault(
                (vm, host),
                {"vm": vm, "path": f"/py/disks/{vm}.qcow2", "format": "qcow2", "size_gib": size_gib, "owner": owner},
            )
            return {k: v for k, v in d.items() if k != "owner"}

    def delete_disk(self, vm: str, host: str, owner: str) -> str:
        with self.lock:
            have = self.disks.get((vm, host))
            if have is None:
                return "absent"
            if have["owner"] != owner:
                return "foreign"
            del self.disks[(vm, host)]
            return "removed"

    def disk(self, vm: str, host: str) -> Optional[dict]:
        with self.lock:
            d = self.disks.get((vm, host))
            return None if d is None else {k: v for k, v in d.items() if k != "owner"}


class PyHypervisor:
    """A ``Hypervisor`` whose domains are dicts in memory; it keeps the specs it got."""

    def __init__(self) -> None:
        self.domains: dict[tuple[str, str], dict] = {}
        self.specs: list[dict] = []
        self.lock = threading.Lock()

    def create(self, spec: dict, progress: devvm.Progress) -> dict:
        with self.lock:
            self.specs.append(spec)
            key = (spec["name"], spec["host"])
            have = self.domains.get(key)
            if have and have["request_id"] != spec["request_id"]:
                raise devvm.AlreadyExists(f"domain {spec['name']} belongs to another request")
            self.domains[key] = {"uuid": f"uuid-{spec['name']}", "request_id": spec["request_id"]}
            progress.message(f"python started {spec['name']}")
            return {"uuid": f"uuid-{spec['name']}"}

    def destroy(self, vm: str, host: str, owner: str) -> str:
        with self.lock:
            have = self.domains.get((vm, host))
            if have is None:
                return "absent"
            if have["request_id"] != owner:
                return "foreign"
            del self.domains[(vm, host)]
            return "removed"

    def domain(self, vm: str, host: str) -> Optional[dict]:
        with self.lock:
            d = self.domains.get((vm, host))
            return None if d is None else {"uuid": d["uuid"]}
