//! compose.yaml cannot run here (no Docker engine), so it is checked against
//! the real CLI: every service's command must parse, with the layered
//! configuration its environment adds, as the subcommand the service is
//! named for; every service has a healthcheck that its command can satisfy;
//! workers can be scaled.
use std::ffi::OsString;
use std::path::Path;

use branchpoint::cli::{Cli, Command};
use clap::{CommandFactory, Parser};
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Parses `branchpoint ARGS` as the binary does, with `env` as the
/// environment layer of the configuration (and no configuration file).
fn parse(args: &[String], env: Vec<(String, String)>) -> Result<Cli, String> {
    let argv: Vec<OsString> = std::iter::once("branchpoint".into()).chain(args.iter().map(OsString::from)).collect();
    let command = Cli::command();
    let matches = command.clone().try_get_matches_from(argv.clone()).map_err(|e| e.to_string())?;
    let settings = branchpoint::config::load(None, env).map_err(|e| format!("{e:#}"))?;
    let argv = branchpoint::config::merged_args(&command, &matches, argv, &settings).map_err(|e| format!("{e:#}"))?;
    Cli::try_parse_from(argv).map_err(|e| e.to_string())
}

/// A service's value for `key`, looking through `<<:` merges (the file's
/// shared settings come in through an anchor).
fn get<'a>(service: &'a Yaml, key: &str) -> Option<&'a Yaml> {
    let direct = &service[key];
    if !direct.is_badvalue() {
        return Some(direct);
    }
    let merged = &service["<<"];
    (!merged.is_badvalue()).then(|| get(merged, key)).flatten()
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec().unwrap_or_else(|| panic!("expected a list, got {y:?}")).iter().map(|v| v.as_str().expect("a string").to_string()).collect()
}

#[test]
fn every_compose_service_runs_a_real_subcommand_with_valid_flags() {
    let text = std::fs::read_to_string(repo().join("compose.yaml")).expect("compose.yaml at the repository root");
    let docs = YamlLoader::load_from_str(&text).expect("compose.yaml is valid YAML");
    let services = &docs[0]["services"];
    let names: Vec<&str> = services.as_hash().expect("a services map").keys().filter_map(Yaml::as_str).collect();
    for want in ["nats", "worker", "calibrator", "planner", "api", "fleet"] {
        assert!(names.contains(&want), "compose.yaml has no {want} service: {names:?}");
    }

    // NATS: the official image, configured by deploy/nats.conf (JetStream,
    // which the control store needs, and one user per role), which must be
    // what `branchpoint nats-config` writes today.
    let nats = &services["nats"];
    assert!(nats["image"].as_str().unwrap().starts_with("nats:"), "the official nats image");
    assert_eq!(strings(&nats["command"]), ["-c", "/etc/nats/nats.conf"]);
    assert!(strings(&nats["volumes"]).contains(&"./deploy/nats.conf:/etc/nats/nats.conf:ro".to_string()));
    let conf = std::fs::read_to_string(repo().join("deploy/nats.conf")).expect("deploy/nats.conf");
    assert_eq!(conf, branchpoint::roles::deployment_config(), "deploy/nats.conf is stale: run `branchpoint nats-config`");
    assert!(conf.contains("jetstream"), "JetStream on");
    for role in branchpoint::roles::Role::ALL {
        let var = branchpoint::roles::password_variable(role);
        assert!(conf.contains(&format!("${var}")) && !nats["environment"][var.as_str()].is_badvalue(), "nats gets {var}");
    }
    assert!(!nats["healthcheck"].is_badvalue());

    for name in ["worker", "calibrator", "planner", "api", "fleet"] {
        let service = &services[name];
        let args = strings(get(service, "command").unwrap_or_else(|| panic!("{name} has no command")));
        let env: Vec<(String, String)> = match get(service, "environment").and_then(Yaml::as_hash) {
            Some(h) => h
                .iter()
                .map(|(k, v)| {
                    // Compose substitutes ${VAR:-default}; a test value stands in.
                    let v = v.as_str().map_or_else(|| format!("{v:?}"), |s| if s.contains("${") { "compose-secret".into() } else { s.into() });
                    (k.as_str().unwrap().to_string(), v)
                })
                .collect(),
            None => Vec::new(),
        };
        let cli = parse(&args, env.clone()).unwrap_or_else(|e| panic!("service {name}: `branchpoint {}` does not parse:\n{e}", args.join(" ")));
        let matches = match (&cli.command, name) {
            (Command::Worker(a), "worker") => a.nats.nats.is_some() && a.service.ready_file.is_some(),
            (Command::Calibrator(a), "calibrator") => a.nats.nats.is_some() && a.service.ready_file.is_some(),
            (Command::Planner(a), "planner") => a.nats.nats.is_some() && a.service.ready_file.is_some(),
            (Command::Serve(a), "api") => {
                assert_eq!(a.http.token.as_deref(), Some("compose-secret"), "the api's token comes from BRANCHPOINT_SERVE__TOKEN");
                a.nats.nats.is_some() && a.http.listen.starts_with("0.0.0.0:")
            }
            (Command::Fleet(a), "fleet") => a.nats.nats.is_some() && a.service.ready_file.is_some(),
            _ => false,
        };
        assert!(matches, "service {name} runs {:?}, not its own subcommand over NATS", cli.command);
        // Each connects as its role's user.
        let role = match name {
            "fleet" => "device",
            "api" => "api",
            other => other,
        };
        assert!(env.iter().any(|(k, v)| k == "BRANCHPOINT_NATS__USER" && v == role), "service {name} connects as {role}: {env:?}");
        assert!(env.iter().any(|(k, _)| k == "BRANCHPOINT_NATS__PASSWORD"), "service {name} has its role's password");
        for (k, _) in &env {
            assert!(k.starts_with("BRANCHPOINT_"), "service {name}: environment {k} is not a branchpoint setting");
        }

        let health = get(service, "healthcheck").unwrap_or_else(|| panic!("{name} has no healthcheck"));
        let test = strings(&health["test"]).join(" ");
        if test.contains("/tmp/ready") {
            let i = args.iter().position(|a| a == "--ready-file").unwrap_or_else(|| panic!("{name}'s healthcheck waits for a ready file its command never creates"));
            assert_eq!(args[i + 1], "/tmp/ready", "service {name}");
        } else {
            assert!(test.contains("/readyz"), "service {name}: healthcheck {test}");
        }
    }

    // Workers scale: no fixed name, no published port.
    let worker = &services["worker"];
    assert!(get(worker, "container_name").is_none() && get(worker, "ports").is_none(), "`--scale worker=N` needs workers without a fixed name or port");

    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("a Dockerfile");
    assert!(dockerfile.contains("ENTRYPOINT [\"branchpoint\"]"), "compose commands are branchpoint's arguments");
}

#[test]
fn a_bad_command_in_compose_would_be_caught() {
    // The check above is only worth something if parsing can fail.
    let e = parse(&["worker".into(), "--nats".into(), "nats://x:4222".into(), "--max-btach".into(), "3".into()], Vec::new()).err().unwrap();
    assert!(e.contains("--max-btach"), "{e}");
    let e = parse(&["serve".into(), "--nats".into(), "nats://x:4222".into()], vec![("BRANCHPOINT_SERVE__TOKN".into(), "x".into())]).err().unwrap();
    assert!(e.contains("TOKN") || e.contains("tokn"), "{e}");
}
