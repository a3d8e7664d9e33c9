"""End-to-end tests in network namespaces (root), and their helpers: the sandbox (sandbox.py,
vhost_sandbox.py), the programs it runs in the namespaces (relay.py, vhost_relay.py,
tcp_tool.py) and podman's root (podman_root.py)."""
