//! The handler of system calls a filter refuses (`SECCOMP_RET_TRAP`): it
//! makes the call return `-ENOSYS` and writes a line naming the call's
//! number and thread on stderr, then the thread carries on and the caller
//! reports the error its own way. Only async-signal-safe work here: no
//! allocation, no locks, one `write(2)`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Refused calls so far.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// How many calls the filters refused so far.
pub fn refused() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Offset of `si_syscall` in `siginfo_t` on x86_64: after `si_signo`,
/// `si_errno`, `si_code` (padded to 16 bytes) and `si_call_addr` (8).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS from seccomp,
    // whose `_sigsys` member holds the call number at this offset.
    let nr = unsafe { info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>().read_unaligned() };
    // SAFETY: with SA_SIGINFO the third argument is the interrupted
    // thread's ucontext_t; rax holds the system call's return value when
    // the thread resumes.
    unsafe {
        let uc = context.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::ENOSYS);
    }
    REFUSED.fetch_add(1, Ordering::Relaxed);
    let mut line = Line::default();
    line.push(b"pmivmm: seccomp refused system call ");
    line.number(i64::from(nr));
    line.push(b" in thread ");
    // SAFETY: gettid has no preconditions (and every filter allows it).
    line.number(i64::from(unsafe { libc::gettid() }));
    line.push(b" (it returned ENOSYS; `ausyscall NR` names it; run the node with --seccomp log to find all)\n");
    // SAFETY: writes our stack buffer to stderr; a failed write is ignored.
    unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
}

/// A fixed buffer that truncates.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line { buf: [0; 192], len: 0 }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

/// Installs the handler for the whole process.
pub fn install() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we fill in the handler and flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t to initialize.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs an async-signal-safe handler for SIGSYS.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
