"""Whole-process behaviour: Ctrl-C during a provision, and clean interpreter exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import devvm
from conftest import write_memory_config
from helpers import PyDns

HERE = Path(__file__).resolve().parent

SLOW_PROVISION = textwrap.dedent(
    """
    import json, signal, sys, threading, time
    import devvm
    from helpers import PyDns

    # Ctrl-C raises KeyboardInterrupt, whatever this process inherited: a shell starts
    # background jobs with SIGINT ignored, and Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    class SlowDns(PyDns):
        # publish blocks until released: the provision hangs at the dns step.
        def __init__(self):
            super().__init__("slow.example")
            self.release = threading.Event()
        def publish(self, vm, ip):
            print("PUBLISHING", flush=True)
            self.release.wait(60)
            raise devvm.Unavailable("released")

    dns = SlowDns()
    p = devvm.Provisioner.from_config(sys.argv[1], dns=dns)
    events = []
    start = time.monotonic()
    try:
        p.provision("alice", name="ki-vm", on_event=events.append)
    except KeyboardInterrupt:
        dns.release.set()
        print(json.dumps({
            "interrupted": True,
            "seconds": time.monotonic() - start,
            "vms": [vm.name for vm in p.list()],
            "dns": dns.records(),
            "last_event": events[-1].to_dict(),
            "undone": sorted(e.step for e in events if e.type == "step_undone"),
        }), flush=True)
        raise
    print(json.dumps({"interrupted": False}), flush=True)
    """
)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return env


def test_keyboard_interrupt_cancels_and_rolls_back(tmp_path: Path) -> None:
    cfg = write_memory_config(tmp_path, custom=("dns",))
    script = tmp_path / "slow.py"
    script.write_text(SLOW_PROVISION)
    child = subprocess.Popen(
        [sys.executable, str(script), str(cfg)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "PUBLISHING", (line, child.stderr.read() if child.stderr else "")
        # The provision now hangs in the dns step: the lease, the slot, the disk are held.
        assert json.loads((tmp_path / "ip.json").read_text()) != {}
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["interrupted"] is True, (out, err)
    # KeyboardInterrupt was raised again after the rollback: python's exit code for it.
    assert child.returncode in (-signal.SIGINT, 130, 1), (child.returncode, err)
    assert "KeyboardInterrupt" in err
    assert report["seconds"] < 30
    assert report["vms"] == []
    assert report["dns"] == {"forward": {}, "ptr": {}}
    assert report["last_event"]["type"] == "run_failed"
    assert report["last_event"]["error"]["kind"] == "cancelled"
    assert "ip" in report["undone"] and "placement" in report["undone"]

    # Nothing is held: every state file of the reference backends is empty, and a new
    # provisioner finds nothing to recover.
    for name in ("ip.json", "placement.json", "disks.json", "domains.json"):
        f = tmp_path / name
        if f.exists():
            assert json.loads(f.read_text()) in ({}, []), (name, f.read_text())
    p = devvm.Provisioner.from_config(cfg, dns=PyDns("slow.example"))
    assert p.list() == []
    assert p.recover().is_empty


QUICK = textwrap.dedent(
    """
    import sys, threading
    import devvm
    from helpers import PyDns, PyIpam

    n = int(sys.argv[2])
    ipam = PyIpam(["10.20.0.9", "10.20.0.10"], 28, "10.20.0.1")
    p = devvm.Provisioner.from_config(sys.argv[1], ip=ipam, dns=PyDns("quick.example"))
    it = p.events()                       # left open on purpose
    vm = p.provision("alice", name=f"quick-{n}")
    assert [v.name for v in p.list()] == [vm.name]
    p.deprovision(vm.name)
    assert p.list() == []
    # A background thread still blocked in an events iterator at exit.
    threading.Thread(target=lambda: list(p.events()), daemon=True).start()
    print("ok", n)
    """
)


def test_twenty_fresh_interpreters_exit_cleanly(tmp_path: Path) -> None:
    cfg = write_memory_config(tmp_path, custom=("ip", "dns"))
    script = tmp_path / "quick.py"
    script.write_text(QUICK)
    for n in range(20):
        r = subprocess.run(
            [sys.executable, str(script), str(cfg), str(n)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            env=child_env(),
        )
        assert r.returncode == 0, (n, r.returncode, r.stdout, r.stderr)
        assert r.stdout.strip() == f"ok {n}", (n, r.stdout, r.stderr)
        assert "panicked" not in r.stderr and "Fatal" not in r.stderr, r.stderr
