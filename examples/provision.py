#!/usr/bin/env python3
"""Provision a VM with live progress, then remove it (the Python face of devvm).

    python examples/provision.py devvm.toml [--user alice] [--name web-1] [--keep]

Needs the ``devvm`` package (``scripts/test-python`` builds and installs it into
``/var/lib/devvm-lab/pyvenv``). Against the lab, run it inside the namespace:

    scripts/lab exec scripts/lab-config > /tmp/devvm.toml
    scripts/lab exec /var/lib/devvm-lab/pyvenv/bin/python examples/provision.py /tmp/devvm.toml

Ctrl-C during the provision cancels it and rolls back whatever it did.
"""

from __future__ import annotations

import argparse
import sys
import time

import devvm


def show(event: devvm.Event) -> None:
    """Prints one event as it arrives (the on_event callback)."""
    step = f"[{event.step}]" if event.step else ""
    if event.type == "run_started":
        line = f"{event.operation} of {event.vm} started"
    elif event.type == "step_progress":
        pct = f" ({event.fraction:.0%})" if event.fraction is not None else ""
        line = f"{event.message}{pct}"
    elif event.type == "step_finished":
        line = f"done: {event.summary}"
    elif event.type in ("step_failed", "run_failed"):
        line = f"FAILED: {event.error['message']} ({event.error['kind']})"
    elif event.type == "undo_failed":
        line = f"still held: {event.failure['resource']}"
    else:
        line = event.type.replace("_", " ")
    print(f"{event.at:%H:%M:%S} {step:<12} {line}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="the devvm TOML config")
    ap.add_argument("--user", default="alice")
    ap.add_argument("--name", default=None)
    ap.add_argument("--keep", action="store_true", help="leave the VM running")
    args = ap.parse_args()

    with devvm.Provisioner.from_config(args.config) as p:
        t0 = time.monotonic()
        try:
            vm = p.provision(args.user, name=args.name, on_event=show)
        except devvm.Error as e:
            print(f"provision failed: {e} (kind={e.kind}, step={e.step}, retryable={e.retryable})", file=sys.stderr)
            for f in e.undo_failures:
                print(f"  still held: {f['resource']} ({f['error']})", file=sys.stderr)
            return 1
        print(f"\n{vm.name}: {vm.fqdn} at {vm.ip} on {vm.host}, owner {vm.owner}, "
              f"template {vm.template} ({time.monotonic() - t0:.1f}s)\n", flush=True)
        if not args.keep:
            p.deprovision(vm.name)
            print(f"{vm.name} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
