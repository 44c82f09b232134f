//! x86_64 boot-time building blocks: the guest memory map, GDT, identity page
//! tables, boot_params and the initial vCPU state. Everything here is pure
//! data manipulation, unit tested without KVM; `crate::vm` applies it.

pub mod boot_params;
pub mod gdt;
pub mod layout;
pub mod paging;
pub mod regs;
