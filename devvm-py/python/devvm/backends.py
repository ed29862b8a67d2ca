"""The protocols a Python object follows to be a step's backend.

Pass such an object to :meth:`devvm.Provisioner.from_config` by the step's keyword
(``users=``, ``placement=``, ``ip=``, ``dns=``, ``images=``, ``hypervisor=``,
``bootstrap=``); the config's section for
that step says ``backend = "custom"``. The pipeline calls it like any built-in backend,
each call in a worker thread holding the GIL, so methods may block (call an HTTP API,
sleep) but must be thread-safe: calls for different VMs can overlap.

The methods mirror the Rust traits of ``devvm-core`` (``traits.rs``), with the same
contracts (acting is idempotent per VM; undoing something absent succeeds; see each
method). Values cross as plain Python: names and addresses are ``str``; structured
results are dicts with the keys of the Rust type's serde form (an ``ipaddress`` object
is accepted wherever a ``str`` address is). To fail with a specific kind, raise the
matching :class:`devvm.Error` subclass (``devvm.Conflict``, ``devvm.Exhausted``, ...);
any other exception fails the step with kind ``backend`` and the exception's message,
and the run is rolled back.

An optional attribute ``backend: str`` names the backend in errors and logs (default
``python:<class name>``). Check an implementation with :mod:`devvm.testkit`.

These classes are ``typing.Protocol`` s for type checkers; no need to inherit from them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, TypedDict, Union

from ._devvm import Progress


class LeaseDict(TypedDict, total=False):
    """A lease: ``ip`` and ``prefix_len`` required; ``gateway`` optional; ``vm`` defaults
    to the VM asked for."""

    vm: str
    ip: str
    prefix_len: int
    gateway: Optional[str]


class DnsRecordDict(TypedDict):
    """The records published: ``fqdn`` (no trailing dot) resolves to ``ip``."""

    fqdn: str
    ip: str


class UserDict(TypedDict, total=False):
    """A user: ``name`` defaults to the name asked for."""

    name: str
    display_name: Optional[str]
    mail: Optional[str]
    ssh_keys: List[str]


class SizeDict(TypedDict):
    """A VM size, as ``reserve`` receives it."""

    vcpus: int
    memory_mib: int
    disk_gib: int


class BootstrapReportDict(TypedDict, total=False):
    """What a bootstrap did."""

    bootstrapped: bool
    summary: str


class UserDirectory(Protocol):
    """Step ``user`` (keyword ``users=``)."""

    def find_user(self, user: str) -> UserDict:
        """Looks ``user`` up. Unknown: raise ``devvm.NotFound``; exists but may not own
        VMs: ``devvm.Unauthorized``; directory down: ``devvm.Unavailable``."""
        ...


#: What an undo method (``release``, ``remove``, ``delete_disk``, ``destroy``,
#: ``unregister``) returns: ``None`` or ``"removed"`` when it removed the run's resource,
#: ``"absent"`` when there was nothing, ``"foreign"`` (or ``{"outcome": "foreign",
#: "holder": "..."}``) when a resource of that name belongs to someone else and was left
#: alone. An undo acts only on what it can prove is ``owner``'s.
Undone = Union[None, str, Dict[str, str]]


class Placement(Protocol):
    """Step ``placement`` (keyword ``placement=``)."""

    def reserve(self, vm: str, size: SizeDict, owner: str) -> str:
        """Reserves room for ``vm`` for ``owner`` (the run's request id: keep it with the
        slot) and returns the host id. Again for the same ``vm`` and ``owner``: the same
        host, one slot. A slot of ``vm`` another owner holds: raise
        ``devvm.AlreadyExists``. No room: raise ``devvm.Exhausted``."""
        ...

    def release(self, vm: str, owner: str) -> Undone:
        """Releases the slot ``owner`` holds for ``vm``. See :data:`Undone`: a slot of
        another owner is left alone (return ``"foreign"``)."""
        ...

    def reservation(self, vm: str) -> Optional[str]:
        """The host holding a slot for ``vm``, or None."""
        ...


class IpAllocator(Protocol):
    """Step ``ip`` (keyword ``ip=``)."""

    def allocate(self, vm: str, owner: str) -> LeaseDict:
        """Leases a free address to ``vm`` for ``owner`` (the run's request id: keep it
        with the lease): ``{"ip": "10.0.0.7", "prefix_len": 24, "gateway": "10.0.0.1"}``.
        Again for the same ``vm`` and ``owner``: the same lease. A lease of ``vm`` another
        owner holds: raise ``devvm.AlreadyExists``. Never two VMs on one address. Full:
        raise ``devvm.Exhausted``."""
        ...

    def release(self, vm: str, owner: str) -> Undone:
        """Releases the lease ``owner`` holds for ``vm``. See :data:`Undone`: a lease of
        another owner is left alone (return ``"foreign"``)."""
        ...

    def lease(self, vm: str) -> Optional[LeaseDict]:
        """The lease ``vm`` holds, or None."""
        ...


class DnsUpdater(Protocol):
    """Step ``dns`` (keyword ``dns=``)."""

    def fqdn(self, vm: str) -> str:
        """The fqdn ``vm`` gets in the zone, without trailing dot. Must not raise."""
        ...

    def publish(self, vm: str, ip: str) -> DnsRecordDict:
        """Publishes ``fqdn(vm) A ip`` and the PTR, both or neither; returns
        ``{"fqdn": ..., "ip": ...}``. Same name and address again: no change. A name or PTR
        pointing elsewhere: raise ``devvm.Conflict`` and change nothing."""
        ...

    def remove(self, vm: str, ip: str) -> Undone:
        """Removes both records (only ones with exactly this data). Records pointing
        elsewhere are someone else's: leave them and return ``"foreign"``."""
        ...

    def resolve(self, vm: str) -> List[str]:
        """The addresses ``fqdn(vm)`` resolves to now."""
        ...

    def reverse(self, ip: str) -> List[str]:
        """The names the PTR of ``ip`` holds now (no trailing dots)."""
        ...


