//! `pmivmm bench ...`: benchmarks that print tables (performance claims live
//! here, not in timed tests).

pub mod boot;
pub mod channel;
pub mod checkpoint;
pub mod cluster;
pub mod guest;
pub mod migrate;
pub mod share;

use std::os::unix::net::UnixStream;
use std::path::Path;

use pmivmm_proto::{AgentClient, ExecEvent, ExecRequest, ExecSession};

/// Starts `argv` in the node of agent socket `vsock`, in /tmp, without stdin.
fn start(vsock: &Path, argv: &[&str]) -> anyhow::Result<ExecSession<UnixStream, UnixStream>> {
    let client: crate::agent::Agent = AgentClient::connect(vsock)?;
    Ok(client.exec(ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: vec![],
        cwd: Some("/tmp".into()),
        stdin: false,
    })?)
}

/// Runs `script` with sh in the node and returns its stdout.
fn sh(vsock: &Path, script: &str) -> anyhow::Result<String> {
    let mut s = start(vsock, &["sh", "-c", script])?;
    let mut out = Vec::new();
    loop {
        match s.next_event()? {
            ExecEvent::Stdout(b) => out.extend(b),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exited(_) => return Ok(String::from_utf8_lossy(&out).into_owned()),
        }
    }
}

/// Minimum and median of a sample (None when empty).
pub fn min_median(mut v: Vec<f64>) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
    Some((v[0], median))
}

#[cfg(test)]
mod tests {
    #[test]
    fn min_median() {
        assert_eq!(super::min_median(vec![]), None);
        assert_eq!(super::min_median(vec![3.0, 1.0, 2.0]), Some((1.0, 2.0)));
        assert_eq!(super::min_median(vec![4.0, 1.0, 2.0, 3.0]), Some((1.0, 2.5)));
    }
}
