//! Layered configuration: built-in defaults < `branchpoint.toml` (or
//! `--config FILE`) < environment (`BRANCHPOINT_<SECTION>__<KEY>`) <
//! command-line flags.
//!
//! Every key is a command-line flag, so the two can never disagree: a key
//! `max_batch` in section `[worker]` is `branchpoint worker --max-batch`, and
//! section `[nats]` holds the NATS connection options of every command that
//! connects (`url` is `--nats`, `user` is `--nats-user`, and so on). Values
//! from the file and the environment are handed to the same parser as the
//! command line, after it, for each flag the command line did not set; so
//! they are validated exactly like flags, and errors name the key and where
//! it came from. `config/branchpoint.example.toml` documents the format.
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// Read from the working directory when no `--config` is given.
pub const DEFAULT_FILE: &str = "branchpoint.toml";
const ENV_PREFIX: &str = "BRANCHPOINT_";

/// The `[nats]` section: key -> the flag's id.
const NATS_KEYS: &[(&str, &str)] = &[
    ("url", "nats"),
    ("user", "nats_user"),
    ("password", "nats_password"),
    ("token", "nats_token"),
    ("tls", "nats_tls"),
    ("ca", "nats_ca"),
    ("cert", "nats_cert"),
    ("key", "nats_key"),
    ("kv_replicas", "kv_replicas"),
    ("device_plan_ttl_s", "device_plan_ttl_s"),
];

/// One configured value and where it came from, for error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub value: String,
    pub origin: String,
}

/// `section.key` -> setting, merged: the environment over the file.
pub type Settings = BTreeMap<String, Setting>;

fn flatten(value: config::Value, origin: &dyn Fn(&str) -> String, key: &str, out: &mut Settings) -> Result<()> {
    use config::ValueKind as K;
    let text = match value.kind {
        K::Table(t) => {
            for (k, v) in t {
                let sub = if key.is_empty() { k } else { format!("{key}.{k}") };
                flatten(v, origin, &sub, out)?;
            }
            return Ok(());
        }
        K::Array(items) => {
            let mut parts = Vec::new();
            for v in items {
                parts.push(v.into_string().with_context(|| format!("{}: {key}: list items must be plain values", origin(key)))?);
            }
            parts.join(",")
        }
        K::Nil => return Ok(()),
        _ => value.into_string().with_context(|| format!("{}: {key}", origin(key)))?,
    };
    out.insert(key.to_string(), Setting { value: text, origin: origin(key) });
    Ok(())
}

/// Reads the file (if any) and the environment variables with the prefix
/// and a `__` between section and key (others, such as `BRANCHPOINT_FONT`,
/// are not configuration).
pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Settings> {
    let mut out = Settings::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("could not read configuration file {}", path.display()))?;
        let cfg = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .build()
            .map_err(|e| anyhow::anyhow!("configuration file {}: {e}", path.display()))?;
        let table = cfg.cache;
        flatten(table, &|k| format!("{} (key {k})", path.display()), "", &mut out)?;
    }
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
        let Some((section, key)) = rest.split_once("__") else { continue };
        let key = format!("{}.{}", section.to_lowercase(), key.to_lowercase());
        out.insert(key, Setting { value, origin: format!("environment variable {name}") });
    }
    Ok(out)
}

/// The file to read: `--config FILE`, else `branchpoint.toml` if present.
pub fn config_file(explicit: Option<PathBuf>) -> Result<Option<PathBuf>> {
    match explicit {
        Some(p) if !p.is_file() => bail!("--config {}: no such file", p.display()),
        Some(p) => Ok(Some(p)),
        None => Ok(Path::new(DEFAULT_FILE).is_file().then(|| PathBuf::from(DEFAULT_FILE))),
    }
}

