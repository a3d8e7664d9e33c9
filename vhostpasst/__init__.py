"""vhostpasst: user-mode networking for VMs and namespaces, passt/pasta compatible."""

from vhostpasst.version import VERSION as __version__

__all__ = ["__version__"]
