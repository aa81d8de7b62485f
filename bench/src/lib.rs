//! `conclave-bench …`: benchmarks of Conclave that report ratios and rates measured in one run.
//! The server under test is a `conclave serve` child process (see [`server`]); this crate is
//! not linked into the server.
//!
//! Every load loop is bounded in count and time and sends to loopback only.

pub mod client;
pub mod homeserver;
pub mod janus;
pub mod jointime;
pub mod limit;
pub mod lk;
pub mod metrics;
pub mod scenario;
pub mod server;
pub mod soak;
pub mod tokens;

use std::time::Duration;

/// Why a benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The server under test could not be started or stopped answering.
    #[error("server: {0}")]
    Server(String),
    /// LiveKit signalling failed (connect, join, unexpected close).
    #[error("signalling: {0}")]
    Signal(String),
    /// A real LiveKit SDK client (`tests/clients/lk_client.py`) could not be found or run.
    #[error("LiveKit client: {0}")]
    Client(String),
    /// Janus could not be installed, started or driven.
    #[error("janus: {0}")]
    Janus(String),
    /// A WebRTC peer connection (str0m) refused an input or an SDP.
    #[error("webrtc: {0}")]
    Rtc(String),
    /// Something did not happen within its time bound.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The stand-in homeserver's certificates or TLS set-up failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The options make no sense (e.g. a non-loopback URL).
    #[error("invalid options: {0}")]
    Options(String),
    /// The server binary to start is not there.
    #[error(
        "the server binary {} does not exist; build it with `{build}` \
         (media scenarios also take --server-exe)",
        path.display()
    )]
    MissingServer {
        /// Where it was looked for.
        path: std::path::PathBuf,
        /// The command that builds it there.
        build: String,
    },
}

impl BenchError {
    /// An [`BenchError::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// CPU time (user + system) consumed by this process so far, from `/proc/self/stat`.
pub fn process_cpu_time() -> Option<Duration> {
    proc_cpu_time("self")
}

/// CPU time (user + system, all threads) of process `pid` (a number or `self`), from
/// `/proc/<pid>/stat`.
pub fn proc_cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat).map(|(_, cpu)| cpu)
}

/// CPU time (user + system) of each thread of process `pid` (a number or `self`), from
/// `/proc/<pid>/task/<tid>/stat`: (thread id, thread name, CPU time). Threads that exit while
/// being read are left out; `None` when the process has no readable task directory.
pub fn proc_thread_cpu_times(pid: &str) -> Option<Vec<(u32, String, Duration)>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((name, cpu)) = parse_stat_cpu(&stat) {
            out.push((tid, name, cpu));
        }
    }
    Some(out)
}

/// The command name and utime + stime of a `/proc/…/stat` line.
fn parse_stat_cpu(stat: &str) -> Option<(String, Duration)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks_per_second();
    Some((
        name,
        Duration::from_secs_f64((utime + stime) as f64 / ticks as f64),
    ))
}

/// Cores this process may run on (its affinity mask: 1 when pinned with `taskset -c N`).
pub fn allowed_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Resident set size of process `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn proc_rss_kb(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors of process `pid` (entries of `/proc/<pid>/fd`).
pub fn proc_fd_count(pid: &str) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// Whether process `pid` exists and is neither a zombie nor dead (`/proc/<pid>/stat` state).
pub fn proc_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// UDP datagrams the kernel dropped because a receive buffer was full (`RcvbufErrors` in
/// `/proc/net/snmp`; per network namespace, so system-wide outside the bench's own one).
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let i = names.iter().position(|n| *n == "RcvbufErrors")?;
    values.get(i)?.parse().ok()
}

fn clock_ticks_per_second() -> u64 {
    // USER_HZ is 100 on every Linux architecture Conclave targets.
    100
}

/// The `q`-quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(51));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn udp_counters_are_readable() {
        assert!(udp_rcvbuf_errors().is_some());
    }

    #[test]
    fn rss_is_readable() {
        assert!(proc_rss_kb("self").expect("/proc/self/status") > 0);
    }

    #[test]
    fn fds_and_liveness_are_readable() {
        assert!(proc_fd_count("self").expect("/proc/self/fd") >= 3);
        assert!(proc_alive("self"));
        assert!(!proc_alive("0"));
    }

    #[test]
    fn thread_cpu_times_are_readable() {
        let threads = proc_thread_cpu_times("self").expect("/proc/self/task");
        assert!(!threads.is_empty());
        let line = "1234 (tokio-runtime-w) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 1";
        let (name, cpu) = parse_stat_cpu(line).expect("parses");
        assert_eq!(name, "tokio-runtime-w");
        assert_eq!(cpu, Duration::from_secs(3));
        assert!(allowed_cores() >= 1);
    }

    #[test]
    fn cpu_time_is_readable_and_grows() {
        let a = process_cpu_time().expect("/proc/self/stat");
        let mut x = 0u64;
        for i in 0..30_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = process_cpu_time().expect("/proc/self/stat");
        assert!(b >= a);
    }
}
