"""devvm: provision a developer VM with one call.

A :class:`Provisioner` runs the pipeline of the "deploy on day one" button: check the
user in the directory, pick a host, lease an IP address, publish DNS A and PTR records,
make the VM's disk from a cached template, define and start the VM, and bootstrap
configuration management. A failure undoes every step that acted; a journal lets
:meth:`Provisioner.recover` clean up after a crash.

This package is a thin binding of the Rust crate ``devvm-core``: every call blocks the
calling thread with the GIL released, so other Python threads keep running.

    import devvm

    p = devvm.Provisioner.from_config("devvm.toml")
    vm = p.provision("alice", on_event=lambda e: print(e.type, e.step or "", e.summary or ""))
    print(vm.fqdn, vm.ip)
    p.deprovision(vm.name)

Events: pass ``on_event`` to :meth:`Provisioner.provision` (called on the calling thread,
in order, for that run), or iterate ``p.events()`` (every run started after the call, from
any thread; ends when closed). ``event.to_dict()`` is the serde JSON form of the Rust
``Event``.

Errors: every failure raises a subclass of :class:`Error` (one per kind) carrying
``kind``, ``step``, ``retryable``, ``backend``, ``message``, ``cause`` and
``undo_failures``.

Ctrl-C (KeyboardInterrupt) during ``provision`` cancels the run, rolls it back, then
raises KeyboardInterrupt. Custom backends written in Python: see :mod:`devvm.backends`;
their conformance suites: :mod:`devvm.testkit`.
"""

import atexit as _atexit

from . import _devvm
from ._devvm import (
    FEATURES,
    AlreadyExists,
    BackendError,
    Cancelled,
    Conflict,
    Error,
    Event,
    Events,
    Exhausted,
    InvalidInput,
    NotFound,
    Progress,
    Provisioner,
    RecoveryReport,
    SubnetExhausted,
    Timeout,
    Unauthorized,
    Unavailable,
    UserNotFound,
    Vm,
    __version__,
)

# The native module owns one tokio runtime; stop it (waiting, GIL released, for work in
# flight) before the interpreter finalizes, so no runtime thread touches a dying
# interpreter.
_atexit.register(_devvm._shutdown)

__all__ = [
    "FEATURES",
    "AlreadyExists",
    "BackendError",
    "Cancelled",
    "Conflict",
    "Error",
    "Event",
    "Events",
    "Exhausted",
    "InvalidInput",
    "NotFound",
    "Progress",
    "Provisioner",
    "RecoveryReport",
    "SubnetExhausted",
    "Timeout",
    "Unauthorized",
    "Unavailable",
    "UserNotFound",
    "Vm",
    "__version__",
]
