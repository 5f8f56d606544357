//! What a deployment relies on: `.env.example` lists every variable the binary reads,
//! `submission.json` says what the contract says, and a malformed variable exits 2.

use std::collections::BTreeSet;
use std::process::Command;

use cqrs_analytics::config::VARIABLES;

fn env_example_keys() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).unwrap();
    text.lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .filter(|k| !k.starts_with('#') && !k.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn env_example_lists_every_variable_the_binary_reads() {
    let keys = env_example_keys();
    let missing: Vec<&str> = VARIABLES
        .iter()
        .map(|v| v.name)
        .filter(|k| !keys.contains(*k))
        .collect();
    assert!(missing.is_empty(), ".env.example lacks {missing:?}");
    assert!(keys.contains("RUST_LOG"));
    // And the code reads no variable outside the table: every env lookup goes through
    // Config::from_env, so a grep for other lookups must find none.
    for file in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src")).unwrap() {
        let path = file.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.contains("env::var(") {
                assert!(
                    line.contains("std::env::var(k)"),
                    "{}:{}: reads an environment variable outside config::VARIABLES: {line}",
                    path.display(),
                    i + 1
                );
            }
        }
    }
}

#[test]
fn submission_json_names_both_services() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/submission.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"commandServiceUrl": "http://localhost:8080", "queryServiceUrl": "http://localhost:8081"})
    );
}

#[test]
fn malformed_variable_exits_2_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .arg("query-service")
        .env("QUERY_HTTP_WORKERS", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("QUERY_HTTP_WORKERS"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .arg("bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn healthcheck_subcommand_reports_the_health_of_a_port() {
    // The container health check: the runtime image has no curl.
    let env = crate::harness::TestEnv::new();
    let app = env.start(cqrs_analytics::app::Role::Query);
    let port = app.query().port().to_string();
    let ok = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .args(["healthcheck", &port])
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let down = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .args(["healthcheck", &closed])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    let usage = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .args(["healthcheck", "x"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}
