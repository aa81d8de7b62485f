//! Load figures over the measurement window: per-thread CPU of a process (`/proc`), and the
//! server's per media-loop-thread counters from its Prometheus `/metrics`:
//! `conclave_loop_busy_seconds_total{thread="K"}` (seconds loop thread K spent working),
//! `conclave_loop_datagrams_total{thread="K"}` and the gauge
//! `conclave_loop_queue_depth{thread="K"}`. A server without them (older builds) yields no
//! per-thread figures, not an error.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Busy ratio at or above which a thread (or the whole client) counts as saturated.
pub const SATURATED: f64 = 0.9;

/// One loop thread's series at one instant (each absent when the server does not export it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoopSample {
    /// `conclave_loop_busy_seconds_total`.
    pub busy_s: Option<f64>,
    /// `conclave_loop_datagrams_total`.
    pub datagrams: Option<f64>,
    /// `conclave_loop_participant_polls_total`.
    pub polls: Option<f64>,
    /// `conclave_loop_queue_depth`.
    pub queue_depth: Option<f64>,
}

/// Loop samples by thread label.
pub type LoopSamples = BTreeMap<String, LoopSample>;

/// The value of label `name` in a `{a="x",b="y"}` label set (no escapes inside thread labels).
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// Reads the per-loop-thread series out of a Prometheus text exposition. Tolerant: comments,
/// other metrics, unparsable lines, series without a `thread` label and trailing timestamps
/// are skipped or ignored.
pub fn parse_loop_metrics(text: &str) -> LoopSamples {
    let mut out = LoopSamples::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Some(thread) = label(labels, "thread") else {
            continue;
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        let entry = out.entry(thread.to_owned()).or_default();
        match name.trim() {
            "conclave_loop_busy_seconds_total" | "conclave_loop_busy_seconds" => {
                entry.busy_s = Some(value);
            }
            "conclave_loop_participant_polls_total" => {
                entry.polls = Some(value);
            }
            "conclave_loop_datagrams_total" | "conclave_loop_datagrams" => {
                entry.datagrams = Some(value);
            }
            "conclave_loop_queue_depth" => entry.queue_depth = Some(value),
            _ => {}
        }
    }
    out.retain(|_, s| *s != LoopSample::default());
    out
}

/// `GET <http_url>/metrics` and its loop series; `None` when the request fails or the server
/// exports none.
pub async fn fetch_loop_metrics(http_url: &str) -> Option<LoopSamples> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let text = client
        .get(format!("{http_url}/metrics"))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .text()
        .await
        .ok()?;
    let samples = parse_loop_metrics(&text);
    (!samples.is_empty()).then_some(samples)
}

/// One server loop thread over the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoopThreadReport {
    /// The `thread` label.
    pub thread: String,
    /// Δbusy seconds / Δwall seconds.
    pub busy_ratio: Option<f64>,
    /// Δdatagrams / Δwall seconds.
    pub datagrams_per_s: Option<f64>,
    /// Δparticipant polls / Δwall seconds.
    pub polls_per_s: Option<f64>,
    /// Queue depth at the start of the window.
    pub queue_depth_start: Option<f64>,
    /// Queue depth at the end of the window.
    pub queue_depth_end: Option<f64>,
}

/// Per-thread figures between two samples `wall_s` seconds apart (threads in both, ordered
/// by numeric label).
pub fn loop_window(start: &LoopSamples, end: &LoopSamples, wall_s: f64) -> Vec<LoopThreadReport> {
    let rate = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if wall_s > 0.0 => Some((b - a).max(0.0) / wall_s),
        _ => None,
    };
    let mut out: Vec<LoopThreadReport> = end
        .iter()
        .filter_map(|(thread, e)| {
            let s = start.get(thread)?;
            Some(LoopThreadReport {
                thread: thread.clone(),
                busy_ratio: rate(s.busy_s, e.busy_s),
                datagrams_per_s: rate(s.datagrams, e.datagrams),
                polls_per_s: rate(s.polls, e.polls),
                queue_depth_start: s.queue_depth,
                queue_depth_end: e.queue_depth,
            })
        })
        .collect();
    out.sort_by_key(|r| {
        (
            r.thread.parse::<u64>().unwrap_or(u64::MAX),
            r.thread.clone(),
        )
    });
    out
}

/// One thread's CPU over the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ThreadLoad {
    /// Thread name (`comm`, at most 15 bytes).
    pub name: String,
    /// Thread id.
    pub tid: u32,
    /// CPU seconds / window seconds (1.0 = one core all the time).
    pub cpu_ratio: f64,
}

