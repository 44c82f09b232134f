//! `pmivmm exec`: runs a command in a node like a local command: output
//! streamed to our stdout/stderr, stdin forwarded, the remote exit status
//! (or 128 + signal) as our exit code.

use std::io::{self, Read, Write};
use std::thread;

use pmivmm_proto::{ExecEvent, ExecRequest, ExitStatus};

/// Runs `argv` in node `name`; returns the exit code to exit with.
pub fn exec(
    name: &str,
    argv: Vec<String>,
    env: Vec<String>,
    cwd: Option<String>,
    forward_stdin: bool,
) -> anyhow::Result<i32> {
    anyhow::ensure!(!argv.is_empty(), "no command given (usage: pmivmm exec --node NAME -- COMMAND [ARGS...])");
    let session = super::agent(name)?.exec(ExecRequest { argv, env, cwd, stdin: forward_stdin })?;
    let (mut output, mut stdin) = session.split();
    if forward_stdin {
        // The thread ends at local EOF; if the process exits first, the
        // process exits with us while the thread is blocked reading.
        thread::Builder::new().name("exec-stdin".into()).spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match io::stdin().lock().read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stdin.write(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = stdin.close();
        })?;
    }
    loop {
        match output.next_event()? {
            ExecEvent::Stdout(d) => {
                let mut o = io::stdout().lock();
                o.write_all(&d)?;
                o.flush()?;
            }
            ExecEvent::Stderr(d) => {
                let mut e = io::stderr().lock();
                e.write_all(&d)?;
                e.flush()?;
            }
            ExecEvent::Exited(ExitStatus::Code(c)) => return Ok(c),
            ExecEvent::Exited(ExitStatus::Signal { signal, .. }) => return Ok(128 + signal),
        }
    }
}