/// The flag of `sub` that `section.key` sets, or an error naming the key.
fn flag_for<'a>(cli: &'a Command, sub: &'a Command, section: &str, key: &str, origin: &str) -> Result<Option<&'a clap::Arg>> {
    let id = if section == "nats" {
        match NATS_KEYS.iter().find(|(k, _)| *k == key) {
            Some((_, id)) => *id,
            None => bail!("{origin}: unknown key nats.{key}; [nats] takes {}", NATS_KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")),
        }
    } else {
        let Some(target) = cli.find_subcommand(section) else {
            bail!("{origin}: unknown section [{section}]; sections are [nats] and the subcommands: {}", cli.get_subcommands().map(|c| c.get_name()).collect::<Vec<_>>().join(", "));
        };
        // A key is a flag's id, or one of its aliases with _ for -.
        let names_it =
            |a: &&clap::Arg| a.get_long().is_some() && (a.get_id().as_str() == key || a.get_all_aliases().into_iter().flatten().any(|alias| alias.replace('-', "_") == key));
        let Some(arg) = target.get_arguments().find(names_it) else {
            bail!("{origin}: unknown key {section}.{key}; `branchpoint {section} --help` lists the flags (a key is a flag's name with _ for -)");
        };
        if target.get_name() != sub.get_name() {
            return Ok(None);
        }
        arg.get_id().as_str()
    };
    Ok(sub.get_arguments().find(|a| a.get_id().as_str() == id))
}

/// The command line with the configured flags that it did not set itself
/// appended, for the chosen subcommand. Every key is checked, also those of
/// other subcommands, so that a typo is found whatever is run.
pub fn merged_args(cli: &Command, matches: &ArgMatches, args: Vec<OsString>, settings: &Settings) -> Result<Vec<OsString>> {
    let Some((name, sub_matches)) = matches.subcommand() else { return Ok(args) };
    let sub = cli.find_subcommand(name).expect("clap matched it");
    let mut out = args;
    for (full, setting) in settings {
        let Some((section, key)) = full.split_once('.') else {
            bail!("{}: key {full} belongs in a section, e.g. [worker] or [nats]", setting.origin);
        };
        let Some(arg) = flag_for(cli, sub, section, key, &setting.origin)? else { continue };
        let id = arg.get_id().as_str();
        if sub_matches.value_source(id) == Some(ValueSource::CommandLine) {
            continue;
        }
        let long = arg.get_long().expect("only long flags are configurable");
        if arg.get_action().takes_values() {
            // One word, so that a value such as "-3" is not taken for a flag.
            out.push(format!("--{long}={}", setting.value).into());
        } else {
            match setting.value.as_str() {
                "true" => out.push(format!("--{long}").into()),
                "false" => {}
                other => bail!("{}: {full} = {other:?}: give true or false", setting.origin),
            }
        }
    }
    Ok(out)
}

/// Checks every key against the flags it names, whatever subcommand runs.
pub fn validate(cli: &Command, settings: &Settings) -> Result<()> {
    for (full, setting) in settings {
        let Some((section, key)) = full.split_once('.') else {
            bail!("{}: key {full} belongs in a section, e.g. [worker] or [nats]", setting.origin);
        };
        flag_for(cli, cli, section, key, &setting.origin)?;
    }
    Ok(())
}

/// Which setting produced each configured flag, to name it when the
/// parser refuses a value.
pub fn explain(err: &clap::Error, settings: &Settings) -> String {
    // clap's first paragraph, without its "error: " and its usage hints.
    let full = err.to_string();
    let text = full.split("\n\n").next().unwrap_or(&full).trim().trim_start_matches("error: ").to_string();
    let blamed: Vec<String> = settings
        .iter()
        .filter(|(k, _)| {
            let key = k.split_once('.').map_or(k.as_str(), |(_, key)| key);
            text.contains(&format!("--{}", key.replace('_', "-"))) || NATS_KEYS.iter().any(|(n, id)| *n == key && text.contains(&format!("--{}", id.replace('_', "-"))))
        })
        .map(|(k, s)| format!("{k} = {:?} from {}", s.value, s.origin))
        .collect();
    if blamed.is_empty() {
        text
    } else {
        format!("{text}\nconfigured by: {}", blamed.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::cli::Cli;

    fn merged(cmdline: &[&str], file: &str, env: &[(&str, &str)]) -> Result<Cli> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        std::fs::write(&path, file).unwrap();
        let settings = load(Some(&path), env.iter().map(|(k, v)| (k.to_string(), v.to_string())))?;
        let cli = Cli::command();
        let args: Vec<OsString> = cmdline.iter().map(OsString::from).collect();
        let matches = cli.clone().try_get_matches_from(args.clone())?;
        let args = merged_args(&cli, &matches, args, &settings)?;
        use clap::FromArgMatches;
        let m = cli.clone().try_get_matches_from(args).map_err(|e| anyhow::anyhow!(explain(&e, &settings)))?;
        Ok(Cli::from_arg_matches(&m)?)
    }

    fn worker(cli: Cli) -> crate::cli::WorkerArgs {
        match cli.command {
            crate::cli::Command::Worker(w) => w,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_key_may_be_a_flag_alias_and_the_flag_still_wins() {
        let fleet = |cli: Cli| match cli.command {
            crate::cli::Command::Fleet(f) => f,
            other => panic!("{other:?}"),
        };
        assert_eq!(fleet(merged(&["branchpoint", "fleet"], "[fleet]\npartition_branch = 2\n", &[]).unwrap()).partition_branch.get(), 2);
        assert_eq!(fleet(merged(&["branchpoint", "fleet"], "[fleet]\nbranch = 3\n", &[]).unwrap()).partition_branch.get(), 3, "the old key");
        assert_eq!(
            fleet(merged(&["branchpoint", "fleet", "--branch", "1"], "[fleet]\npartition_branch = 2\n", &[]).unwrap()).partition_branch.get(),
            1,
            "the alias on the command line"
        );
        assert!(merged(&["branchpoint", "fleet"], "[fleet]\nbranches = 2\n", &[]).is_err(), "not an alias");
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file_which_beats_defaults() {
        let file = "[worker]\nmax_batch = 8\nmax_wait_us = 700\n[nats]\nurl = \"nats://file:4222\"\ntls = true\n";
        let w = worker(merged(&["branchpoint", "worker"], file, &[]).unwrap());
        assert_eq!((w.max_batch, w.max_wait_us, w.nats.nats.as_deref(), w.nats.nats_tls), (8, 700, Some("nats://file:4222"), true));
        let env = [("BRANCHPOINT_WORKER__MAX_BATCH", "16"), ("BRANCHPOINT_NATS__URL", "nats://env:4222"), ("BRANCHPOINT_FONT", "/x.ttf")];
        let w = worker(merged(&["branchpoint", "worker"], file, &env).unwrap());
        assert_eq!((w.max_batch, w.max_wait_us, w.nats.nats.as_deref()), (16, 700, Some("nats://env:4222")));
        let w = worker(merged(&["branchpoint", "worker", "--max-batch", "4", "--nats", "nats://flag:4222"], file, &env).unwrap());
        assert_eq!((w.max_batch, w.nats.nats.as_deref()), (4, Some("nats://flag:4222")));
        let w = worker(merged(&["branchpoint", "worker"], "", &[]).unwrap());
        assert_eq!((w.max_batch, w.nats.nats.as_deref(), w.nats.nats_tls), (32, None, false), "built-in defaults");
        // Lists become the flag's comma-separated form.
        let cli = merged(&["branchpoint", "profile"], "[profile]\nbatch_sizes = [1, 8]\n", &[]).unwrap();
        match cli.command {
            crate::cli::Command::Profile(p) => assert_eq!(p.batch_sizes, vec![1, 8]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/branchpoint.example.toml");
        let settings = load(Some(&path), Vec::new()).unwrap();
        assert!(settings.len() >= 12, "{settings:?}");
        validate(&Cli::command(), &settings).unwrap();
        let w = worker(merged(&["branchpoint", "worker"], &std::fs::read_to_string(&path).unwrap(), &[]).unwrap());
        assert_eq!((w.max_wait_us, w.nats.nats.as_deref()), (2000, Some("nats://127.0.0.1:4222")));
    }

    #[test]
    fn errors_name_the_key_and_where_it_came_from() {
        let e = |file: &str, env: &[(&str, &str)]| format!("{:#}", merged(&["branchpoint", "worker"], file, env).unwrap_err());
        let m = e("[worker]\nmax_batchh = 3\n", &[]);
        assert!(m.contains("worker.max_batchh") && m.contains("b.toml"), "{m}");
        let m = e("[nats]\nuri = \"x\"\n", &[]);
        assert!(m.contains("nats.uri") && m.contains("url"), "{m}");
        let m = e("[workers]\ncount = 3\n", &[]);
        assert!(m.contains("[workers]") && m.contains("worker"), "{m}");
        let m = e("", &[("BRANCHPOINT_WORKER__MAX_BATCH", "lots")]);
        assert!(m.contains("--max-batch") && m.contains("BRANCHPOINT_WORKER__MAX_BATCH") && m.contains("lots"), "{m}");
        let m = e("[worker]\nmax_batch = \"many\"\n", &[]);
        assert!(m.contains("worker.max_batch") && m.contains("b.toml"), "{m}");
        let m = e("[nats]\ntls = \"yes\"\n", &[]);
        assert!(m.contains("nats.tls") && m.contains("true or false"), "{m}");
        let m = e("[worker\n", &[]);
        assert!(m.contains("b.toml"), "{m}");
        let m = e("max_batch = 3\n", &[]);
        assert!(m.contains("belongs in a section"), "{m}");
        // A key for another subcommand is checked, and otherwise ignored.
        assert!(merged(&["branchpoint", "worker"], "[fleet]\ndevices = 3\n", &[]).is_ok());
        assert!(format!("{:#}", merged(&["branchpoint", "worker"], "[fleet]\ndevicez = 3\n", &[]).unwrap_err()).contains("fleet.devicez"));
    }
}
