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
