//! The program a restore builds its process in: a static x86-64 ELF of one
//! page, made in memory and started from a sealed memfd with `posix_spawn`.
//!
//! It closes every descriptor above 2, asks to be traced and stops itself;
//! from then on it runs only syscalls the agent injects. A stub instead of
//! a fork of the agent: `posix_spawn` does not copy the agent's address
//! space and the stub has almost none to unmap afterwards. In the emulated
//! guest kernel of the development hosts, fork plus unmapping the agent's
//! address space took 0.9-1.6 s of every restore, starting the stub 0.35 s.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use nix::errno::Errno;

use super::inject::find_syscall_insn;
use crate::spawn::{posix_spawn, Attributes, FileActions, Signals};

/// Where the stub's one segment is loaded (a non-PIE executable).
const LOAD_ADDR: u64 = 0x40_0000;
const ELF_HEADER_LEN: usize = 64;
const PROGRAM_HEADER_LEN: usize = 56;
/// The code follows the two headers.
const CODE_OFFSET: usize = ELF_HEADER_LEN + PROGRAM_HEADER_LEN;

/// The stub's exit status when `PTRACE_TRACEME` failed ...
pub(super) const EXIT_TRACEME_FAILED: i32 = 100;
/// ... and when it was resumed from its stop instead of taken over.
pub(super) const EXIT_RESUMED: i32 = 101;

/// The stub's code (`as`, Intel syntax):
/// ```text
///   mov edi, 3; mov esi, -1; xor edx, edx; mov eax, 436; syscall  # close_range(3, ~0, 0)
///   xor edi, edi; xor esi, esi; xor edx, edx; xor r10d, r10d
///   mov eax, 101; syscall                                        # ptrace(PTRACE_TRACEME)
///   test rax, rax; jnz 1f
///   mov eax, 39; syscall                                         # getpid()
///   mov edi, eax; mov esi, 19; mov eax, 62; syscall              # kill(pid, SIGSTOP)
///   mov edi, 101; jmp 2f                                         # EXIT_RESUMED
/// 1: mov edi, 100                                                # EXIT_TRACEME_FAILED
/// 2: mov eax, 231; syscall                                       # exit_group
/// ```
/// A failed `close_range` (before Linux 5.9) leaves descriptors without
/// close-on-exec open in the child until the restore replaces its files.
const CODE: [u8; 80] = [
    0xbf, 0x03, 0x00, 0x00, 0x00, 0xbe, 0xff, 0xff, 0xff, 0xff, 0x31, 0xd2, //
    0xb8, 0xb4, 0x01, 0x00, 0x00, 0x0f, 0x05, 0x31, 0xff, 0x31, 0xf6, 0x31, //
    0xd2, 0x45, 0x31, 0xd2, 0xb8, 0x65, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, //
    0x85, 0xc0, 0x75, 0x1c, 0xb8, 0x27, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x89, //
    0xc7, 0xbe, 0x13, 0x00, 0x00, 0x00, 0xb8, 0x3e, 0x00, 0x00, 0x00, 0x0f, //
    0x05, 0xbf, 0x65, 0x00, 0x00, 0x00, 0xeb, 0x05, 0xbf, 0x64, 0x00, 0x00, //
    0x00, 0xb8, 0xe7, 0x00, 0x00, 0x00, 0x0f, 0x05,
];

/// The executable: ELF header, one read+execute `PT_LOAD` segment covering
/// the whole file, the code.
fn elf() -> Vec<u8> {
    let len = (CODE_OFFSET + CODE.len()) as u64;
    let mut f = Vec::with_capacity(len as usize);
    // e_ident: ELF, 64-bit, little-endian, version 1, System V ABI.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&(LOAD_ADDR + CODE_OFFSET as u64).to_le_bytes()); // e_entry
    f.extend_from_slice(&(ELF_HEADER_LEN as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(ELF_HEADER_LEN as u16).to_le_bytes()); // e_ehsize
    f.extend_from_slice(&(PROGRAM_HEADER_LEN as u16).to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    f.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R + X
    f.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    f.extend_from_slice(&len.to_le_bytes()); // p_filesz
    f.extend_from_slice(&len.to_le_bytes()); // p_memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(&CODE);
    f
}

/// The address of a `syscall` instruction in the stopped stub, for the
/// syscalls injected before the restore has a scratch area.
pub(super) fn syscall_insn() -> u64 {
    let at = find_syscall_insn(&CODE).expect("the stub's code holds syscall instructions");
    LOAD_ADDR + (CODE_OFFSET + at) as u64
}

/// The stub in a sealed memfd, opened read-only (a file open for writing
/// cannot be executed), made once per agent.
fn program() -> Result<&'static File, Errno> {
    static PROGRAM: OnceLock<File> = OnceLock::new();
    if let Some(file) = PROGRAM.get() {
        return Ok(file);
    }
    let name = c"pmivmm-restore-stub";
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let mut writable = File::from(unsafe { OwnedFd::from_raw_fd(Errno::result(fd)?) });
    writable.write_all(&elf()).map_err(io_errno)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS on our own memfd with valid seal bits.
    Errno::result(unsafe { libc::fcntl(writable.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    let file = File::open(format!("/proc/self/fd/{}", writable.as_raw_fd())).map_err(io_errno)?;
    drop(writable);
    // Another thread may have made one meanwhile: either does.
    Ok(PROGRAM.get_or_init(|| file))
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Starts the stub with `stdio` as its fds 0-2, every signal blocked and at
/// its default, in the agent's session. Returns its PID; it stops itself
/// under the calling thread's tracing (its exit status tells otherwise:
/// [`EXIT_TRACEME_FAILED`], [`EXIT_RESUMED`]).
pub(super) fn spawn(stdio: [BorrowedFd<'_>; 3]) -> Result<i32, Errno> {
    let program = program()?;
    // dup2 into 0-2 one after the other must not overwrite a source that
    // is still to come: sources below 3 are copied above first.
    let mut copies = Vec::new();
    let mut sources = [0; 3];
    for (source, fd) in sources.iter_mut().zip(stdio) {
        *source = match fd.as_raw_fd() {
            raw if raw < 3 => {
                let copy = fd.try_clone_to_owned().map_err(io_errno)?;
                let raw = copy.as_raw_fd();
                copies.push(copy);
                raw
            }
            raw => raw,
        };
    }
    let mut actions = FileActions::new()?;
    for (target, source) in sources.into_iter().enumerate() {
        actions.dup2(source, target as i32)?;
    }
    let attr = Attributes::new(&Signals::Restore)?;
    let path = CString::new(format!("/proc/self/fd/{}", program.as_raw_fd())).expect("no NUL in a path of digits");
    let argv = [CString::from(c"pmivmm-restore")];
    posix_spawn(&path, &argv, &[], &actions, &attr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_is_one_segment_around_the_code() {
        let elf = elf();
        assert_eq!(elf.len(), CODE_OFFSET + CODE.len());
        assert_eq!(&elf[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert_eq!(entry, LOAD_ADDR + CODE_OFFSET as u64);
        let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
        assert_eq!(phoff, ELF_HEADER_LEN);
        let filesz = u64::from_le_bytes(elf[phoff + 32..phoff + 40].try_into().unwrap());
        assert_eq!(filesz as usize, elf.len());
        assert_eq!(&elf[CODE_OFFSET..], &CODE);
        // The first syscall is close_range, at 0x11 into the code.
        assert_eq!(syscall_insn(), LOAD_ADDR + CODE_OFFSET as u64 + 0x11);
    }
}
