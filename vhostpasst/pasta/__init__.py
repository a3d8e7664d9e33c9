"""pasta mode: namespaces, the splice paths, port scanning."""
