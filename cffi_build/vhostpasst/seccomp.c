/* The sandbox's C (vhostpasst/system/sandbox.py): thin wrappers over libseccomp, whose rule call is
 * variadic and whose actions are macros. Each returns what libseccomp returns (-errno). */
#include <seccomp.h>
#include <stdint.h>

static const uint32_t VP_ACT_ALLOW = SCMP_ACT_ALLOW;
static const uint32_t VP_ACT_KILL_PROCESS = SCMP_ACT_KILL_PROCESS;

uint32_t vp_act_errno(int err) { return SCMP_ACT_ERRNO(err); }
void *vp_seccomp_init(uint32_t def_action) { return seccomp_init(def_action); }
void vp_seccomp_release(void *ctx) { seccomp_release(ctx); }
int vp_seccomp_allow(void *ctx, int nr, uint32_t action)
{
	return seccomp_rule_add(ctx, action, nr, 0);
}
/* allowed only when argument `arg` & mask == value (several rules for one call are OR'd) */
int vp_seccomp_allow_arg(void *ctx, int nr, uint32_t action, unsigned int arg,
			 uint64_t mask, uint64_t value)
{
	struct scmp_arg_cmp cmp = { arg, SCMP_CMP_MASKED_EQ, mask, value };

	return seccomp_rule_add_array(ctx, action, nr, 1, &cmp);
}
int vp_seccomp_attr_set(void *ctx, int attr, uint32_t value)
{
	return seccomp_attr_set(ctx, attr, value);
}
int vp_seccomp_load(void *ctx) { return seccomp_load(ctx); }
int vp_seccomp_resolve(const char *name) { return seccomp_syscall_resolve_name(name); }
uint32_t vp_seccomp_arch_native(void) { return seccomp_arch_native(); }
