//! `pmivmm --node --share DIR` with a real node VM: the guest mounts DIR at
//! the same path, runs a static program from it that writes a result the
//! host reads, sees host changes at once (cache=none), and cannot reach
//! host files outside DIR through `..` or symlinks the host planted. A
//! second node, started in DIR without `--share` (the default share is the
//! working directory), sees the first one's writes at once and the other
//! way round. Two nodes, booted together, for the whole file (a boot costs
//! ~45 s on the development hosts).

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;
use std::process::Command;

use pmivmm_tests::{run_pmivmm, scratch_dir, Node, BOOT_TIMEOUT};

/// A static C program: writes the sum 1..=n and its argv[0] into result.txt
/// in its working directory.
const PROG: &str = r#"
#include <stdio.h>
int main(int argc, char **argv) {
    unsigned long long s = 0;
    for (unsigned long long i = 1; i <= 1000000; i++) s += i;
    FILE *f = fopen("result.txt", "w");
    if (!f) { perror("result.txt"); return 1; }
    fprintf(f, "sum=%llu argc=%d\n", s, argc);
    return fclose(f) == 0 ? 0 : 1;
}
"#;

fn build_prog(dir: &Path) {
    let src = dir.join("prog.c");
    fs::write(&src, PROG).unwrap();
    let out = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(dir.join("prog"))
        .arg(&src)
        .output()
        .expect("run cc (the share test builds a static program with `cc -static`)");
    assert!(out.status.success(), "cc -static failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn exec(node: &Node, cwd: &Path, script: &str) -> (Option<i32>, String, String) {
    let cwd = cwd.to_str().unwrap();
    let (st, out, err) = run_pmivmm(&["exec", "--node", &node.name, "-n", "--cwd", cwd, "--", "sh", "-c", script]);
    (st.code(), out, err)
}

#[test]
fn share_runs_programs_confines_the_guest_and_joins_two_nodes() {
    let top = scratch_dir("share-dir");
    let share = top.join("share");
    let outside = top.join("outside");
    fs::create_dir_all(&share).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), "host secret\n").unwrap();
    build_prog(&share);
    // Links the host plants: the guest resolves them in its own namespace,
    // where nothing outside the share exists.
    symlink("/etc", share.join("etc-link")).unwrap();
    symlink(outside.join("secret"), share.join("abs-link")).unwrap();
    symlink("../outside/secret", share.join("rel-link")).unwrap();
    let share = share.canonicalize().unwrap();

    let mut node = Node::start("share", &["--timeout", "900", "--share", share.to_str().unwrap()]);
    let mut other = Node::start_in("share-default", &share, &["--timeout", "900"]);
    for n in [&mut node, &mut other] {
        n.wait_console("pmivmm-agent ready", BOOT_TIMEOUT);
        assert!(
            n.console().contains(&format!("pmivmm-agent: share mounted at {}", share.display())),
            "--- console\n{}",
            n.console()
        );
    }

    // A static program from the share, run in the share, writes a result file.
    let (code, out, err) = exec(&node, &share, "./prog one two && cat result.txt");
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert_eq!(fs::read_to_string(share.join("result.txt")).unwrap(), "sum=500000500000 argc=3\n");
    assert_eq!(out, "sum=500000500000 argc=3\n");
    // Files the guest makes belong to the user running the VMM.
    let md = fs::metadata(share.join("result.txt")).unwrap();
    // SAFETY: plain getter.
    assert_eq!(md.uid(), unsafe { libc::geteuid() });

    // Directories, renames, removal, and host changes seen at once.
    fs::write(share.join("from-host"), "written on the host\n").unwrap();
    let (code, out, err) =
        exec(&node, &share, "mkdir -p d/e && echo guest > d/e/g && mv d/e/g d/moved && rm prog.c && cat from-host && ls d");
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out, "written on the host\ne\nmoved\n");
    assert_eq!(fs::read_to_string(share.join("d/moved")).unwrap(), "guest\n");
    assert!(!share.join("prog.c").exists());

    // Escapes: `..` past the mount, and every planted link, reach nothing of the host's.
    let script = "for f in ../outside/secret ../../../etc/shadow ../../../etc/passwd abs-link rel-link \
                  etc-link/passwd etc-link/hostname; do cat $f 2>/dev/null && echo LEAK:$f; done; \
                  ls etc-link/; echo end";
    let (code, out, err) = exec(&node, &share, script);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert!(!out.contains("LEAK") && !out.contains("host secret"), "{out}");
    assert!(!out.contains("passwd"), "the guest listed the host's /etc: {out}");
    assert!(out.ends_with("end\n"), "{out}");
    // Nor can the guest plant links that the host would follow into its files.
    let (code, _out, _err) = exec(&node, &share, "ln -s /etc/shadow guest-link");
    assert_ne!(code, Some(0), "the guest created a symlink");
    assert!(fs::symlink_metadata(share.join("guest-link")).is_err());

    // Two nodes on one share see each other's writes at once, also to a
    // file the reader has read before (no cached copy in either guest).
    let (code, _, err) = exec(&node, &share, "echo one > both && cat both");
    assert_eq!(code, Some(0), "stderr: {err}");
    let (code, out, err) = exec(&other, &share, "cat both && echo two >> both");
    assert_eq!((code, out.as_str()), (Some(0), "one\n"), "stderr: {err}");
    let (code, out, err) = exec(&node, &share, "cat both && echo three > both");
    assert_eq!((code, out.as_str()), (Some(0), "one\ntwo\n"), "stderr: {err}");
    let (code, out, err) = exec(&other, &share, "cat both");
    assert_eq!((code, out.as_str()), (Some(0), "three\n"), "stderr: {err}");
    assert_eq!(fs::read_to_string(share.join("both")).unwrap(), "three\n");

    for n in [&mut node, &mut other] {
        let (st, _, err) = run_pmivmm(&["stop", "--node", &n.name]);
        assert!(st.success(), "{err}");
        n.wait_exit(std::time::Duration::from_secs(60));
    }
    let _ = fs::remove_dir_all(&top);
}
