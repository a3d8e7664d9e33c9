"""The core: the event loop, flow table, NAT, logging, pcap."""
