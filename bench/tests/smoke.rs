//! Smoke runs of the benchmarks: they run end to end and report every field. No thresholds
//! (machines are shared and noisy); the full runs are documented in docs/performance.md.
//!
//! The server under test is the `conclave` binary next to `conclave-bench`:
//! `cargo test --workspace` builds it first; with `cargo test -p conclave-bench` build it
//! before (`cargo build -p conclave`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The benchmark binary cargo built for this test.
fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_conclave-bench")
}

/// The server binary the benchmark starts by default.
fn server_binary() -> PathBuf {
    Path::new(binary())
        .parent()
        .expect("conclave-bench has a directory")
        .join("conclave")
}

#[test]
fn server_binary_is_next_to_the_bench() {
    let server = server_binary();
    assert!(
        server.is_file(),
        "{} missing: run `cargo test --workspace` or `cargo build -p conclave` first",
        server.display()
    );
}

/// A `conclave-bench` alone in its directory refuses to run and says how to build the server.
#[test]
fn missing_server_binary_says_how_to_build_it() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let lonely = dir.path().join("conclave-bench");
    if std::fs::hard_link(binary(), &lonely).is_err() {
        std::fs::copy(binary(), &lonely).unwrap();
    }
    for args in [&["tokens"][..], &["audio", "--no-janus"][..]] {
        let out = Command::new(&lonely).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("does not exist")
                && stderr.contains("cargo build --release -p conclave"),
            "{args:?}: {stderr}"
        );
    }
}

