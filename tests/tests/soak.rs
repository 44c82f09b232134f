//! A CI-sized migration soak (`pmivmm soak`) on two real node VMs: jobs
//! migrate back and forth with faults injected (dropped links and corrupted
//! frames; stalls cost 35 s each and are left to the long run), and none may
//! be lost, duplicated or corrupted. The first migration has a fault, and
//! with seed 34 it is a corrupted `Running` frame: the source is left in
//! doubt, asks, and learns that the process moved (so one migration, all
//! that a loaded emulated host may manage in the time, both fires a fault
//! and succeeds).

use pmivmm::commands::soak::{self, FaultKind, SoakArgs};
use pmivmm_tests::shared_node;

#[test]
fn jobs_survive_migrations_with_faults() {
    let boot = |tag: &'static str| std::thread::spawn(move || shared_node(tag));
    let (a, b) = (boot("soak-a"), boot("soak-b"));
    let nodes = vec![a.join().unwrap().to_owned(), b.join().unwrap().to_owned()];
    let args =
        SoakArgs { nodes, jobs: 2, duration: 45, seed: 34, faults: vec![FaultKind::Drop, FaultKind::Corrupt] };
    let report = soak::run(&args).expect("the soak could not run");
    eprintln!("{report:#?}");
    assert!(report.clean(), "jobs lost, duplicated or corrupted: {report:#?}");
    assert_eq!(report.finished_ok + report.still_running, report.jobs, "{report:#?}");
    assert!(report.faults_fired >= 1, "no fault fired: {report:#?}");
    assert!(report.moved >= 1, "no migration succeeded: {report:#?}");
}
