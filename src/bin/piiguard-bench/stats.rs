//! Latency samples, percentiles, and CPU/RSS readings from `/proc`.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

/// Nearest-rank percentiles of latencies given in nanoseconds (sorted in place).
pub fn percentiles(samples: &mut [u64]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let at = |q: f64| {
        // Nearest rank: ceil(q * n), 1-based.
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1] as f64 / 1000.0
    };
    let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
    Percentiles {
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: samples[samples.len() - 1] as f64 / 1000.0,
        mean_us: (sum as f64 / samples.len() as f64) / 1000.0,
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 if unknown).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

/// User + system CPU time consumed so far by a process (all its threads).
pub fn process_cpu(pid: &str, ticks_per_sec: u64) -> Option<Duration> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: fields after the
    // last ')' start at field 3 (state). utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let ticks = utime + stime;
    Some(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / ticks_per_sec,
    ))
}

/// The fields of `/proc/<pid>/stat` after the command name (field 3, the state, first).
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // The state (a letter) is not a number: keep its place with 0.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU time of a process tree one level deep, as a multi-process server (PostgreSQL) spends it:
/// the process itself, the children it has reaped (cutime/cstime), and its live children.
pub fn process_tree_cpu(pid: &str, ticks_per_sec: u64) -> Option<Duration> {
    let own = stat_fields(pid)?;
    // utime, stime, cutime, cstime: fields 14-17 (indices 11-14 here); ppid is field 4.
    let mut ticks: u64 = own.get(11..15)?.iter().sum();
    let me: u64 = pid.parse().ok()?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(child) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Some(f) = stat_fields(child).filter(|f| f.get(1) == Some(&me)) {
            ticks += f.get(11..13).map_or(0, |t| t.iter().sum());
        }
    }
    Some(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / ticks_per_sec,
    ))
}

/// Resident set size of a process in KiB (`VmRSS`).
pub fn process_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid).join("status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        v.reverse();
        let p = percentiles(&mut v);
        assert_eq!(p.p50_us, 500.0);
        assert_eq!(p.p90_us, 900.0);
        assert_eq!(p.p99_us, 990.0);
        assert_eq!(p.p999_us, 999.0);
        assert_eq!(p.max_us, 1000.0);
        assert_eq!(p.mean_us, 500.5);
        assert_eq!(percentiles(&mut []).p99_us, 0.0);
    }

    #[test]
    fn reads_own_cpu_and_rss() {
        let me = std::process::id().to_string();
        let t = clock_ticks();
        assert!(process_cpu(&me, t).is_some());
        assert!(process_rss_kib(&me).is_some_and(|k| k > 0));
        // A child that burns CPU and is reaped counts in its parent's tree.
        let before = process_tree_cpu(&me, clock_ticks()).unwrap();
        let st = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(st.success());
        let after = process_tree_cpu(&me, clock_ticks()).unwrap();
        assert!(after > before, "{before:?} -> {after:?}");
        assert!(process_cpu("not-a-pid", t).is_none());
    }
}
