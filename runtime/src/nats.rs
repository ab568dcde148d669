//! Connecting to NATS from the command line's options, with errors that say
//! what to check.
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::NatsArgs;

/// The servers of `--nats`: one URL, or several separated by commas (the
/// members of a cluster; the client connects to one, fails over to the
/// others, and learns the rest from the cluster).
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>> {
    let addrs: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse::<async_nats::ServerAddr>().with_context(|| format!("--nats: {u:?} is not a NATS URL (nats://HOST:PORT)")))
        .collect::<Result<_>>()?;
    anyhow::ensure!(!addrs.is_empty(), "--nats {urls:?}: give at least one URL, e.g. nats://127.0.0.1:4222");
    Ok(addrs)
}

/// Connects to `args.nats` (which must be set), with the authentication and
/// TLS options given. Fails within a few seconds if no server answers.
pub async fn connect(args: &NatsArgs, client_name: &str) -> Result<async_nats::Client> {
    let url = args.nats.as_deref().context("no --nats URL given")?;
    let addrs = server_addrs(url)?;
    let who = match &args.nats_user {
        Some(u) => format!("{client_name} (NATS user {u})"),
        None => client_name.to_string(),
    };
    let mut opts = async_nats::ConnectOptions::new()
        .name(client_name)
        .connection_timeout(Duration::from_secs(3))
        // Each offload sets its own timeout from its deadline.
        .request_timeout(None)
        // A permission the server denies is said out loud, with who was
        // denied: the operation itself only times out or goes unanswered.
        .event_callback(move |event| {
            let who = who.clone();
            async move {
                match event {
                    async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                        tracing::warn!("{who}: NATS refused the credentials; check --nats-user/--nats-password (or [nats] user and password)")
                    }
                    async_nats::Event::ServerError(async_nats::ServerError::Other(e)) if e.to_lowercase().contains("permission") => {
                        tracing::warn!("{who}: NATS denied an operation: {e}; this role may not do that (see README, \"Roles and TLS\")");
                        // A subscription is what the service serves or
                        // learns from: without it, it would look healthy and
                        // do nothing. Stop, and exit 1.
                        if e.to_lowercase().contains("subscription") {
                            crate::shutdown::fail(format!("{who}: NATS denied a subscription it needs ({e}); connect as a user whose role allows it"));
                        }
                    }
                    async_nats::Event::SlowConsumer(sid) => tracing::warn!("{who}: NATS dropped messages of subscription {sid}: it fell behind"),
                    _ => {}
                }
            }
        });
    if let (Some(user), Some(password)) = (&args.nats_user, &args.nats_password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &args.nats_token {
        opts = opts.token(token.clone());
    }
    // A CA or a client certificate means the user wants TLS: never fall
    // back to plain text against a server that does not offer it.
    if args.nats_tls || args.nats_ca.is_some() || args.nats_cert.is_some() {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &args.nats_ca {
        anyhow::ensure!(ca.is_file(), "--nats-ca {}: no such file", ca.display());
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&args.nats_cert, &args.nats_key) {
        for f in [cert, key] {
            anyhow::ensure!(f.is_file(), "{}: no such file (--nats-cert / --nats-key)", f.display());
        }
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    opts.connect(addrs).await.with_context(|| {
        format!(
            "could not connect to NATS at {url}; start a server (scripts/setup.sh installs one as \
             .venv/bin/nats-server) or check --nats and the credentials"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::server_addrs;

    #[test]
    fn several_urls_separated_by_commas() {
        assert_eq!(server_addrs("nats://127.0.0.1:4222").unwrap().len(), 1);
        let v = server_addrs("nats://a:4222, nats://b:4223,nats://c:4224").unwrap();
        assert_eq!(v.iter().map(|a| a.port()).collect::<Vec<_>>(), [4222, 4223, 4224]);
        assert!(server_addrs("").is_err());
        let e = format!("{:#}", server_addrs("nats://a:4222,nats://b:notaport").unwrap_err());
        assert!(e.contains("nats://b:notaport"), "{e}");
    }
}
