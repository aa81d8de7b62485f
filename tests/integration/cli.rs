//! The `conclave` command line: embedded defaults, generated secrets, config errors.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::conclave::{binary, eventually, Conclave, ConclaveOptions};

fn bare_command(cwd: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(args).current_dir(cwd).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// `conclave serve` with no arguments and no environment, in an empty directory: starts on
/// 127.0.0.1:8080 with ./conclave-data, generates secrets, keeps them across a restart.
#[tokio::test]
async fn serve_with_no_arguments_uses_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        std::net::TcpListener::bind("127.0.0.1:8080").is_ok(),
        "port 8080 is busy on this machine; the default-bind test needs it free"
    );
    let mut secrets_seen = Vec::new();
    for _ in 0..2 {
        let log = dir.path().join("out.log");
        let mut child = bare_command(dir.path(), &["serve"])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let healthy = eventually(Duration::from_secs(20), "/healthz on :8080", || async {
            Ok(reqwest::get("http://127.0.0.1:8080/healthz")
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        })
        .await;
        let banner = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().unwrap();
        healthy.unwrap();
        assert!(status.success(), "graceful shutdown on SIGTERM: {status}");
        assert!(banner.contains("http://127.0.0.1:8080"), "{banner}");
        assert!(banner.contains("conclave-data"), "{banner}");
        assert!(banner.contains("generate-registration"), "{banner}");
        let secrets =
            std::fs::read_to_string(dir.path().join("conclave-data/secrets.toml")).unwrap();
        assert!(secrets.contains("hs_token"));
        assert!(dir.path().join("conclave-data/conclave.db").exists());
        secrets_seen.push(secrets);
    }
    assert_eq!(
        secrets_seen[0], secrets_seen[1],
        "secrets persist across restarts"
    );

    // generate-registration in the same directory uses the same persisted secrets.
    let out = bare_command(dir.path(), &["generate-registration", "--output", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let secrets: toml::Table = secrets_seen[0].parse().unwrap();
    assert_eq!(yaml["hs_token"].as_str(), secrets["hs_token"].as_str());
    assert_eq!(yaml["as_token"].as_str(), secrets["as_token"].as_str());
    assert_eq!(yaml["url"].as_str(), Some("http://127.0.0.1:8080"));
}

#[tokio::test]
async fn bad_config_file_names_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("conclave.toml");
    std::fs::write(&file, "[http]\nbind = \"not-an-address\"\n").unwrap();
    for sub in ["serve", "check-config"] {
        let out = bare_command(dir.path(), &[sub, "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sub}: {stderr}");
        assert!(stderr.contains("http.bind"), "{stderr}");
        assert!(stderr.contains("not-an-address"), "{stderr}");
        assert!(stderr.contains("conclave.toml"), "{stderr}");
    }
    // A syntax error is also exit 2 and says where.
    std::fs::write(&file, "[http\nbind = 1\n").unwrap();
    let out = bare_command(
        dir.path(),
        &["check-config", "--config", file.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line"));
}

#[tokio::test]
async fn bad_env_override_names_variable_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = bare_command(dir.path(), &["serve"])
        .env("CONCLAVE_RTC__UDP_PORT", "seventy")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("rtc.udp_port"), "{stderr}");
    assert!(stderr.contains("seventy"), "{stderr}");
    assert!(stderr.contains("CONCLAVE_RTC__UDP_PORT"), "{stderr}");
    assert!(
        !dir.path().join("conclave-data").exists(),
        "a bad config must not touch the data dir"
    );

    let out = bare_command(dir.path(), &["check-config"])
        .env("CONCLAVE_MATRIX__HOMESERVER_URL", "ftp://nope")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("matrix.homeserver_url"), "{stderr}");
}

#[tokio::test]
async fn generate_config_prints_the_checked_in_example() {
    let dir = tempfile::tempdir().unwrap();
    let out = bare_command(dir.path(), &["generate-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let checked_in = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conclave.example.toml"
    ))
    .unwrap();
    assert_eq!(text, checked_in);
    // What it prints is a valid config file.
    let file = dir.path().join("c.toml");
    std::fs::write(&file, &text).unwrap();
    let out = bare_command(
        dir.path(),
        &["check-config", "--config", file.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn serve_keeps_running_when_homeserver_is_unreachable() {
    let mut c = Conclave::start(ConclaveOptions::standalone())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "a failed ping", || async {
        Ok((c.metric("conclave_homeserver_pings_failed_total").await? >= 1).then_some(()))
    })
    .await
    .unwrap();
    assert!(c.logs().contains("homeserver ping failed"), "{}", c.logs());
    assert!(c.is_running());
    let r = reqwest::get(format!("{}/healthz", c.url)).await.unwrap();
    assert_eq!(r.status(), 200);
    c.stop().await.unwrap();
}

/// Runs `cmd`, asserts it succeeded (its stderr otherwise) and parses its stdout as JSON.
fn json_output(cmd: &mut std::process::Command) -> serde_json::Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn print_discovery_points_at_the_token_service() {
    let dir = tempfile::tempdir().unwrap();
    let v = json_output(
        bare_command(dir.path(), &["print-discovery", "--json"]).env(
            "CONCLAVE_HTTP__PUBLIC_URL",
            "https://rtc.ministry.example/livekit/jwt",
        ),
    );
    let t = &v["synapse"]["matrix_rtc"]["transports"][0];
    assert_eq!(t["type"], "livekit");
    assert_eq!(
        t["livekit_service_url"],
        "https://rtc.ministry.example/livekit/jwt"
    );
    assert_eq!(
        v["synapse"]["experimental_features"]["msc4143_enabled"],
        true
    );
    assert_eq!(
        v["well_known_client"]["org.matrix.msc4143.rtc_foci"][0]["livekit_service_url"],
        "https://rtc.ministry.example/livekit/jwt"
    );
    // The annotated form carries the same YAML block Synapse accepts.
    let out = bare_command(dir.path(), &["print-discovery"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let yaml_part: String = text
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .take_while(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let y: serde_yaml::Value = serde_yaml::from_str(&yaml_part).unwrap();
    assert_eq!(
        y["matrix_rtc"]["transports"][0]["livekit_service_url"],
        "http://127.0.0.1:8080"
    );
}

#[tokio::test]
async fn msc4512_registration_and_discovery() {
    let dir = tempfile::tempdir().unwrap();
    let out = bare_command(
        dir.path(),
        &[
            "generate-registration",
            "--url",
            "http://conclave.internal:8080/",
            "--output",
            "-",
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success());
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(yaml["io.element.msc4512.proxy_prefix"], "rtc/livekit");
    assert_eq!(
        yaml["io.element.msc4512.proxy_url"],
        "http://conclave.internal:8080"
    );
    assert_eq!(yaml["url"], "http://conclave.internal:8080");
    assert_eq!(
        yaml["io.element.msc4502.scopes"][0],
        "urn:matrix:client:io.element.msc4502:rooms:is_joined"
    );

    let v = json_output(
        bare_command(dir.path(), &["print-discovery", "--json", "--msc4512"])
            .env("CONCLAVE_LIVEKIT__PUBLIC_URL", "wss://sfu.ministry.example"),
    );
    let flags = &v["synapse"]["experimental_features"];
    assert_eq!(flags["msc4512_enabled"], true);
    assert_eq!(flags["msc4502_enabled"], true);
    assert_eq!(flags["msc4143_enabled"], true);
    assert_eq!(
        v["synapse"]["matrix_rtc"]["transports"],
        serde_json::json!([{"type": "livekit", "url": "wss://sfu.ministry.example"}])
    );
    // The annotated form: the same block, as YAML.
    let out = bare_command(dir.path(), &["print-discovery", "--msc4512"])
        .env("CONCLAVE_LIVEKIT__PUBLIC_URL", "wss://sfu.ministry.example")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("MSC4512"), "{text}");
    let yaml_part: String = text
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .take_while(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let y: serde_yaml::Value = serde_yaml::from_str(&yaml_part).unwrap();
    assert_eq!(y["experimental_features"]["msc4512_enabled"], true);
    assert_eq!(
        y["matrix_rtc"]["transports"][0]["url"],
        "wss://sfu.ministry.example"
    );
}
