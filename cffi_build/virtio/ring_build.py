"""cffi build script for the split-virtqueue helpers (index barriers, chain pops, used batches,
mergeable RX gathers; see ring.c, and ring_walk.h for the chain walk it shares with net.c)."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int vr_avail_idx(const uint8_t *avail, size_t len);
    int vr_avail_flags(const uint8_t *avail, size_t len);
    int vr_avail_head(const uint8_t *avail, size_t len, unsigned num, unsigned idx);
    int vr_used_event(const uint8_t *avail, size_t len, unsigned num);
    int vr_used_publish(uint8_t *used, size_t len, unsigned idx);
    int vr_used_idx(const uint8_t *used, size_t len);
    int vr_used_flags_set(uint8_t *used, size_t len, unsigned flags);
    int vr_avail_event_set(uint8_t *used, size_t len, unsigned num, unsigned value);
    int vr_log_mark(uint8_t *log, size_t log_len, uint64_t addr, uint64_t size);

    struct vr_region {
        uint64_t gpa;
        uint64_t size;
        uint8_t *host;
    };
    int vr_pop_chains(const uint8_t *desc, size_t desc_len, const uint8_t *avail,
                      size_t avail_len, unsigned num, unsigned last_avail, unsigned count,
                      int indirect, const struct vr_region *regions, unsigned nregions,
                      uint32_t *chains, unsigned chain_cap, uint64_t *bufs, unsigned buf_cap,
                      uint64_t *status);
    struct vr_pop_ctx {
        const uint8_t *desc;
        size_t desc_len;
        const uint8_t *avail;
        size_t avail_len;
        unsigned num;
        uint32_t *chains;
        unsigned chain_cap;
        uint64_t *bufs;
        unsigned buf_cap;
        uint64_t status[4];
    };
    int vr_pop(struct vr_pop_ctx *ctx, unsigned last_avail, unsigned count, int indirect,
               const struct vr_region *regions, unsigned nregions);
    int vr_used_put_many(uint8_t *used, size_t len, unsigned num, unsigned idx,
                         const uint32_t *elems, unsigned n);
    long vr_read_frames(uintptr_t reader, uintptr_t reader_arg, const struct vr_region *regions,
                        unsigned nregions, const uint64_t *recs, unsigned nrecs,
                        const uint32_t *starts, unsigned nframes, unsigned hdr,
                        unsigned frame_len, unsigned off, uint64_t room, uint32_t *caps);
    int vr_rx_layout(const uint64_t *recs, unsigned nrecs, unsigned from, unsigned need,
                     unsigned hdr, unsigned head, unsigned count, unsigned views, int dry,
                     uint32_t *starts, uint32_t *out);
    int vr_rx_gather(struct vr_pop_ctx *ctx, unsigned last_avail, int indirect,
                     const struct vr_region *regions, unsigned nregions, uint8_t *used,
                     size_t used_len, int rearm, unsigned count, unsigned need, unsigned hdr,
                     unsigned head, unsigned max_views, unsigned hint, uint64_t *recs,
                     uint32_t *chrecs, unsigned cap, uint32_t *starts, uint32_t *out);
    int vr_rx_commit(const struct vr_region *regions, unsigned nregions, const uint64_t *recs,
                     const uint32_t *chains, unsigned nrecs, const uint32_t *starts,
                     unsigned nframes, const uint32_t *lengths, unsigned nlengths,
                     const uint8_t *plain, const uint8_t *gso, uint32_t gso_from, unsigned hdr,
                     uint32_t *elems, uint32_t *spare, uint32_t *tail, uint32_t *counters);
    long vr_rx_fill(struct vr_pop_ctx *ctx, unsigned last_avail, int indirect,
                    const struct vr_region *regions, unsigned nregions, uint8_t *used,
                    size_t used_len, int rearm, unsigned count, unsigned need, unsigned hdr,
                    unsigned head, unsigned max_views, unsigned hint, uint64_t *recs,
                    uint32_t *chrecs, unsigned cap, uintptr_t reader, uintptr_t reader_arg,
                    uint64_t room, uintptr_t writer, uintptr_t writer_arg, const uint8_t *plain,
                    const uint8_t *gso, uint32_t gso_from, uint32_t *elems,
                    uint32_t *spare, uint64_t *out);
    """
)
ffibuilder.set_source(
    "virtio._ring",
    (Path(__file__).parent / "ring.c").read_text(),
    include_dirs=[str(Path(__file__).parent)],  # ring_walk.h, guest_mem.h
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