/// Runs `conclave-bench <args> <options> --json`, asserts it succeeded and returns its report.
fn run_json(args: &[&str], options: &[&str]) -> serde_json::Value {
    let out = Command::new(binary())
        .args(args)
        .args(options)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_tokens_smoke() {
    let v = run_json(&["tokens", "--requests", "300", "--concurrency", "4"], &[]);
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

/// Runs `conclave-bench <scenario> …` seconds-long without Janus (`--no-janus`: CI machines
/// need not have it; the documented full run includes it) and checks every reported field.
fn media_smoke(args: &[&str]) -> serde_json::Value {
    let v = run_json(
        args,
        &[
            "--seconds",
            "1",
            "--join-probes",
            "2",
            "--limit-seconds",
            "0.2",
            "--no-janus",
            "--max-seconds",
            "120",
        ],
    );
    assert_eq!(v["scenario"], args[0], "{v}");
    // Off for video by default (its sampled receivers' feedback would pause what it forwards).
    assert_eq!(v["congestion_control"], args[0] != "video", "{v}");
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
    let c = &v["conclave"];
    let full = args.contains(&"--full-receive");
    let mode = if full { "full" } else { "count-only" };
    assert_eq!(v["receive_mode"], mode, "{v}");
    assert_eq!(c["receive_mode"], mode, "{v}");
    assert!(v["client_saturated"].is_boolean(), "{v}");
    for key in ["datagrams_expected", "datagrams_received", "witnesses"] {
        assert!(c[key].as_u64().is_some_and(|x| x > 0), "{key} in {c}");
    }
    assert_eq!(c["bad_frames"], 0, "{c}");
    for key in ["client_cpu_ratio", "fed_ratio"] {
        assert!(c[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {c}");
    }
    if full {
        // Read while clients run: a batch may be counted in one counter and not yet the other.
        assert!(c["fed_ratio"].as_f64().is_some_and(|x| x > 0.99), "{c}");
    }
    for key in ["client_threads", "server_threads"] {
        assert!(
            c[key].as_array().is_some_and(|t| !t.is_empty()),
            "{key} in {c}"
        );
    }
    // One entry per media loop thread (`--threads`, 1 by default), each busy and fed.
    let threads = args
        .iter()
        .position(|a| *a == "--threads")
        .and_then(|i| args.get(i + 1))
        .map_or(1, |n| n.parse().expect("--threads N"));
    let loops = c["loop_threads"].as_array().expect("loop_threads");
    assert_eq!(loops.len(), threads, "{c}");
    for l in loops {
        assert!(l["busy_ratio"].as_f64().is_some_and(|x| x > 0.0), "{l}");
        assert!(
            l["datagrams_per_s"].as_f64().is_some_and(|x| x > 0.0),
            "{l}"
        );
    }
    v
}

/// Two rooms on two media loop threads: both loops receive and work.
#[test]
fn bench_audio_two_threads_smoke() {
    let v = media_smoke(&[
        "audio",
        "--publishers",
        "2",
        "--subscribers",
        "6",
        "--threads",
        "2",
        "--rooms",
        "2",
    ]);
    assert_eq!(v["threads"], 2, "{v}");
    assert_eq!(v["rooms"], 2, "{v}");
}

/// Count-only receiving (the default): RTP counted at the socket, witnesses still timed.
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
    media_smoke(&[
        "livestream",
        "--subscribers",
        "4",
        "--bitrate-kbps",
        "500",
        "--full-receive",
    ]);
}

/// A ten-second soak: clients churn, transactions flow, the report has every field, and
/// nothing is left once the load stops (`run_json` also asserts exit code 0, which a leak or
/// a dead server would turn into 2).
#[test]
fn bench_soak_smoke() {
    let v = run_json(
        &["soak", "--duration-secs", "10"],
        &["--concurrency", "3", "--rooms", "4", "--sample-secs", "2"],
    );
    assert_eq!(v["scenario"], "soak", "{v}");
    for key in ["joins", "transactions", "call_joins"] {
        assert!(v[key].as_u64().is_some_and(|x| x > 0), "{key} in {v}");
    }
    for key in ["leaked_rooms", "leaked_participants", "leaked_calls"] {
        assert_eq!(v[key], 0, "{key} in {v}");
    }
    assert_eq!(v["server_alive"], true, "{v}");
    for key in [
        "leaves_clean",
        "leaves_abrupt",
        "transactions_replayed",
        "errors",
        "rss_start_kb",
        "rss_end_kb",
        "rss_peak_kb",
        "rss_drift_kb",
        "fds_start",
        "fds_end",
        "fds_peak",
        "store_bytes_start",
        "store_bytes_end",
        "settle_s",
    ] {
        assert!(v[key].is_number(), "{key} in {v}");
    }
    assert!(v["errors_by_kind"].is_object(), "{v}");
    assert!(v["samples"].as_array().is_some_and(|s| s.len() >= 3), "{v}");
}

/// Two probes per mode with the real LiveKit Python SDK (`CONCLAVE_LK_VENV`, from
/// `scripts/install-test-deps`; the bench fails saying so when it is missing): every probe
/// succeeds (`run_json` also asserts exit code 0, which a failed probe turns into 2) and every
/// figure is reported. No timing thresholds.
#[test]
fn bench_join_time_smoke() {
    let v = run_json(
        &["join-time", "--probes", "2", "--warmup", "0"],
        &["--max-seconds", "240"],
    );
    assert_eq!(v["scenario"], "join-time", "{v}");
    assert_eq!(v["truncated"], false, "{v}");
    assert!(v["sdk_version"].is_string(), "{v}");
    let modes = v["modes"].as_array().expect("modes");
    let names: Vec<&str> = modes.iter().filter_map(|m| m["mode"].as_str()).collect();
    assert_eq!(names, ["v1", "v0", "v0-fallback"], "{v}");
    for m in modes {
        assert_eq!(m["ok"], 2, "{m}");
        assert_eq!(m["failed"], 0, "{m}");
        for key in [
            "connect_ms",
            "subscribed_ms",
            "first_audio_ms",
            "first_video_ms",
        ] {
            for q in ["p50", "p90", "min", "max"] {
                assert!(
                    m[key][q].as_f64().is_some_and(|x| x > 0.0),
                    "{key}.{q} in {m}"
                );
            }
        }
    }
    for ratios in ["v1_over_v0", "v1_over_v0_fallback"] {
        for key in ["connect", "first_audio", "first_video"] {
            assert!(
                v[ratios][key].as_f64().is_some_and(|x| x > 0.0),
                "{ratios}.{key} in {v}"
            );
        }
    }
}

/// Without the LiveKit SDK venv, `join-time` stops and says how to install it.
#[test]
fn join_time_without_the_sdk_says_how_to_install_it() {
    let out = Command::new(binary())
        .args(["join-time", "--probes", "1"])
        .env_remove("CONCLAVE_LK_VENV")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("CONCLAVE_LK_VENV") && stderr.contains("scripts/install-test-deps"),
        "{stderr}"
    );
}
