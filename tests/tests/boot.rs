//! A node VM boots to a running guest agent; guest failures and bad input
//! give the documented exit codes and clear errors.

use std::time::Duration;

use pmivmm_tests::{reference, run_pmivmm, scratch_dir, Node, BOOT_TIMEOUT};

#[test]
fn node_boots_to_a_ready_agent_and_stops_cleanly() {
    let mut node = Node::start("boot-ready", &["--timeout", "600"]);
    let name = node.name.clone();
    node.wait_console("pmivmm-agent ready version=", BOOT_TIMEOUT);
    // The VMM logs the ready time on its next supervision tick.
    let start = std::time::Instant::now();
    while !node.vmm_log().contains("guest agent ready after") {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", node.vmm_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (st, out, err) = run_pmivmm(&["nodes"]);
    assert!(st.success(), "{err}");
    let line = out.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("{name} not in:\n{out}"));
    assert!(line.contains(" ready "), "{line}");
    let (st, _, err) = run_pmivmm(&["stop", "--node", &name]);
    assert!(st.success(), "{err}");
    let status = node.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", node.vmm_log());
    assert!(node.vmm_log().contains("the guest powered off"), "{}", node.vmm_log());
    let (_, out, _) = run_pmivmm(&["nodes"]);
    assert!(!out.contains(&name), "{name} still listed after stop:\n{out}");
}

/// The paravirtual memory interface (the VMM clears pages, does the guest
/// kernel's large memcpy/memset and writes runs of struct pages,
/// kernel-config/patches/0003, 0004, 0013) and the guest kernel's own code
/// give the same results: the binaries unpacked from the initramfs (every
/// byte copied into the page cache by memcpy) match the host's, workloads
/// that fill and check patterned memory (in huge pages, whose tail struct
/// pages the VMM prepares and releases, one after the other so that freed
/// frames are reused) give the same output, and the kernel counts the same
/// RAM (the memmap the VMM initialised at boot, all of it freed to the
/// buddy allocator), on a node with the interface and on one without it
/// (the fallback). Where it is offered (kvm_pvm), the VMM really served the
/// guest.
#[test]
fn paravirtual_memory_and_the_guests_own_code_agree() {
    let mut pv = Node::start("boot-pv", &["--timeout", "900"]);
    let mut plain = Node::start("boot-nopv", &["--timeout", "900", "--no-paravirt-memory"]);
    pv.wait_console("pmivmm-agent ready", BOOT_TIMEOUT);
    plain.wait_console("pmivmm-agent ready", BOOT_TIMEOUT);
    let host_busybox = std::process::Command::new("md5sum").arg("/bin/busybox").output().unwrap();
    let host_busybox = String::from_utf8_lossy(&host_busybox.stdout).split(' ').next().unwrap().to_owned();
    let check = "sh -c 'md5sum /bin/busybox /sbin/pmivmm-agent /bin/pmivmm-workloads && memory 8 3 && memory 2 3 \
                 && grep MemTotal /proc/meminfo'";
    let (code, with_pv) = reference(&pv.name, check);
    assert_eq!(code, 0, "{with_pv}");
    let (code, without) = reference(&plain.name, check);
    assert_eq!(code, 0, "{without}");
    assert_eq!(with_pv, without);
    assert!(with_pv.starts_with(&host_busybox), "busybox in the guest differs from the host's:\n{with_pv}");
    assert!(with_pv.contains("pass 3 ok") && with_pv.contains("MemTotal:"), "{with_pv}");
    for node in [&mut pv, &mut plain] {
        let (st, _, err) = run_pmivmm(&["stop", "--node", &node.name]);
        assert!(st.success(), "{err}");
        assert_eq!(node.wait_exit(Duration::from_secs(60)).code(), Some(0), "{}", node.vmm_log());
    }
    assert!(!plain.vmm_log().contains("paravirtual memory:"), "{}", plain.vmm_log());
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        let log = pv.vmm_log();
        let line = log.lines().find(|l| l.contains("paravirtual memory:")).unwrap_or_else(|| panic!("{log}"));
        let numbers: Vec<u64> = line.split_whitespace().filter_map(|w| w.trim_start_matches('(').parse().ok()).collect();
        // cleared N guest pages, made M copies (K KiB) and S strided stores (E elements)
        assert!(numbers.len() >= 5 && numbers[0] > 0 && numbers[1] > 0 && numbers[3] > 0, "{line}");
    }
}

#[test]
fn a_second_node_with_the_same_name_is_refused() {
    let first = Node::start("boot-dup", &["--timeout", "120"]);
    let name = first.name.clone();
    // The control socket exists as soon as the VMM has built the VM.
    let start = std::time::Instant::now();
    while !run_pmivmm(&["nodes"]).1.contains(&name) {
        assert!(start.elapsed() < Duration::from_secs(30), "{}", first.vmm_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (st, _, err) = run_pmivmm(&["--node", "--name", &name, "--timeout", "5"]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("already running"), "{err}");
    drop(first);
}

#[test]
fn guest_kernel_panic_exits_with_code_2() {
    // /bin/false as init exits at once: "Attempted to kill init!", a panic,
    // and with panic=-1 an immediate reset.
    let mut node = Node::start("boot-panic", &["--cmdline", "rdinit=/bin/false", "--timeout", "600"]);
    let status = node.wait_exit(BOOT_TIMEOUT);
    assert_eq!(status.code(), Some(2), "console:\n{}\nlog:\n{}", node.console(), node.vmm_log());
    assert!(node.console().contains("Kernel panic"));
    assert!(node.vmm_log().contains("panicked"));
}

#[test]
fn bad_node_names_are_refused() {
    let (st, _, err) = run_pmivmm(&["--node", "--name", "../etc"]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("invalid node name"), "{err}");
}

#[test]
fn timeout_stops_the_node_with_code_124() {
    // Stops long before the guest gets far; proves the vCPU can be kicked.
    let mut node = Node::start("boot-timeout", &["--timeout", "2"]);
    let status = node.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(124), "{}", node.vmm_log());
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let (st, _, err) = run_pmivmm(&["--node", "--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("/nonexistent/vmlinux") && err.contains("not found"), "{err}");
}

#[test]
fn a_kernel_that_is_not_elf_is_refused() {
    let dir = scratch_dir("not-elf");
    let bogus = dir.join("bzImage");
    std::fs::write(&bogus, vec![0x4du8; 8192]).unwrap();
    let (st, _, err) = run_pmivmm(&["--node", "--kernel", bogus.to_str().unwrap()]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("ELF vmlinux"), "{err}");
}

#[test]
fn bad_memory_sizes_are_refused() {
    let (st, _, err) = run_pmivmm(&["--node", "--mem", "lots"]);
    assert_ne!(st.code(), Some(0));
    assert!(err.contains("memory size"), "{err}");
    let (st, _, err) = run_pmivmm(&["--node", "--mem", "1M"]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("at least"), "{err}");
    let (st, _, err) = run_pmivmm(&["--node", "--mem", "100000G"]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("more than this host has"), "{err}");
}

#[test]
fn too_long_command_line_is_refused() {
    let long = "x".repeat(3000);
    let (st, _, err) = run_pmivmm(&["--node", "--cmdline", &long]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("command line"), "{err}");
}
