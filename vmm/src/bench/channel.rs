//! Channel benchmark: host<->guest throughput and request latency over the
//! node's vsock channel, beside the same framing over a local Unix socket
//! pair measured in the same run.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use pmivmm_proto::frame::{read_frame, write_frame};
use pmivmm_proto::{AgentClient, ExecEvent, ExecRequest, ExitStatus, Request};

use super::min_median;
use crate::commands::tables;
use crate::rundir::NodePaths;

/// Chunk size of stdin frames (the agent reads output in 64 KiB chunks too).
const CHUNK: usize = 64 << 10;

pub struct ChannelBench {
    pub node: String,
    /// MiB moved in each direction.
    pub mib: usize,
    /// Round trips for the latency figures.
    pub rounds: usize,
}

pub fn run(b: &ChannelBench) -> anyhow::Result<()> {
    anyhow::ensure!(b.mib > 0 && b.rounds > 0, "--mib and --rounds must be at least 1");
    let vsock = NodePaths::existing(&b.node)?.vsock();
    let bytes = b.mib << 20;

    eprintln!("bench channel: latency ({} rounds)...", b.rounds);
    let mut hello = Vec::new();
    let mut load = Vec::new();
    let mut client = AgentClient::connect(&vsock).context("cannot reach the agent")?;
    for _ in 0..b.rounds {
        let t = Instant::now();
        AgentClient::connect(&vsock)?;
        hello.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        client.load()?;
        load.push(t.elapsed().as_secs_f64() * 1e3);
    }
    eprintln!("bench channel: exec overhead, then {} MiB each way...", b.mib);
    let empty = exec_timed(&vsock, &["true"], 0)?;
    let to_guest = exec_timed(&vsock, &["sh", "-c", "cat > /dev/null"], bytes)?;
    let count = (bytes / CHUNK).to_string();
    let from_guest = exec_timed(
        &vsock,
        &["dd", "if=/dev/zero", &format!("bs={CHUNK}"), &format!("count={count}")],
        0,
    )?;
    let (local_rtt, local_tput) = unix_baseline(bytes, b.rounds)?;

    let mibps = |secs: f64| b.mib as f64 / secs;
    let (hmin, hmed) = min_median(hello).unwrap_or_default();
    let (lmin, lmed) = min_median(load).unwrap_or_default();
    let (umin, umed) = min_median(local_rtt).unwrap_or_default();
    let rows = vec![
        vec!["connect + hello (ms)".into(), format!("{hmin:.2} / {hmed:.2}"), format!("{umin:.3} / {umed:.3}")],
        vec!["load request round trip (ms)".into(), format!("{lmin:.2} / {lmed:.2}"), format!("{umin:.3} / {umed:.3}")],
        vec!["exec of `true`, start to exit (s)".into(), format!("{empty:.2}"), "-".into()],
        vec![
            "host -> guest (MiB/s, exec overhead included)".into(),
            format!("{:.2}", mibps(to_guest)),
            format!("{:.0}", local_tput),
        ],
        vec![
            "guest -> host (MiB/s, exec overhead included)".into(),
            format!("{:.2}", mibps(from_guest)),
            format!("{:.0}", local_tput),
        ],
        vec![
            "host -> guest (MiB/s, exec overhead subtracted)".into(),
            format!("{:.2}", mibps((to_guest - empty).max(1e-6))),
            "".into(),
        ],
        vec![
            "guest -> host (MiB/s, exec overhead subtracted)".into(),
            format!("{:.2}", mibps((from_guest - empty).max(1e-6))),
            "".into(),
        ],
    ];
    println!("channel benchmark: node {}, {} MiB each way, {} rounds; latency as min / median", b.node, b.mib, b.rounds);
    print!("{}", tables::render(&["what", "vsock channel", "unix socket baseline"], rows));
    Ok(())
}

/// Runs `argv` in the node with `input` bytes of stdin (none if 0), drains
/// its output, and returns the seconds from request to exit.
fn exec_timed(vsock: &std::path::Path, argv: &[&str], input: usize) -> anyhow::Result<f64> {
    let client = AgentClient::connect(vsock)?;
    let t = Instant::now();
    let session = client.exec(ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        cwd: None,
        stdin: input > 0,
    })?;
    let (mut output, mut stdin) = session.split();
    let writer = thread::spawn(move || -> anyhow::Result<()> {
        let chunk = vec![0x5au8; CHUNK];
        let mut left = input;
        while left > 0 {
            let n = left.min(CHUNK);
            stdin.write(&chunk[..n])?;
            left -= n;
        }
        if input > 0 {
            stdin.close()?;
        }
        Ok(())
    });
    let status = loop {
        match output.next_event()? {
            ExecEvent::Stdout(_) | ExecEvent::Stderr(_) => {}
            ExecEvent::Exited(s) => break s,
        }
    };
    let secs = t.elapsed().as_secs_f64();
    writer.join().map_err(|_| anyhow::anyhow!("stdin thread panicked"))??;
    anyhow::ensure!(status == ExitStatus::Code(0), "`{}` in the node ended with {status}", argv.join(" "));
    Ok(secs)
}

/// The same frames over a local Unix socket pair: round-trip times of a
/// small request (ms) and throughput of `bytes` in stdin-sized frames (MiB/s).
fn unix_baseline(bytes: usize, rounds: usize) -> anyhow::Result<(Vec<f64>, f64)> {
    let (mut a, mut b) = UnixStream::pair()?;
    let echo = thread::spawn(move || -> anyhow::Result<()> {
        while let Some(req) = read_frame::<_, Request>(&mut b)? {
            if matches!(req, Request::Load) {
                write_frame(&mut b, &Request::Load)?;
            }
        }
        Ok(())
    });
    let mut rtt = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        write_frame(&mut a, &Request::Load)?;
        read_frame::<_, Request>(&mut a)?;
        rtt.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let chunk = vec![0x5au8; CHUNK];
    let t = Instant::now();
    for _ in 0..bytes.div_ceil(CHUNK) {
        write_frame(&mut a, &Request::StdinData(chunk.clone()))?;
    }
    write_frame(&mut a, &Request::Load)?;
    read_frame::<_, Request>(&mut a)?;
    let secs = t.elapsed().as_secs_f64();
    drop(a);
    echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    // Guard against a zero-duration measurement on a fast machine.
    Ok((rtt, (bytes as f64 / (1 << 20) as f64) / secs.max(Duration::from_micros(1).as_secs_f64())))
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_baseline_moves_the_bytes() {
        let (rtt, tput) = super::unix_baseline(1 << 20, 3).unwrap();
        assert_eq!(rtt.len(), 3);
        assert!(tput > 0.0);
    }
}
