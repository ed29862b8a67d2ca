"""Type stubs of the native module ``devvm._devvm`` (re-exported by ``devvm``)."""

from __future__ import annotations

import datetime
import os
from types import TracebackType
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, Union

__version__: str
FEATURES: Tuple[str, ...]
"""devvm-core's backend features this wheel was built with: ``ldap``, ``rfc2136``,
``glance``, ``libvirt``, ``ssh``, ``cloud-init``, ``sqlite``, ``postgres`` (all of them in the default
wheel; the portable manylinux wheel lacks ``libvirt``). A config naming a backend whose
feature is missing raises ``InvalidInput``."""

def _shutdown() -> None:
    """Stops the module's runtime (registered with ``atexit`` by ``devvm``)."""

# ---- errors -------------------------------------------------------------------------

class Error(Exception):
    """Base class of every devvm error."""

    kind: str
    """``not_found``, ``already_exists``, ``invalid_input``, ``exhausted``,
    ``unauthorized``, ``conflict``, ``unavailable``, ``timeout``, ``cancelled`` or
    ``backend``."""
    step: Optional[str]
    """The step that failed (``user``, ``placement``, ``ip``, ``dns``, ``image``, ``disk``,
    ``domain``, ``bootstrap``), or None."""
    retryable: bool
    """Whether trying the same call again may succeed."""
    backend: Optional[str]
    """The backend that failed, when known."""
    message: Optional[str]
    """The short message, without the step."""
    cause: Optional[str]
    """The underlying cause's message, when there is one."""
    undo_failures: List[Dict[str, str]]
    """Resources the rollback could not remove: ``{step, resource, error, kind}``;
    ``recover()`` retries them."""

class NotFound(Error): ...
class UserNotFound(NotFound):
    """Raised for ``not_found`` at step ``user``."""

class AlreadyExists(Error): ...
class InvalidInput(Error): ...
class Exhausted(Error): ...
class SubnetExhausted(Exhausted):
    """Raised for ``exhausted`` at step ``ip``."""

class Unauthorized(Error): ...
class Conflict(Error): ...
class Unavailable(Error): ...
class Timeout(Error): ...
class Cancelled(Error): ...
class BackendError(Error): ...

# ---- values -------------------------------------------------------------------------

