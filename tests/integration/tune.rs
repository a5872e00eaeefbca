//! `collection tune` through the real binary on a slice of SQuAD dev: the report, the held-out
//! guard, `--dry-run`, and the errors a user can cause.

use crate::cli::{domainrag, ok};
use crate::helpers::repo_root;

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("stdout is one JSON document")
}

/// The first `n` articles of SQuAD dev (fetched by scripts/fetch-models.sh) as a SQuAD file.
fn squad_slice(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let full = repo_root().join("data/squad/squaddev_v1.1.json");
    let text = std::fs::read_to_string(&full).expect("SQuAD dev is fetched");
    let mut data: serde_json::Value = serde_json::from_str(&text).expect("SQuAD JSON");
    data["data"].as_array_mut().expect("articles").truncate(n);
    let path = dir.join("slice.json");
    std::fs::write(&path, data.to_string()).expect("write slice");
    path
}

fn title_weight(data: &std::path::Path) -> f64 {
    let show = json(&domainrag(data, &["collection", "show", "sq", "--json"]));
    show["settings"]["bm25"]["title_weight"]
        .as_f64()
        .unwrap_or_else(|| panic!("bm25 settings shown: {show}"))
}

#[test]
fn tune_reports_applies_only_what_holds_and_names_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let slice = squad_slice(dir.path(), 2);
    let slice_arg = slice.to_str().expect("utf-8 path");
    ok(&domainrag(&data, &["collection", "create", "sq"]));
    ok(&domainrag(
        &data,
        &[
            "ingest",
            "-c",
            "sq",
            "--format",
            "squad",
            "--no-progress",
            slice_arg,
        ],
    ));
    assert_eq!(title_weight(&data), 0.5, "a new collection's default");

    let tune = |extra: &[&str]| {
        let mut args = vec!["collection", "tune", "-c", "sq", "--json"];
        args.extend_from_slice(extra);
        domainrag(&data, &args)
    };
    let qa = ["--questions", slice_arg, "--format", "squad"];
    let dry = json(&tune(&[&qa[..], &["--dry-run"]].concat()));
    let questions = dry["questions"].as_u64().expect("questions");
    assert!(questions >= 100, "{dry}");
    assert_eq!(
        dry["tuned_on"].as_u64().unwrap() + dry["held_out"].as_u64().unwrap(),
        questions
    );
    // 5 title weights x 3 window weights x 2 pair weights x 3 (k1, b) x 63 fusions, and the
    // current settings.
    assert_eq!(dry["variants_tried"], 5671);
    assert_eq!(dry["applied"], false);
    assert_eq!(dry["before"]["settings"]["bm25"]["title_weight"], 0.5);
    assert_eq!(dry["before"]["settings"]["bm25"]["window_weight"], 2.0);
    assert_eq!(dry["before"]["settings"]["bm25"]["pair_weight"], 0.75);
    assert_eq!(dry["before"]["settings"]["bm25"]["k1"], 1.2);
    for side in ["before", "best"] {
        for part in ["tuning", "held_out"] {
            let v = dry[side][part]["ndcg@10"].as_f64().expect("ndcg");
            assert!((0.0..=1.0).contains(&v), "{side} {part}: {v}");
        }
    }
    let best_tuning = dry["best"]["tuning"]["ndcg@10"].as_f64().unwrap();
    let before_tuning = dry["before"]["tuning"]["ndcg@10"].as_f64().unwrap();
    assert!(
        best_tuning >= before_tuning,
        "the current settings are in the grid"
    );
    assert_eq!(title_weight(&data), 0.5, "--dry-run saves nothing");

    let run = json(&tune(&qa));
    let best = &run["best"];
    let gain = &run["held_out_gain"];
    assert!(gain["low"].as_f64() <= gain["high"].as_f64(), "{run}");
    if run["applied"] == true {
        assert!(
            best["held_out"]["ndcg@10"].as_f64() >= run["before"]["held_out"]["ndcg@10"].as_f64()
        );
        assert!(gain["low"].as_f64().unwrap() > 0.0, "{run}");
        assert_eq!(
            title_weight(&data),
            best["settings"]["bm25"]["title_weight"].as_f64().unwrap()
        );
    } else {
        assert_eq!(title_weight(&data), 0.5, "kept: {}", run["decision"]);
    }

    // Questions drafted from the collection's own sentences need no QA pairs.
    let synthetic = tune(&["--synthetic", "400", "--dry-run"]);
    if synthetic.status.success() {
        let report: serde_json::Value =
            serde_json::from_slice(&synthetic.stdout).expect("JSON report");
        assert!(report["questions"].as_u64().unwrap() >= 20);
    } else {
        let stderr = String::from_utf8_lossy(&synthetic.stderr);
        assert!(stderr.contains("at least 20 questions"), "{stderr}");
    }

    for (args, says) in [
        (vec!["--synthetic", "3"], "at least 20 questions"),
        (
            [&qa[..], &["--holdout", "0.95"]].concat(),
            "--holdout must be between 0.1 and 0.9",
        ),
    ] {
        let out = tune(&args);
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let missing = domainrag(
        &data,
        &["collection", "tune", "-c", "nope", "--synthetic", "50"],
    );
    assert!(!missing.status.success());
}
