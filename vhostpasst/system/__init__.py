"""The operating system: netlink, namespaces, isolation, the sandbox, syscalls."""
