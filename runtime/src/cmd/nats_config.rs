//! `branchpoint nats-config`: the nats-server configuration of a deployment
//! (compose), with one user per role (`roles`), and fresh passwords for it.
use anyhow::{Context, Result};

use crate::cli::NatsConfigArgs;
use crate::roles::{deployment_config, write_private, Credentials};

pub fn run(args: NatsConfigArgs) -> Result<()> {
    if let Some(dir) = args.conf.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.conf, deployment_config()).with_context(|| format!("writing {}", args.conf.display()))?;
    println!("nats-server configuration written to {}", args.conf.display());
    if let Some(env) = &args.env {
        if env.exists() {
            println!("{} exists: its passwords are kept (remove it for new ones)", env.display());
        } else {
            write_private(env, &Credentials::generate()?.env_file())?;
            println!("passwords for every role written to {} (readable by you only; keep it out of version control)", env.display());
        }
    }
    Ok(())
}
