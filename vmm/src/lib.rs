//! pmivmm: the VMM of a process-migration cluster node.
//!
//! Layout follows Firecracker and rust-vmm's vmm-reference: pure builders in
//! [`arch`] and [`cmdline`], one device per module in [`devices`], the KVM
//! work in [`vm`] (building) and [`vcpu`] (running), configuration in
//! [`config`], and the node lifecycle in [`node`].

pub mod agent;
pub mod arch;
pub mod bench;
pub mod checkpoint;
pub mod cluster;
pub mod cmdline;
pub mod commands;
pub mod config;
pub mod control;
pub mod fuzz;
pub mod devices;
pub mod guest_ram;
pub mod lab;
pub mod migration;
pub mod node;
pub mod peer;
pub mod profile;
pub mod rundir;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

/// The unit tests measure allocations of fuzz inputs ([`fuzz::alloc`]).
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: fuzz::alloc::Tracking = fuzz::alloc::Tracking;
