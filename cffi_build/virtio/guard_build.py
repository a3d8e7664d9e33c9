"""cffi build script for the back end's guards against a hostile front end: the SIGBUS
handler over guest mappings, non-blocking eventfd reads and watchdog-bounded eventfd writes
(see guard.c and virtio/guard.py)."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int vg_register(uintptr_t start, uintptr_t len, uintptr_t page);
    void vg_unregister(int slot);
    long vg_faults(int slot);
    long vg_events(void);
    int vg_eventfd_drain(int fd);
    int vg_watchdog_init(void);
    int vg_watchdog_signal(void);
    int vg_eventfd_signal(int fd);
    """
)
ffibuilder.set_source(
    "virtio._guard",
    (Path(__file__).parent / "guard.c").read_text(),
    extra_compile_args=["-O2", "-Wall"],
    libraries=["rt"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
