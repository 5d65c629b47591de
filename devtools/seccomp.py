"""Load a systemd unit's system-call filter into this process with libseccomp, as systemd would: for the
tests that show the hardened units still run the model worker and the quantizer."""

from __future__ import annotations

import ctypes
import ctypes.util


def libseccomp() -> ctypes.CDLL | None:
    found = ctypes.util.find_library("seccomp")
    return ctypes.CDLL(found) if found else None


class _ArgCompare(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def load_unit_seccomp_filters(allowed: list[str]) -> None:
    """Load into this process what systemd 252 loads for `MemoryDenyWriteExecute=yes` (seccomp-util.c:
    refuse mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC) and
    for `SystemCallFilter=` (every system call not in `allowed` fails with EPERM)."""
    lib = libseccomp()
    assert lib is not None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCompare),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    allow, refuse = 0x7FFF0000, 0x00050000 | 1  # SCMP_ACT_ALLOW, SCMP_ACT_ERRNO(EPERM)
    masked_eq = 7  # SCMP_CMP_MASKED_EQ
    prot_write, prot_exec, shm_exec = 0x2, 0x4, 0o100000

    def rule(ctx: int, action: int, name: str, *compares: tuple[int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a system call on this architecture
        array = (_ArgCompare * max(1, len(compares)))(
            *(_ArgCompare(a, masked_eq, m, v) for a, m, v in compares)
        )
        assert lib.seccomp_rule_add_array(ctx, action, number, len(compares), array) == 0, name

    memory = lib.seccomp_init(allow)
    rule(memory, refuse, "mmap", (2, prot_write | prot_exec, prot_write | prot_exec))
    rule(memory, refuse, "mmap2", (2, prot_write | prot_exec, prot_write | prot_exec))
    rule(memory, refuse, "mprotect", (2, prot_exec, prot_exec))
    rule(memory, refuse, "pkey_mprotect", (2, prot_exec, prot_exec))
    rule(memory, refuse, "shmat", (2, shm_exec, shm_exec))
    assert lib.seccomp_load(memory) == 0

    calls = lib.seccomp_init(refuse)
    for name in allowed:
        rule(calls, allow, name)
    assert lib.seccomp_load(calls) == 0