class Vm:
    """A provisioned VM."""

    @property
    def name(self) -> str: ...
    @property
    def fqdn(self) -> str: ...
    @property
    def ip(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def disk(self) -> str: ...
    @property
    def owner(self) -> str: ...
    @property
    def template(self) -> str: ...
    @property
    def created(self) -> datetime.datetime:
        """When provisioning finished (UTC)."""
    @property
    def request_id(self) -> str: ...
    @property
    def bootstrapped(self) -> bool: ...
    def to_dict(self) -> Dict[str, Any]:
        """The serde JSON form of the Rust ``Vm`` (``created`` as an RFC 3339 string)."""
    def __eq__(self, other: object) -> bool: ...

class Event:
    """One progress event of a run."""

    @property
    def type(self) -> str:
        """``run_started``, ``step_started``, ``step_progress``, ``step_finished``,
        ``step_failed``, ``step_undone``, ``undo_failed``, ``left_alone``, ``warning``, ``run_finished``, ``run_failed``."""
    @property
    def request_id(self) -> str: ...
    @property
    def vm(self) -> str:
        """The name of the VM the run is about."""
    @property
    def seq(self) -> int:
        """Position in the run, from 0."""
    @property
    def at(self) -> datetime.datetime: ...
    @property
    def step(self) -> Optional[str]: ...
    @property
    def operation(self) -> Optional[str]:
        """``provision``, ``deprovision`` or ``recover`` (``run_started`` only)."""
    @property
    def message(self) -> Optional[str]: ...
    @property
    def fraction(self) -> Optional[float]: ...
    @property
    def summary(self) -> Optional[str]: ...
    @property
    def result(self) -> Any: ...
    @property
    def error(self) -> Optional[Dict[str, Any]]: ...
    @property
    def failure(self) -> Optional[Dict[str, str]]: ...
    @property
    def provisioned(self) -> Optional[Vm]:
        """The VM made, on the ``run_finished`` event of a provision."""
    @property
    def is_terminal(self) -> bool: ...
    def to_dict(self) -> Dict[str, Any]:
        """The serde JSON form of the Rust ``Event``."""
    def to_json(self) -> str: ...

class RecoveryReport:
    """What ``Provisioner.recover()`` did."""

    @property
    def completed(self) -> List[Vm]: ...
    @property
    def rolled_back(self) -> List[str]:
        """Request ids of provisions rolled back."""
    @property
    def removed(self) -> List[str]:
        """Names of VMs whose interrupted deprovision was finished."""
    @property
    def still_held(self) -> List[Dict[str, str]]: ...
    @property
    def unreadable(self) -> List[Dict[str, str]]:
        """Runs whose journal rows cannot be read (``request_id``, ``vm``, ``error``): left
        exactly as they are."""
    @property
    def is_empty(self) -> bool:
        """Whether there was nothing to recover."""
    def to_dict(self) -> Dict[str, Any]: ...

class Progress:
    """Handed to a Python ``Bootstrapper`` to report progress."""

    def message(self, message: str) -> None: ...
    def fraction(self, message: str, fraction: float) -> None: ...

class Events:
    """Iterator over the events of every run started after ``Provisioner.events()``."""

    def __iter__(self) -> Iterator[Event]: ...
    def __next__(self) -> Event: ...
    def get(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event, waiting at most ``timeout`` seconds; None if none came."""
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> Events: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None: ...

class Provisioner:
    """Provisions and removes developer VMs. Every method releases the GIL."""

    @staticmethod
    def from_config(path: Union[str, os.PathLike[str]], **custom_backends: Any) -> Provisioner:
        """Builds the provisioner a TOML config describes; ``users=``, ``placement=``,
        ``ip=``, ``dns=``, ``images=``, ``hypervisor=``, ``bootstrap=`` supply Python
        backends (``devvm.backends``)."""
    def provision(
        self,
        user: str,
        name: Optional[str] = None,
        template: Optional[str] = None,
        vcpus: Optional[int] = None,
        memory_mib: Optional[int] = None,
        disk_gib: Optional[int] = None,
        on_event: Optional[Callable[[Event], object]] = None,
        request_id: Optional[str] = None,
        memory_mb: Optional[int] = None,
        disk_gb: Optional[int] = None,
    ) -> Vm:
        """Provisions a VM for ``user``. Each size field left out comes from the
        config's ``[defaults]``. ``memory_mb``/``disk_gb`` are the old names of
        ``memory_mib``/``disk_gib``. KeyboardInterrupt cancels and rolls back the run,
        then propagates."""
    def deprovision(self, name: str) -> None: ...
    def migrate(
        self, name: str, to: str, on_event: Optional[Callable[[Event], None]] = None
    ) -> Vm: ...
    def hosts(self) -> List[Dict[str, Any]]: ...
    def drain(self, host: str, dry_run: bool = False) -> List[Dict[str, str]]: ...
    def rebalance(self, dry_run: bool = False) -> List[Dict[str, str]]: ...
    def list(self) -> List[Vm]: ...
    def get_vm(self, name: str) -> Optional[Vm]: ...
    def recover(self) -> RecoveryReport: ...
    def events(self) -> Events: ...
    @property
    def state_dir(self) -> str: ...
    @property
    def backends(self) -> Dict[str, str]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Provisioner: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None: ...

# ---- testkit ------------------------------------------------------------------------

def check_ip_allocator(allocator: Any, capacity: Optional[int] = None, concurrency: int = 4) -> None: ...
def check_dns_updater(dns: Any, addresses: Tuple[str, str]) -> None: ...
def check_user_directory(directory: Any, member: str, outsider: Optional[str] = None) -> None: ...
def check_placement(
    placement: Any,
    capacity: Optional[int] = None,
    vcpus: int = 2,
    memory_mib: int = 5120,
    disk_gib: int = 40,
) -> None: ...