class ImageStore(Protocol):
    """Steps ``image`` and ``disk`` (keyword ``images=``). Templates and disks cross as
    dicts with the serde form of ``Template`` (``name``, ``path``, ``digest``, ``boot``)
    and ``Disk`` (``vm``, ``path``, ``format`` = ``"qcow2"`` | ``"raw"``, ``size_gib``)."""

    def prepare(self, template: str, host: str, progress: Progress) -> Dict[str, Any]:
        """Makes ``template`` available on ``host`` and returns it with the host's paths;
        idempotent. An unknown template raises :class:`devvm.NotFound`. A store whose
        templates are not per host may ignore ``host``."""
        ...

    def templates(self) -> List[Dict[str, Any]]:
        """The templates available locally."""
        ...

    def create_disk(
        self,
        vm: str,
        host: str,
        template: Dict[str, Any],
        size_gib: int,
        owner: str,
        progress: Progress,
    ) -> Dict[str, Any]:
        """Creates the disk of ``vm`` on ``host`` for ``owner`` (record it with the disk);
        calling again for the same owner returns the same disk. A disk of that name that
        ``owner`` did not make is never adopted: raise ``devvm.AlreadyExists``."""
        ...

    def delete_disk(self, vm: str, host: str, owner: str) -> Undone:
        """Deletes the disk of ``vm`` if ``owner`` made it. See :data:`Undone`."""
        ...

    def disk(self, vm: str, host: str) -> Optional[Dict[str, Any]]:
        """The disk of ``vm`` on ``host``, or None."""
        ...


class Hypervisor(Protocol):
    """Step ``domain`` (keyword ``hypervisor=``)."""

    def create(self, spec: Dict[str, Any], progress: Progress) -> Dict[str, Any]:
        """Defines and starts the VM; returns ``{"uuid": ...}`` (``name`` and ``host``
        default to the spec's). ``spec`` holds ``name``, ``host``, ``size``, ``disk``,
        ``template``, ``lease``, ``fqdn``, ``owner``, ``request_id``, ``ssh_keys`` and
        ``seed`` (``meta_data``, ``user_data``, ``network_config`` as text for a NoCloud
        ``cidata`` disk, and the ``host_key`` the guest must present; ``user_data`` holds
        the guest's private host key: keep it secret). Calling again for the same request
        returns the running domain; a domain of that name from another request raises
        :class:`devvm.AlreadyExists`."""
        ...

    def destroy(self, vm: str, host: str, owner: str) -> Undone:
        """Stops and removes the domain if its request id is ``owner``. See :data:`Undone`."""
        ...

    def domain(self, vm: str, host: str) -> Optional[Dict[str, Any]]:
        """The domain ``vm`` on ``host``, or None."""
        ...


class Bootstrapper(Protocol):
    """Step ``bootstrap`` (keyword ``bootstrap=``)."""

    def bootstrap(self, target: Dict[str, Any], progress: Progress) -> BootstrapReportDict:
        """Bootstraps the guest. ``target`` is the serde form of ``BootstrapTarget``
        (``vm``, ``request_id``, ``fqdn``, ``ip``, ``owner``, ``settings``, ``host_key``);
        record ``request_id`` with whatever you register. Report output
        with ``progress.message(line)``. Must be safe to run again."""
        ...

    def unregister(self, vm: str, owner: str) -> Undone:
        """Undoes what bootstrapping ``owner``'s VM registered outside the guest. See
        :data:`Undone`."""
        ...


__all__ = [
    "Undone",
    "Bootstrapper",
    "BootstrapReportDict",
    "DnsRecordDict",
    "DnsUpdater",
    "Hypervisor",
    "ImageStore",
    "IpAllocator",
    "LeaseDict",
    "Placement",
    "SizeDict",
    "UserDict",
    "UserDirectory",
]
