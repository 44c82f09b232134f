//! Runs a target on mutated inputs: a seeded mutator over a corpus that
//! grows with every input reaching an outcome class not seen before, panics
//! caught as crashes, allocations measured, and a watchdog for inputs that
//! never finish.

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{alloc, Target, MAX_ALLOC, MAX_INPUT};

/// Inputs kept for mutation at most.
const MAX_CORPUS: usize = 512;

/// When a run ends.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Execs(u64),
    Time(Duration),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub budget: Budget,
    pub seed: u64,
    /// Where crashing inputs are saved (not saved when `None`).
    pub crash_dir: Option<PathBuf>,
}

/// An input that made the target panic or allocate too much.
#[derive(Debug)]
pub struct Crash {
    pub input: Vec<u8>,
    pub message: String,
    /// The file it was saved to.
    pub saved: Option<PathBuf>,
}

#[derive(Debug)]
pub struct Report {
    pub target: &'static str,
    pub execs: u64,
    pub elapsed: Duration,
    /// Outcome class -> inputs that ended in it.
    pub classes: BTreeMap<String, u64>,
    /// One per distinct message.
    pub crashes: Vec<Crash>,
    pub corpus: usize,
}

impl Report {
    pub fn execs_per_sec(&self) -> f64 {
        self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What one input did.
pub enum Verdict {
    Outcome(String),
    Crash(String),
}

/// Runs `target` on one input, catching panics and oversized allocations.
pub fn run_input(target: &Target, input: &[u8]) -> Verdict {
    let (result, largest) = alloc::measure(|| panic::catch_unwind(AssertUnwindSafe(|| (target.run_one)(input))));
    match result {
        Err(payload) => Verdict::Crash(panic_message(payload.as_ref())),
        Ok(_) if largest > MAX_ALLOC => {
            Verdict::Crash(format!("allocated {largest} bytes at once (limit {MAX_ALLOC})"))
        }
        Ok(outcome) => Verdict::Outcome(outcome),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".into());
    format!("panic: {text}")
}

/// An input that runs this long is a hang: the watchdog saves it, names
/// it and ends the process (a stuck thread cannot be stopped).
const HANG_AFTER: Duration = Duration::from_secs(30);

/// Fuzzes `target` until the budget is spent.
pub fn run(target: &Target, opts: &Options) -> Report {
    let current = Mutex::new(Vec::new());
    let execs = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| watchdog(target, opts, &current, &execs, &done));
        let report = fuzz(target, opts, &current, &execs);
        done.store(true, Ordering::Relaxed);
        report
    })
}

fn watchdog(target: &Target, opts: &Options, current: &Mutex<Vec<u8>>, execs: &AtomicU64, done: &AtomicBool) {
    let (mut seen, mut since) = (execs.load(Ordering::Relaxed), Instant::now());
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        let now = execs.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() >= HANG_AFTER {
            let input = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let saved = opts.crash_dir.as_deref().and_then(|dir| save(dir, target.name, &input));
            eprintln!("{}: HANG: an input ran for more than {HANG_AFTER:?}: {input:?}", target.name);
            if let Some(path) = saved {
                eprintln!("    input saved: {}\n    replay: pmivmm fuzz {} --replay {}", path.display(), target.name, path.display());
            }
            std::process::exit(2);
        }
    }
}

fn fuzz(target: &Target, opts: &Options, current: &Mutex<Vec<u8>>, execs: &AtomicU64) -> Report {
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let mut corpus: Vec<Vec<u8>> = (target.seeds)();
    corpus.push(Vec::new());
    let mut report = Report {
        target: target.name,
        execs: 0,
        elapsed: Duration::ZERO,
        classes: BTreeMap::new(),
        crashes: Vec::new(),
        corpus: 0,
    };
    let start = Instant::now();
    // The seeds run as they are first.
    let mut pending: Vec<Vec<u8>> = corpus.clone();
    loop {
        match opts.budget {
            Budget::Execs(n) if report.execs >= n => break,
            // The clock is read every 64 inputs.
            Budget::Time(d) if report.execs.is_multiple_of(64) && start.elapsed() >= d => break,
            _ => {}
        }
        let input = pending.pop().unwrap_or_else(|| {
            let base = &corpus[rng.usize(..corpus.len())];
            let other = &corpus[rng.usize(..corpus.len())];
            mutate(&mut rng, base, other)
        });
        report.execs += 1;
        current.lock().unwrap_or_else(|e| e.into_inner()).clone_from(&input);
        execs.store(report.execs, Ordering::Relaxed);
        match run_input(target, &input) {
            Verdict::Outcome(class) => {
                let count = report.classes.entry(class).or_insert(0);
                *count += 1;
                if *count == 1 && corpus.len() < MAX_CORPUS {
                    corpus.push(input);
                }
            }
            Verdict::Crash(message) => {
                if !report.crashes.iter().any(|c| c.message == message) {
                    let saved = opts.crash_dir.as_deref().and_then(|dir| save(dir, target.name, &input));
                    report.crashes.push(Crash { input, message, saved });
                }
            }
        }
    }
    report.elapsed = start.elapsed();
    report.corpus = corpus.len();
    report
}

fn save(dir: &Path, target: &str, input: &[u8]) -> Option<PathBuf> {
    let path = dir.join(format!("crash-{target}-{:016x}", fnv1a(input)));
    let written = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, input));
    match written {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!("cannot save a crashing input to {}: {e}", path.display());
            None
        }
    }
}

/// Names a saved input by its contents.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Values that often sit on a decoder's boundaries.
const INTERESTING: &[u64] = &[0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0xffff, 0x1_0000, 0x7fff_ffff, 0xffff_ffff, u64::MAX];

/// One to four stacked mutations of `base`, sometimes spliced with `other`.
pub fn mutate(rng: &mut fastrand::Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.usize(1..=4) {
        match rng.u8(0..9) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(0..8);
            }
            1 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] = rng.u8(..);
            }
            2 if !v.is_empty() => {
                let width = [1, 2, 4, 8][rng.usize(..4)];
                let at = rng.usize(..v.len());
                let value = INTERESTING[rng.usize(..INTERESTING.len())].to_le_bytes();
                let end = (at + width).min(v.len());
                v[at..end].copy_from_slice(&value[..end - at]);
            }
            3 => {
                let at = rng.usize(..=v.len());
                let n = rng.usize(1..=16);
                v.splice(at..at, std::iter::repeat_with(|| rng.u8(..)).take(n));
            }
            4 if !v.is_empty() => {
                let at = rng.usize(..v.len());
                let n = rng.usize(1..=(v.len() - at).min(32));
                v.drain(at..at + n);
            }
            5 if !v.is_empty() => {
                // Duplicate a range in place.
                let at = rng.usize(..v.len());
                let n = rng.usize(1..=(v.len() - at).min(64));
                let piece = v[at..at + n].to_vec();
                let to = rng.usize(..=v.len());
                v.splice(to..to, piece);
            }
            6 if !other.is_empty() => {
                // Splice: our head, the other's tail.
                let cut = rng.usize(..=v.len());
                let from = rng.usize(..other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            7 if !v.is_empty() => v.truncate(rng.usize(..v.len())),
            _ => {
                let at = rng.usize(..=v.len());
                let value = INTERESTING[rng.usize(..INTERESTING.len())].to_le_bytes();
                v.splice(at..at, value[..[1, 2, 4, 8][rng.usize(..4)]].iter().copied());
            }
        }
    }
    v.truncate(MAX_INPUT);
    v
}
