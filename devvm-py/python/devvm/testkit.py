"""Conformance suites for backends written in Python.

Each function runs devvm-core's Rust conformance suite of one step trait against a
Python object implementing that step's protocol (see :mod:`devvm.backends`), exactly as
the pipeline would call it, and raises ``AssertionError`` naming the first broken
contract. The suites call the object from several threads at once and create and
remove resources with fresh, unique VM names.

    from devvm.testkit import check_ip_allocator
    check_ip_allocator(MyIpam(), capacity=13)
"""

from ._devvm import (
    check_dns_updater,
    check_ip_allocator,
    check_placement,
    check_user_directory,
)

__all__ = [
    "check_dns_updater",
    "check_ip_allocator",
    "check_placement",
    "check_user_directory",
]