/// Per-thread CPU ratios between two `/proc/<pid>/task` readings `wall_s` seconds apart,
/// busiest first (threads that started during the window count from zero).
pub fn thread_loads(
    start: &[(u32, String, Duration)],
    end: &[(u32, String, Duration)],
    wall_s: f64,
) -> Vec<ThreadLoad> {
    if wall_s <= 0.0 {
        return Vec::new();
    }
    let before: BTreeMap<u32, Duration> = start.iter().map(|(t, _, d)| (*t, *d)).collect();
    let mut out: Vec<ThreadLoad> = end
        .iter()
        .map(|(tid, name, d)| ThreadLoad {
            name: name.clone(),
            tid: *tid,
            cpu_ratio: d
                .saturating_sub(before.get(tid).copied().unwrap_or_default())
                .as_secs_f64()
                / wall_s,
        })
        .collect();
    out.sort_by(|a, b| b.cpu_ratio.total_cmp(&a.cpu_ratio));
    out
}

/// Whether a process was saturated: its busiest thread at [`SATURATED`] of a core or more, or
/// all its threads together at [`SATURATED`] of the cores it may use.
pub fn saturated(busiest_thread: Option<f64>, total_ratio: Option<f64>, cores: usize) -> bool {
    busiest_thread.is_some_and(|b| b >= SATURATED)
        || total_ratio.is_some_and(|t| t >= SATURATED * cores.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP conclave_loop_busy_seconds_total Seconds the loop thread spent working.
# TYPE conclave_loop_busy_seconds_total counter
conclave_loop_busy_seconds_total{thread="0"} 1.5
conclave_loop_busy_seconds_total{thread="1"} 0.25 1700000000000
conclave_loop_datagrams_total{thread="0"} 1000
conclave_loop_participant_polls_total{thread="0"} 800
conclave_loop_datagrams_total{node="a", thread="1"} 400
conclave_loop_queue_depth{thread="0"} 3
conclave_loop_queue_depth{thread="1"} NaN
conclave_loop_queue_depth 7
conclave_rooms 2
conclave_loop_busy_seconds_total{thread="2"} garbage
conclave_other{thread="0"} 9
"#;

    #[test]
    fn parses_loop_metrics_tolerantly() {
        let m = parse_loop_metrics(TEXT);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(
            m["0"],
            LoopSample {
                busy_s: Some(1.5),
                datagrams: Some(1000.0),
                polls: Some(800.0),
                queue_depth: Some(3.0)
            }
        );
        assert_eq!(
            m["1"],
            LoopSample {
                busy_s: Some(0.25),
                datagrams: Some(400.0),
                polls: None,
                queue_depth: None
            }
        );
        assert!(parse_loop_metrics("conclave_rooms 1\n# nothing\n").is_empty());
        assert!(parse_loop_metrics("").is_empty());
    }

    #[test]
    fn loop_window_rates() {
        let a = parse_loop_metrics(TEXT);
        let b = parse_loop_metrics(
            "conclave_loop_busy_seconds_total{thread=\"0\"} 3.5\n\
             conclave_loop_datagrams_total{thread=\"0\"} 5000\n\
             conclave_loop_participant_polls_total{thread=\"0\"} 2800\n\
             conclave_loop_queue_depth{thread=\"0\"} 1\n\
             conclave_loop_busy_seconds_total{thread=\"1\"} 0.75\n\
             conclave_loop_busy_seconds_total{thread=\"10\"} 9\n",
        );
        let w = loop_window(&a, &b, 4.0);
        assert_eq!(w.len(), 2, "thread 10 has no start sample: {w:?}");
        assert_eq!(w[0].thread, "0");
        assert_eq!(w[0].busy_ratio, Some(0.5));
        assert_eq!(w[0].datagrams_per_s, Some(1000.0));
        assert_eq!(w[0].polls_per_s, Some(500.0));
        assert_eq!(w[0].queue_depth_start, Some(3.0));
        assert_eq!(w[0].queue_depth_end, Some(1.0));
        assert_eq!(w[1].busy_ratio, Some(0.125));
        assert_eq!(w[1].datagrams_per_s, None);
        assert!(loop_window(&a, &b, 0.0)[0].busy_ratio.is_none());
    }

    #[test]
    fn thread_loads_and_saturation() {
        let s = |ms: u64| Duration::from_millis(ms);
        let before = vec![(1, "main".to_owned(), s(100)), (2, "w".to_owned(), s(0))];
        let after = vec![
            (1, "main".to_owned(), s(300)),
            (2, "w".to_owned(), s(1900)),
            (3, "new".to_owned(), s(50)),
        ];
        let l = thread_loads(&before, &after, 2.0);
        assert_eq!(l.len(), 3);
        assert_eq!((l[0].tid, l[0].cpu_ratio), (2, 0.95));
        assert_eq!((l[1].tid, l[1].cpu_ratio), (1, 0.1));
        assert_eq!((l[2].tid, l[2].cpu_ratio), (3, 0.025));
        assert!(saturated(Some(0.95), Some(1.0), 2));
        assert!(!saturated(Some(0.6), Some(1.2), 2));
        assert!(saturated(Some(0.6), Some(1.9), 2));
        assert!(!saturated(None, None, 1));
    }
}
