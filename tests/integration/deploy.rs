//! The on-prem files: docker-compose.yml is parsed and checked against the real config (every
//! DOMAINRAG__ variable must name a real key and load), since no Docker engine runs here.

use domainrag::config::{Settings, Sources};

use crate::helpers::repo_root;

fn compose() -> serde_json::Value {
    let text =
        std::fs::read_to_string(repo_root().join("docker-compose.yml")).expect("compose file");
    config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Yaml))
        .build()
        .expect("valid YAML")
        .try_deserialize()
        .expect("compose as JSON")
}

#[test]
fn compose_runs_the_app_against_qdrant_with_valid_settings() {
    let c = compose();
    let services = c["services"].as_object().expect("services");
    assert!(services.contains_key("qdrant") && services.contains_key("domainrag"));
    assert!(
        c["services"]["qdrant"]["image"]
            .as_str()
            .unwrap()
            .starts_with("qdrant/qdrant")
    );
    let app = &c["services"]["domainrag"];
    assert_eq!(app["ports"][0], "8080:8080");
    assert_eq!(app["volumes"][0], "./data:/app/data");
    assert!(app["healthcheck"]["test"].to_string().contains("/readyz"));
    assert_eq!(app["depends_on"]["qdrant"]["condition"], "service_healthy");

    // Every DOMAINRAG__ variable is a real key: load the config the way the container would.
    let env = app["environment"].as_object().expect("environment");
    let mut toml = String::new();
    let mut sections: std::collections::BTreeMap<String, Vec<(String, String)>> =
        Default::default();
    for (key, value) in env {
        let path: Vec<String> = key
            .strip_prefix("DOMAINRAG__")
            .expect("only DOMAINRAG__ variables")
            .split("__")
            .map(str::to_lowercase)
            .collect();
        let (field, section) = path.split_last().expect("section and key");
        let value = value
            .as_str()
            .unwrap_or_default()
            .replace("${QDRANT_API_KEY:-change-me}", "k");
        sections
            .entry(section.join("."))
            .or_default()
            .push((field.clone(), value));
    }
    for (section, fields) in sections {
        toml.push_str(&format!("[{section}]\n"));
        for (k, v) in fields {
            toml.push_str(&format!("{k} = {v:?}\n"));
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("compose.toml");
    std::fs::write(&file, &toml).expect("write");
    let settings = Settings::load(&Sources {
        file: Some(file),
        ..Sources::default()
    })
    .unwrap_or_else(|e| panic!("compose environment does not load: {e}\n{toml}"));
    assert_eq!(settings.vectors.qdrant.url, "http://qdrant:6334");
    assert_eq!(settings.server.bind, "0.0.0.0:8080");
}

#[test]
fn dockerfiles_build_the_binary_and_serve() {
    for (file, feature) in [
        ("Dockerfile", None),
        ("Dockerfile.cuda", Some("--features cuda")),
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).expect("dockerfile");
        assert!(text.contains("cargo build --release --locked"), "{file}");
        if let Some(f) = feature {
            assert!(text.contains(f), "{file} builds with {f}");
        }
        assert!(text.contains("CMD [\"serve\"]"), "{file}");
        for dir in ["src", "config", "web"] {
            assert!(
                text.contains(&format!("COPY {dir} ./{dir}")),
                "{file} copies {dir}"
            );
        }
    }
}
