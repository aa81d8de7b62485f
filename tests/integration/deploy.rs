//! The deployment files: docker-compose.yml is consistent with the repository (docker itself
//! is not available here, so `docker compose config` cannot run), and the Conclave config it
//! mounts passes `conclave check-config`.

use std::path::Path;
use std::process::Command;

use crate::support::conclave::binary;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn compose_services_and_mounts_exist() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docker-compose.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().expect("services");
    for name in ["synapse", "conclave"] {
        assert!(services.contains_key(name), "service {name}");
    }
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        assert!(
            svc.get("image").is_some() || svc.get("build").is_some(),
            "{name} has image or build"
        );
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let spec = v.as_str().unwrap();
            let source = spec.split(':').next().unwrap();
            if source.starts_with("./") {
                assert!(
                    Path::new(ROOT).join(source).exists(),
                    "{name}: mounted {source} exists"
                );
            }
        }
    }
    let conclave_mounts: Vec<&str> = services["conclave"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(conclave_mounts
        .iter()
        .any(|m| m.starts_with("./deploy/conclave/conclave.toml:")));
    if let Some(build) = services["conclave"]["build"]["dockerfile"].as_str() {
        assert!(Path::new(ROOT).join(build).exists());
    }
}

#[test]
fn compose_conclave_config_is_valid() {
    let out = Command::new(binary())
        .args(["check-config", "--config"])
        .arg(Path::new(ROOT).join("deploy/conclave/conclave.toml"))
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn example_registration_matches_generated_shape() {
    let example: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("appservice.yaml")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["generate-registration", "--output", "-"])
        .env_clear()
        .env("CONCLAVE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let keys = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(keys(&example), keys(&generated));
    assert_eq!(example["namespaces"], generated["namespaces"]);
}
