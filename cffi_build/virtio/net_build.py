"""cffi build script for virtio-net's guest TX path (`virtio._net`, see net.c): the one-call TX
gather and its frame finder. It includes virtio._ring's declarations (ffi.include), so the
ring context and the region table virtio/ring.py made are passed as they are, no cast."""

import importlib.util
from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("ring_build", _HERE / "ring_build.py")
assert _spec is not None and _spec.loader is not None
_ring_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ring_build)

ffibuilder = FFI()
ffibuilder.include(_ring_build.ffibuilder)  # struct vr_region, struct vr_pop_ctx
ffibuilder.cdef(
    """
    int vr_tx_frames(const struct vr_region *regions, unsigned nregions,
                     const uint32_t *chains, unsigned nchains, const uint64_t *bufs,
                     unsigned nbufs, unsigned hdr, uint64_t max_frame, uint8_t *hdrs,
                     uint8_t *bounce, size_t bounce_len, uint64_t *out);
    int vr_tx_gather(struct vr_pop_ctx *ctx, unsigned last_avail, unsigned count, int indirect,
                     const struct vr_region *regions, unsigned nregions, uint8_t *used,
                     size_t used_len, int rearm, unsigned hdr, uint64_t max_frame,
                     uint8_t *hdrs, uint8_t *bounce, size_t bounce_len, uint64_t *out,
                     uint32_t *res);
    int vr_tx_offer(uintptr_t consumer, uintptr_t consumer_end, uintptr_t arg,
                    uint64_t offloads, const struct vr_region *regions, unsigned nregions,
                    const uint8_t *hdrs, unsigned hdr, const uint8_t *bounce,
                    size_t bounce_len, uint64_t *out, unsigned n);
    """
)
ffibuilder.set_source(
    "virtio._net",
    (_HERE / "net.c").read_text(),
    include_dirs=[str(_HERE)],  # ring_walk.h, guest_mem.h
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
