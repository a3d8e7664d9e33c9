"""The protocols: ICMP echo, UDP, TCP between guest frames and host sockets."""
