//! schemathesis, the property-based API tester (installed from PyPI by `scripts/test-deps.sh`),
//! against the real server's `/openapi.json`: every operation called with valid and invalid input
//! drawn from the schema (examples, boundary values, fuzzing), and no answer may be a server error.
//! A bounded run (fixed seed, a few examples per operation); `SCHEMATHESIS_EXAMPLES` raises it.

use std::process::Command;

use crate::helpers::{serve, test_venv_bin};

#[tokio::test]
async fn no_generated_request_gets_a_server_error() {
    let st = test_venv_bin("st");
    let (dir, data) = crate::cli::docs_collection();
    let (mut server, base) = serve(&data, &[]).await;
    let examples = std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "8".to_string());
    let report = dir.path().join("schemathesis");
    let st_run = {
        let base = base.clone();
        let report = report.clone();
        tokio::task::spawn_blocking(move || {
            // Run in the temp dir: schemathesis keeps a cache (`.schemathesis/`) where it runs.
            Command::new(st)
                .current_dir(report.parent().expect("the report dir has a parent"))
                .args(["run", &format!("{base}/openapi.json")])
                .args(["--checks", "not_a_server_error"])
                .args(["--phases", "examples,coverage,fuzzing"])
                .args(["--max-examples", &examples, "--seed", "7", "--workers", "1"])
                .args(["--request-timeout", "120", "--suppress-health-check", "all"])
                .args(["--generation-database", "none", "--no-color"])
                .args(["--report", "junit", "--report-dir"])
                .arg(&report)
                .output()
                .expect("schemathesis runs")
        })
    };
    let out = st_run.await.expect("schemathesis finished");
    // The server must still answer after all of it.
    let alive = reqwest::get(format!("{base}/healthz"))
        .await
        .map(|r| r.status());
    server.kill().expect("stop the server");
    server.wait().expect("reaped");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found server errors (exit {:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(alive.as_ref().is_ok_and(|s| s.is_success()), "{alive:?}");
    println!("{stdout}");
}
