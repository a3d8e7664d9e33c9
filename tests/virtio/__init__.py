"""Tests of the virtio/ vhost-user back-end library (no networking: socketpairs only)."""
