//! `pmivmm fuzz <target|all> [--seconds N] [--seed S]`: the long run of the
//! fuzz targets, one after the other, with a report per target.

use std::path::PathBuf;
use std::time::Duration;

use super::runner::{self, Budget, Options, Report};
use super::Target;

/// The fuzz command's arguments.
#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// A target (peer, agent, vsock, mmio, p9, checkpoint) or `all`.
    pub target: String,
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seed of the mutator (the same seed and time give similar runs; the
    /// saved inputs replay exactly).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where crashing inputs are saved.
    #[arg(long, default_value = "fuzz-crashes")]
    pub crash_dir: PathBuf,
    /// Run the target once on this saved input instead of fuzzing.
    #[arg(long, value_name = "FILE")]
    pub replay: Option<PathBuf>,
}

/// Runs the command; `Ok(false)` when a target crashed.
pub fn run(args: &FuzzArgs) -> anyhow::Result<bool> {
    let targets = super::select(&args.target)?;
    if let Some(file) = &args.replay {
        let input = std::fs::read(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
        let mut clean = true;
        for t in targets {
            // The panic message, if any, goes to stderr as usual.
            match runner::run_input(t, &input) {
                runner::Verdict::Outcome(class) => println!("{}: no crash (outcome: {class})", t.name),
                runner::Verdict::Crash(message) => {
                    println!("{}: CRASH: {message}", t.name);
                    clean = false;
                }
            }
        }
        return Ok(clean);
    }
    // Caught panics are reported below, not printed as they happen.
    std::panic::set_hook(Box::new(|_| {}));
    let mut clean = true;
    for t in targets {
        let opts = Options {
            budget: Budget::Time(Duration::from_secs(args.seconds)),
            seed: args.seed,
            crash_dir: Some(args.crash_dir.clone()),
        };
        println!("{}: {} ({} s, seed {})", t.name, t.what, args.seconds, args.seed);
        // On its own thread, so that the target's thread-local scratch files go with it.
        let report = std::thread::scope(|s| s.spawn(|| runner::run(t, &opts)).join())
            .map_err(|_| anyhow::anyhow!("the fuzz runner of {} itself failed", t.name))?;
        print_report(t, &report);
        clean &= report.crashes.is_empty();
    }
    let _ = std::panic::take_hook();
    Ok(clean)
}

fn print_report(t: &Target, r: &Report) {
    println!(
        "{}: {} executions in {:.1} s, {:.0} execs/s, {} outcome classes, corpus {}, {} crashes",
        t.name,
        r.execs,
        r.elapsed.as_secs_f64(),
        r.execs_per_sec(),
        r.classes.len(),
        r.corpus,
        r.crashes.len()
    );
    let mut top: Vec<_> = r.classes.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    for (class, n) in top.iter().take(8) {
        println!("    {n:>9}  {}", shorten(class));
    }
    for c in &r.crashes {
        println!("  CRASH: {}", c.message);
        match &c.saved {
            Some(path) => println!("    input saved: {}\n    replay: pmivmm fuzz {} --replay {}", path.display(), t.name, path.display()),
            None => println!("    input ({} bytes) could not be saved", c.input.len()),
        }
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 100;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}
