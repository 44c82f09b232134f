//! Builds a node VM on KVM: guest RAM, in-kernel irqchip and PIT, the kernel,
//! initrd, command line and boot structures, one vCPU in 64-bit mode, and the
//! legacy devices.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use linux_loader::loader::{elf::Elf, load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot_params::{self, build_boot_params, initrd_address, rng_seed_setup_data, BootInfo};
use crate::arch::layout::{self, ports};
use crate::arch::{gdt, paging, regs};
use crate::cmdline;
use crate::config::VmConfig;
use crate::devices::cmos::Cmos;
use crate::devices::i8042::I8042;
use crate::devices::pv::{self, PvInterface};
use crate::devices::serial::{ConsoleSink, EventFdTrigger, SerialDevice};
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::p9::{self, P9Thread};
use crate::devices::virtio::vsock::{self, VsockThread};
use crate::devices::virtio::VirtioDevice;
use crate::devices::{BusError, MmioBus, PortIoBus};

/// Smallest guest RAM that boots our kernel with its initramfs.
pub const MIN_MEM_MIB: u64 = 64;

/// Errors while building the VM. The messages are meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm does not exist: this machine has no KVM (enable virtualization or load the kvm module)")]
    NoKvm,
    #[error("no permission to open /dev/kvm: run as root or add your user to the group that owns /dev/kvm")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("this host's KVM lacks {0}, which pmivmm needs")]
    MissingCapability(&'static str),
    #[error("KVM call {call} failed: {source}")]
    Kvm { call: &'static str, source: kvm_ioctls::Error },
    #[error("guest memory of {mem_mib} MiB is out of range (at least {MIN_MEM_MIB} MiB)")]
    BadMemorySize { mem_mib: u64 },
    #[error("guest memory of {mem_mib} MiB is more than this host has ({host_mib} MiB)")]
    MoreMemoryThanHost { mem_mib: u64, host_mib: u64 },
    #[error("cannot allocate {mem_mib} MiB of guest memory: {reason}")]
    Memory { mem_mib: u64, reason: String },
    #[error("kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("initrd {path}: {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error(transparent)]
    BootParams(#[from] boot_params::Error),
    #[error(transparent)]
    Cmdline(#[from] cmdline::Error),
    #[error("writing boot data into guest memory: {0}")]
    GuestWrite(#[from] vm_memory::GuestMemoryError),
    #[error("setting up devices: {0}")]
    Devices(#[from] BusError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("setting up a virtio device: {0}")]
    Virtio(#[from] mmio::Error),
    #[error(transparent)]
    Vsock(#[from] vsock::Error),
    #[error(transparent)]
    Share(#[from] p9::Error),
}

type Result<T> = std::result::Result<T, Error>;

fn kvm_err(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { call, source }
}

/// A built, not yet running node VM.
pub struct Vm {
    /// Kept open for the VM's lifetime (KVM system fd).
    _kvm: Kvm,
    /// The VM; devices added later register ioeventfds/irqfds on it.
    pub fd: VmFd,
    pub memory: GuestMemoryMmap,
    pub vcpu: VcpuFd,
    pub pio: Arc<PortIoBus>,
    pub mmio: Arc<MmioBus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The paravirtual page-clearing interface, when offered.
    pub pv: Option<Arc<Mutex<PvInterface>>>,
    /// The vsock device thread, when the VM has vsock; dropping it stops the
    /// thread and removes the socket file.
    pub vsock: Option<VsockThread>,
    /// The virtio-9p share's device thread, when the VM has a share.
    pub share: Option<P9Thread>,
    /// The kernel command line the guest got.
    pub cmdline: String,
}

/// Opens /dev/kvm with an error message that says what to do.
pub fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => Error::NoKvm,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::OpenKvm(e),
    })
}

/// Builds the VM described by `config`, with the console going to `console`.
pub fn build(config: &VmConfig, console: ConsoleSink) -> Result<Vm> {
    let mem_size = config
        .mem_mib
        .checked_mul(1 << 20)
        .filter(|_| config.mem_mib >= MIN_MEM_MIB)
        .ok_or(Error::BadMemorySize { mem_mib: config.mem_mib })?;
    let host_mib = host_memory_mib();
    if config.mem_mib > host_mib {
        return Err(Error::MoreMemoryThanHost { mem_mib: config.mem_mib, host_mib });
    }
    // Open the images before touching KVM so that a typo fails fast and clearly.
    let mut kernel = open_image(&config.kernel).map_err(|reason| Error::Kernel { path: config.kernel.clone(), reason })?;
    let mut initrd = open_image(&config.initrd).map_err(|reason| Error::Initrd { path: config.initrd.clone(), reason })?;

    let kvm = open_kvm()?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCapability(name));
        }
    }
    let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let memory = create_memory(&fd, mem_size, config.mem_mib)?;

    fd.set_tss_address(layout::KVM_TSS_ADDR as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    fd.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

    // Kernel, initrd, command line, boot structures.
    let loaded = Elf::load(&memory, None, &mut kernel, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(|e| Error::Kernel {
            path: config.kernel.clone(),
            reason: format!(
                "{e} (pmivmm boots an uncompressed ELF vmlinux, as built by kernel-config/build.sh; \
                 a bzImage will not do)"
            ),
        })?;
    let initrd_size = initrd
        .metadata()
        .map_err(|e| Error::Initrd { path: config.initrd.clone(), reason: e.to_string() })?
        .len();
    let initrd_addr = initrd_address(mem_size, initrd_size, loaded.kernel_end)?;
    memory
        .read_exact_volatile_from(GuestAddress(initrd_addr), &mut initrd, initrd_size as usize)
        .map_err(|e| Error::Initrd { path: config.initrd.clone(), reason: e.to_string() })?;

    // Virtio devices, announced on the command line.
    let mut mmio = MmioBus::default();
    let mut virtio = Vec::new();
    let vsock = match &config.vsock {
        Some(vc) => {
            if !kvm.check_extension(Cap::Ioeventfd) {
                return Err(Error::MissingCapability("ioeventfd (KVM_CAP_IOEVENTFD)"));
            }
            let (device, thread) = vsock::create(vc)?;
            virtio.push(add_virtio_device(&fd, &memory, &mut mmio, virtio.len(), Box::new(device))?);
            tracing::info!("vsock: guest CID {}, host socket {}", vc.guest_cid, vc.socket_path.display());
            Some(thread)
        }
        None => None,
    };
    let mut extra_cmdline = config.extra_cmdline.clone();
    let share = match &config.share {
        Some(sc) => {
            if !kvm.check_extension(Cap::Ioeventfd) {
                return Err(Error::MissingCapability("ioeventfd (KVM_CAP_IOEVENTFD)"));
            }
            let (device, thread) = p9::create(sc)?;
            virtio.push(add_virtio_device(&fd, &memory, &mut mmio, virtio.len(), Box::new(device))?);
            // /init mounts the share at the same path when it sees these.
            extra_cmdline = format!("{} {}", p9::cmdline_args(sc)?, extra_cmdline);
            tracing::info!("share: {} (9p tag {})", sc.host_dir.display(), sc.tag);
            Some(thread)
        }
        None => None,
    };

    // The boot vCPU (created before the command line, which carries its TSC
    // rate on kvm_pvm).
    let vcpu = fd.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let host_compat = config.host_compat.enabled();
    let compat = if host_compat {
        cmdline::HostCompat::On { tsc_khz: vcpu.get_tsc_khz().ok() }
    } else {
        cmdline::HostCompat::Off
    };
    let line = cmdline::build(compat, &virtio, &extra_cmdline)?;
    let kcmdline = linux_loader::cmdline::Cmdline::try_from(&line, layout::CMDLINE_MAX_SIZE)
        .map_err(|e| Error::Kernel { path: config.kernel.clone(), reason: format!("command line: {e}") })?;
    load_cmdline(&memory, GuestAddress(layout::CMDLINE_ADDR), &kcmdline)
        .map_err(|e| Error::Kernel { path: config.kernel.clone(), reason: format!("command line: {e}") })?;

    memory.write_slice(&rng_seed_setup_data(&random_seed()), GuestAddress(layout::SETUP_DATA_ADDR))?;
    let params = build_boot_params(&BootInfo {
        mem_size,
        cmdline_size: line.len() as u32 + 1,
        initrd: Some((initrd_addr, initrd_size as u32)),
        setup_data: Some(layout::SETUP_DATA_ADDR),
    });
    memory.write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))?;
    memory.write_slice(&gdt::gdt_bytes(), GuestAddress(layout::GDT_ADDR))?;
    memory.write_slice(&paging::identity_page_tables(), GuestAddress(layout::PML4_ADDR))?;

    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    regs::setup_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs::boot_regs(loaded.kernel_load.0)).map_err(kvm_err("KVM_SET_REGS"))?;

    // Legacy devices.
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    fd.register_irqfd(&serial_irq, ports::SERIAL_COM1_IRQ).map_err(kvm_err("KVM_IRQFD"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(EventFdTrigger(serial_irq), console)));
    let mut pio = PortIoBus::default();
    pio.insert(ports::SERIAL_COM1, 8, serial.clone())?;
    pio.insert(ports::I8042_DATA, ports::I8042_COMMAND - ports::I8042_DATA + 1, Arc::new(Mutex::new(I8042)))?;
    pio.insert(ports::CMOS_INDEX, 2, Arc::new(Mutex::new(Cmos::default())))?;
    // Paravirtual page clearing and copying, only where guest kernel code is
    // emulated: on hardware KVM the guest does it faster than an exit costs.
    let pv = (host_compat && config.paravirt_memory).then(|| Arc::new(Mutex::new(PvInterface::new(memory.clone()))));
    if let Some(pv) = &pv {
        pio.insert(pv::PORT, pv::PORT_LEN, pv.clone())?;
    }

    Ok(Vm {
        _kvm: kvm,
        fd,
        memory,
        vcpu,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        serial,
        pv,
        vsock,
        share,
        cmdline: line,
    })
}

/// Puts virtio device number `index` on the MMIO bus with its window and
/// interrupt line from the layout, queue notifications as ioeventfds and the
/// interrupt as an irqfd; returns what the command line must announce.
fn add_virtio_device(
    fd: &VmFd,
    memory: &GuestMemoryMmap,
    bus: &mut MmioBus,
    index: usize,
    device: Box<dyn VirtioDevice>,
) -> Result<cmdline::VirtioMmioDevice> {
    let slot = cmdline::VirtioMmioDevice {
        base: layout::VIRTIO_MMIO_BASE + index as u64 * layout::VIRTIO_MMIO_SIZE,
        size: layout::VIRTIO_MMIO_SIZE,
        irq: layout::VIRTIO_IRQ_BASE + index as u32,
    };
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    fd.register_irqfd(&irqfd, slot.irq).map_err(kvm_err("KVM_IRQFD"))?;
    let transport = MmioTransport::new(memory.clone(), device, irqfd)?;
    let notify = IoEventAddress::Mmio(slot.base + mmio::QUEUE_NOTIFY_OFFSET);
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        fd.register_ioevent(evt, &notify, queue as u32).map_err(kvm_err("KVM_IOEVENTFD"))?;
    }
    bus.insert(slot.base, slot.size, Arc::new(Mutex::new(transport)))?;
    Ok(slot)
}

fn open_image(path: &Path) -> std::result::Result<File, String> {
    File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "not found (build it with the README's setup command)".to_owned(),
        _ => e.to_string(),
    })
}

fn create_memory(fd: &VmFd, mem_size: u64, mem_mib: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| Error::Memory { mem_mib, reason: e.to_string() })?;
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory { mem_mib, reason: e.to_string() })?;
        let mr = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `memory`, which the `Vm`
        // keeps for as long as the VM fd (and so the slot) exists.
        unsafe { fd.set_user_memory_region(mr) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(memory)
}

/// Physical memory of the host, in MiB (u64::MAX if unknown).
fn host_memory_mib() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page_size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    match (u64::try_from(pages), u64::try_from(page_size)) {
        (Ok(p), Ok(s)) if p > 0 && s > 0 => p.saturating_mul(s) >> 20,
        _ => u64::MAX,
    }
}

/// 64 random bytes for the guest's RNG seed.
fn random_seed() -> [u8; boot_params::RNG_SEED_LEN] {
    let mut seed = [0u8; boot_params::RNG_SEED_LEN];
    // SAFETY: getrandom writes at most seed.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != seed.len() as isize {
        tracing::warn!("getrandom failed; the guest RNG seed is not random");
    }
    seed
}
