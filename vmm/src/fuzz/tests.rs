//! The CI-sized run: every target for a fixed number of inputs from a fixed
//! seed (a failure names the seed and input to replay). Crashes found so
//! far have regression tests next to the code they were in (the vsock
//! hang: `devices::virtio::vsock::tests::rx_buffer_without_room_for_data_does_not_hang`).

use super::runner::{self, Budget, Options};
use super::*;

/// Inputs per target: a few seconds each in a release build.
const CI_EXECS: &[(&str, u64)] =
    &[("peer", 300_000), ("frame", 10_000), ("agent", 100_000), ("vsock", 20_000), ("mmio", 50_000), ("p9", 6_000), ("checkpoint", 40_000), ("beacon", 200_000)];
const CI_SEED: u64 = 0x00c1_5eed;

fn ci_run(name: &str) {
    let target = &select(name).unwrap()[0];
    let execs = CI_EXECS.iter().find(|(n, _)| *n == name).unwrap().1;
    let report = runner::run(target, &Options { budget: Budget::Execs(execs), seed: CI_SEED, crash_dir: None });
    eprintln!(
        "fuzz {name}: {} execs, {:.0}/s, {} outcome classes",
        report.execs,
        report.execs_per_sec(),
        report.classes.len()
    );
    if let Some(c) = report.crashes.first() {
        panic!("fuzz target {name} (seed {CI_SEED:#x}) crashed: {}\ninput: {:?}", c.message, c.input);
    }
    assert!(report.classes.len() > 3, "{name} reached only {:?}", report.classes);
}

#[test]
fn fuzz_peer() {
    ci_run("peer");
}

#[test]
fn fuzz_frame() {
    ci_run("frame");
}

#[test]
fn fuzz_agent() {
    ci_run("agent");
}

#[test]
fn fuzz_vsock() {
    ci_run("vsock");
}

#[test]
fn fuzz_mmio() {
    ci_run("mmio");
}

#[test]
fn fuzz_p9() {
    ci_run("p9");
}

#[test]
fn fuzz_checkpoint() {
    ci_run("checkpoint");
}

/// Every target has a CI budget.
#[test]
fn every_target_runs_in_ci() {
    for t in TARGETS {
        assert!(CI_EXECS.iter().any(|(n, _)| *n == t.name), "{} has no CI budget", t.name);
    }
}

#[test]
fn fuzz_beacon() {
    ci_run("beacon");
}
