"""The control socket (-c/--conf-path) and its client: run-time forwarding changes and the
flow query. server.py has the theory of operation; protocol.py the wire format; rules.py the
rules; forwarder.py the transaction that switches listeners; flows.py the flow query;
wiring.py builds it all for a daemon; client.py is `vhostpasst-pesto` (which imports only
rules and protocol, so that it starts quickly)."""
