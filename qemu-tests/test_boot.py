"""Smoke: the image boots under qemu and its shell answers on the serial console."""

from __future__ import annotations

from harness import Guest


def test_boot_shell(guest: Guest) -> None:
    rc, out = guest.run("echo hello from $(uname -r)")
    assert rc == 0
    assert out.startswith("hello from 6.")
    rc, out = guest.run("false", check=False)
    assert rc == 1 and out == ""
    # The virtio-net driver stack is there, as modules (Debian 12) or built in (Debian 13's
    # virtio_pci): /sys/module lists both kinds. The NIC itself is absent here: -nic none.
    _, mods = guest.run("ls /sys/module")
    assert "virtio_net" in mods.split() and "virtio_pci" in mods.split()
