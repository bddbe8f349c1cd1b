//! `thorn sign`: prints the signature headers a body would carry, to check
//! a consumer's verification or to send a hand-made request.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;

use crate::sign::{self, Digest, Signer};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, env = "THORN_SIGN_SECRET", hide_env_values = true)]
    pub secret: String,
    #[arg(long, default_value = "sha256")]
    pub digest: Digest,
    /// Hook-HMAC scheme: sign, or compat (Thorn's old default)
    #[arg(long, default_value = "sign")]
    pub signer: Signer,
    /// The delivery id (webhook-id)
    #[arg(long, default_value = "00000000-0000-0000-0000-000000000000")]
    pub id: String,
    /// Unix seconds (default: now)
    #[arg(long)]
    pub timestamp: Option<i64>,
    /// File with the body, or - for standard input
    #[arg(default_value = "-")]
    pub body: PathBuf,
}

pub fn run(args: Args, out: &mut impl Write) -> anyhow::Result<()> {
    let mut body = Vec::new();
    if args.body.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut body)?;
    } else {
        body = std::fs::read(&args.body)
            .with_context(|| format!("reading {}", args.body.display()))?;
    }
    let timestamp = args.timestamp.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
    });
    let (secret, id) = (&args.secret, &args.id);
    writeln!(
        out,
        "Hook-HMAC: {}",
        args.signer.hook_hmac(args.digest, secret, &body)
    )?;
    writeln!(out, "webhook-id: {id}")?;
    writeln!(out, "webhook-timestamp: {timestamp}")?;
    writeln!(
        out,
        "webhook-signature: {}",
        sign::webhook_signature(secret, id, timestamp, &body)
    )?;
    Ok(())
}
