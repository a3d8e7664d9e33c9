"""cffi build script for the sandbox's C: a small binding of libseccomp (API mode, linked
with -lseccomp)."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define SCMP_FLTATR_CTL_TSYNC ...
    #define SCMP_FLTATR_CTL_NNP ...
    #define SCMP_ARCH_X86_64 ...
    static const uint32_t VP_ACT_ALLOW;
    static const uint32_t VP_ACT_KILL_PROCESS;
    uint32_t vp_act_errno(int err);
    void *vp_seccomp_init(uint32_t def_action);
    void vp_seccomp_release(void *ctx);
    int vp_seccomp_allow(void *ctx, int nr, uint32_t action);
    int vp_seccomp_allow_arg(void *ctx, int nr, uint32_t action, unsigned int arg,
                             uint64_t mask, uint64_t value);
    int vp_seccomp_attr_set(void *ctx, int attr, uint32_t value);
    int vp_seccomp_load(void *ctx);
    int vp_seccomp_resolve(const char *name);
    uint32_t vp_seccomp_arch_native(void);
    """
)
ffibuilder.set_source(
    "vhostpasst._seccomp",
    (Path(__file__).parent / "seccomp.c").read_text(),
    libraries=["seccomp"],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
