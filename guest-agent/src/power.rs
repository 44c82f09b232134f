//! Powering the node off.

use nix::sys::reboot::{reboot, RebootMode};
use nix::unistd::sync;

/// Flushes file systems, then resets the machine: nodes boot with
/// `reboot=k`, so the reset reaches the VMM, which then exits. Returns only
/// if the reset is refused.
pub fn power_off() {
    sync();
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("pmivmm-agent: cannot reset the node: {e}");
}
