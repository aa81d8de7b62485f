//! Smoke runs of the benchmarks: they run end to end and report every field. No thresholds
//! (machines are shared and noisy); the full runs are documented in docs/performance.md.

use std::process::Command;

use crate::support::conclave::binary;

#[test]
fn bench_tokens_smoke() {
    let out = Command::new(binary())
        .args([
            "bench",
            "tokens",
            "--requests",
            "300",
            "--concurrency",
            "4",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["scenario"], "tokens");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["ok"], 300);
    for key in [
        "requests_per_s",
        "requests_per_cpu_s",
        "latency_p50_ms",
        "latency_p99_ms",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key} in {v}");
    }
}

/// Runs `conclave bench <scenario> …` seconds-long without Janus (`--no-janus`: CI machines
/// need not have it; the documented full run includes it) and checks every reported field.
fn media_smoke(args: &[&str]) -> serde_json::Value {
    let out = Command::new(binary())
        .args(["bench"])
        .args(args)
        .args([
            "--seconds",
            "1",
            "--join-probes",
            "2",
            "--limit-seconds",
            "0.2",
            "--no-janus",
            "--max-seconds",
            "120",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["scenario"], args[0], "{v}");
    for key in [
        "forwarded_pps",
        "pkts_per_cpu_s",
        "latency_p50_ms",
        "latency_p99_ms",
        "join_p50_ms",
        "limit_sendmmsg_pps",
        "ratio_to_limit",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
    }
    for key in ["loss_ratio", "rss_per_participant_kb"] {
        assert!(v[key].as_f64().is_some_and(|x| x >= 0.0), "{key} in {v}");
    }
    for key in ["janus_pkts_per_cpu_s", "ratio_to_janus"] {
        assert!(v[key].is_null(), "{key} not run: {v}");
    }
    v
}

#[test]
fn bench_audio_smoke() {
    media_smoke(&["audio", "--publishers", "2", "--subscribers", "6"]);
}

#[test]
fn bench_video_smoke() {
    media_smoke(&["video", "--participants", "3", "--bitrate-kbps", "300"]);
}

#[test]
fn bench_livestream_smoke() {
    media_smoke(&["livestream", "--subscribers", "4", "--bitrate-kbps", "500"]);
}
