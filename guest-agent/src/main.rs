//! pmivmm-agent: the guest agent of a pmivmm node.
//!
//! It runs as PID 1 of the node VM (the initramfs's /init execs it): it
//! mounts /proc, /sys, /dev and the node's shared directory, reaps every
//! orphan, never exits, and
//! serves the control protocol (pmivmm_proto) on vsock port
//! `AGENT_VSOCK_PORT`. It prints `pmivmm-agent ready version=<version>` on
//! the console once the port is bound, so "ready" means connectable.

use std::io::Write;

use pmivmm_agent::connection::Actions;
use pmivmm_agent::mounts;
use pmivmm_agent::power::power_off;
use pmivmm_agent::priority;
use pmivmm_agent::reaper::reaper;
use pmivmm_agent::server::serve;
use pmivmm_agent::vsock::VsockListener;
use pmivmm_proto::{AGENT_READY_MARKER, AGENT_VSOCK_PORT, VERSION};

fn main() {
    // Before any thread starts: threads inherit the nice value.
    if let Err(e) = priority::raise_agent() {
        eprintln!("pmivmm-agent: cannot raise its priority: {e}");
    }
    // Reap orphans from the start, whatever happens to the channel.
    reaper();
    if let Err(e) = mounts::mount_kernel_filesystems() {
        eprintln!("pmivmm-agent: {e}");
    }
    match mounts::mount_share() {
        Ok(Some(dir)) => println!("pmivmm-agent: share mounted at {dir}"),
        Ok(None) => {}
        Err(e) => eprintln!("pmivmm-agent: {e}"),
    }
    match VsockListener::bind(AGENT_VSOCK_PORT) {
        Ok(listener) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{AGENT_READY_MARKER} version={VERSION}");
            let _ = out.flush();
            drop(out);
            serve(listener, Actions { power_off });
        }
        Err(e) => {
            eprintln!("pmivmm-agent: {e}; running without a control channel");
            // PID 1 must never exit: the reaper thread carries on.
            loop {
                std::thread::park();
            }
        }
    }
}
