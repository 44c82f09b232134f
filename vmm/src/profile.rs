//! A sampling profiler of the guest: the vCPU thread is kicked out of
//! KVM_RUN at a fixed rate, records the guest RIP, and re-enters. At the end
//! the samples are resolved against the guest kernel's System.map.
//!
//! On the development hosts guest kernel code is emulated, so where the
//! guest kernel spends its time is where boot and every guest operation
//! spend theirs: this is the tool for finding the next cost to cut.

use std::collections::HashMap;
use std::time::Duration;

/// Lowest address of the kernel's text mapping on x86_64.
const KERNEL_SPACE: u64 = 0xffff_8000_0000_0000;

/// Samples taken by the vCPU thread: (time since start, guest RIP).
#[derive(Debug, Default, Clone)]
pub struct Samples(pub Vec<(Duration, u64)>);

/// Function start addresses and names from a System.map.
#[derive(Debug, Default)]
pub struct SymbolTable {
    syms: Vec<(u64, String)>,
}

impl SymbolTable {
    /// Parses `address type name` lines; only text symbols (t/T/w/W) count.
    pub fn from_system_map(text: &str) -> Self {
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_owned()))
            })
            .collect();
        syms.sort();
        SymbolTable { syms }
    }

    /// The function containing `rip`, if any.
    pub fn resolve(&self, rip: u64) -> Option<&str> {
        let i = self.syms.partition_point(|(a, _)| *a <= rip);
        i.checked_sub(1).map(|i| self.syms[i].1.as_str())
    }
}

/// Where a sample fell.
fn bucket(rip: u64, syms: &SymbolTable) -> &str {
    if rip < KERNEL_SPACE {
        "[guest user space]"
    } else {
        syms.resolve(rip).unwrap_or("[kernel, unknown symbol]")
    }
}

/// A table of the `top` functions by samples, with the share of all samples
/// and of the time span, plus a timeline of the top function per second.
pub fn report(samples: &Samples, syms: &SymbolTable, top: usize, interval: Duration) -> String {
    let total = samples.0.len().max(1);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (_, rip) in &samples.0 {
        *counts.entry(bucket(*rip, syms)).or_default() += 1;
    }
    let mut by_count: Vec<(&str, usize)> = counts.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut out = format!(
        "guest profile: {} samples every {:?} ({:.1} s sampled)\n  share  ~seconds  function\n",
        samples.0.len(),
        interval,
        samples.0.len() as f64 * interval.as_secs_f64()
    );
    for (name, n) in by_count.into_iter().take(top) {
        out.push_str(&format!(
            "{:6.1}%  {:8.2}  {name}\n",
            100.0 * n as f64 / total as f64,
            n as f64 * interval.as_secs_f64()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "ffffffff81000000 T _stext\n\
                       ffffffff81000100 t clear_page_erms\n\
                       ffffffff81000200 D some_data\n\
                       ffffffff81000300 T memcpy\n";

    #[test]
    fn resolves_to_the_enclosing_text_symbol() {
        let s = SymbolTable::from_system_map(MAP);
        assert_eq!(s.resolve(0xffffffff81000150), Some("clear_page_erms"));
        // Data symbols do not split functions.
        assert_eq!(s.resolve(0xffffffff81000250), Some("clear_page_erms"));
        assert_eq!(s.resolve(0xffffffff81000300), Some("memcpy"));
        assert_eq!(s.resolve(0x1000), None);
    }

    #[test]
    fn report_orders_by_samples() {
        let s = SymbolTable::from_system_map(MAP);
        let t = Duration::ZERO;
        let samples = Samples(vec![
            (t, 0xffffffff81000110),
            (t, 0xffffffff81000120),
            (t, 0xffffffff81000310),
            (t, 0x400000),
        ]);
        let r = report(&samples, &s, 10, Duration::from_millis(10));
        let lines: Vec<&str> = r.lines().collect();
        assert!(lines[2].ends_with("clear_page_erms") && lines[2].contains("50.0%"), "{r}");
        assert!(r.contains("[guest user space]") && r.contains("memcpy"));
    }
}
