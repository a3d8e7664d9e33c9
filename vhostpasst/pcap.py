"""pcap capture of every frame on the guest link, both directions (classic libpcap format)."""
# Placeholder signature; the real writer is built with the links.


class PcapWriter:
    def write(self, frame: bytes | bytearray | memoryview) -> None:  # pragma: no cover
        raise NotImplementedError
