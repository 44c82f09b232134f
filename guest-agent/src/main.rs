//! pmivmm-agent: the guest agent of a pmivmm node.
//!
//! It runs as PID 1 of the node VM (the initramfs's /init execs it after
//! mounting /proc, /sys and /dev). For now it announces itself on the console
//! and reaps orphaned processes, as an init must; the vsock control channel
//! comes next.

use std::io::Write;

fn main() {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{} version={}", pmivmm_proto::AGENT_READY_MARKER, pmivmm_proto::VERSION);
    let _ = out.flush();
    drop(out);
    reap_forever();
}

/// Waits for children forever (PID 1 inherits every orphan). Never returns:
/// if PID 1 exits, the kernel panics.
fn reap_forever() -> ! {
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid on any child with a valid status pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r < 0 {
            // No children yet. PID 1 ignores SIGCHLD by default, so poll
            // (one cheap syscall a second) for orphans reparented to us.
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}
