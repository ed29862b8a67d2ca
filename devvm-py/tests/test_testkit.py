"""devvm-core's conformance suites, run against Python implementations."""

from __future__ import annotations

import pytest

import devvm
from devvm import testkit
from helpers import PyDns, PyIpam


def test_python_ip_allocator_conforms() -> None:
    ipam = PyIpam([f"10.30.0.{i}" for i in range(2, 14)], 28, "10.30.0.1")
    testkit.check_ip_allocator(ipam, capacity=12, concurrency=6)
    assert ipam.leases == {}
    assert len(ipam.calls) > 20


def test_python_dns_updater_conforms() -> None:
    dns = PyDns("py.example")
    testkit.check_dns_updater(dns, ("10.30.0.201", "10.30.0.202"))
    assert dns.records() == {"forward": {}, "ptr": {}}


class SharedAddressIpam(PyIpam):
    """Broken: hands every VM the same address."""

    def allocate(self, vm: str, owner: str) -> dict:
        with self.lock:
            if vm in self.leases and self.owners.get(vm) != owner:
                raise devvm.AlreadyExists("taken")
            self.leases[vm] = self.addresses[0]
            self.owners[vm] = owner
            return self._lease(vm, self.addresses[0])


def test_broken_allocator_fails_the_suite() -> None:
    with pytest.raises(AssertionError, match="never share an address"):
        testkit.check_ip_allocator(SharedAddressIpam(["10.30.0.2", "10.30.0.3"], 28))


class OverwritingDns(PyDns):
    """Broken: publishing over a name that points elsewhere overwrites it."""

    def publish(self, vm: str, ip: str) -> dict:
        fqdn = self.fqdn(vm)
        with self.lock:
            self.forward[fqdn] = ip
            self.ptr[ip] = fqdn
        return {"fqdn": fqdn, "ip": ip}


def test_broken_dns_fails_the_suite() -> None:
    with pytest.raises(AssertionError, match="DnsUpdater conformance: publishing a name that points elsewhere"):
        testkit.check_dns_updater(OverwritingDns("py.example"), ("10.30.0.1", "10.30.0.2"))


class PyUsers:
    def find_user(self, user: str) -> dict:
        if user == "alice":
            return {"ssh_keys": ["ssh-ed25519 AAAA alice"]}
        if user == "dave":
            raise devvm.Unauthorized("dave is not in vm-owners")
        raise devvm.NotFound(f"no user {user}")


def test_python_user_directory_conforms() -> None:
    testkit.check_user_directory(PyUsers(), "alice", outsider="dave")


def test_bad_return_value_is_reported() -> None:
    class NoPrefix(PyIpam):
        def allocate(self, vm: str, owner: str) -> dict:
            return {"ip": "10.30.0.2"}

    with pytest.raises(AssertionError, match="prefix_len"):
        testkit.check_ip_allocator(NoPrefix(["10.30.0.2"], 28))
