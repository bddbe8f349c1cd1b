//! TLS to PostgreSQL, with libpq's connection options: `sslmode`
//! (`disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full`),
//! `sslrootcert` (a PEM file, or `system` for the Mozilla roots) and
//! `sslcert`/`sslkey` (a client certificate), in a URL's query or as
//! `key=value` pairs. tokio-postgres knows only the first three modes and
//! none of the files, so [`split`] takes these options out of the string
//! before tokio-postgres reads the rest.
//!
//! The files are read at every connection, not once: a certificate
//! renewed on disk is used from the next reconnect on, without a restart.
//! A problem with them fails each connection with a TLS error naming it;
//! `thorn check-config` and start-up report it first ([`Tls::check`]).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Socket;
use tokio_postgres_rustls::MakeRustlsConnect;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// `prefer` and `require`: encrypted, but any certificate is taken,
    /// as libpq does (it protects against listening, not impersonation).
    Nothing,
    /// `verify-ca`, or `require` with a root: the chain must lead to a root.
    Chain,
    /// `verify-full`: the chain, and the host name against the certificate.
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    File(PathBuf),
    /// `sslrootcert=system`: the Mozilla roots that receivers are checked
    /// against too (webpki-roots).
    System,
}

/// The TLS half of a connection string, as a tokio-postgres connector.
#[derive(Debug, Clone)]
pub struct Tls(Arc<Result<Settings, String>>);

#[derive(Debug, PartialEq, Eq)]
struct Settings {
    check: Check,
    roots: Option<Roots>,
    client: Option<(PathBuf, PathBuf)>,
}

impl Settings {
    /// Where no TLS is used: nothing to read or check.
    const PLAIN: Settings = Settings {
        check: Check::Nothing,
        roots: None,
        client: None,
    };
}

/// The options this module reads, as written.
#[derive(Debug, Default, PartialEq, Eq)]
struct Written {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

const OURS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl Written {
    fn set(&mut self, key: &str, value: String) {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            _ => &mut self.sslkey,
        };
        *slot = Some(value);
    }

    /// The mode tokio-postgres negotiates with, and what thorn checks.
    fn settle(self) -> (SslMode, Result<Settings, String>) {
        // As libpq: an empty value is no value (but a mode must be named).
        let given = |v: Option<String>| v.filter(|v| !v.is_empty());
        let (sslcert, sslkey) = (given(self.sslcert), given(self.sslkey));
        let roots = given(self.sslrootcert).map(|r| match r.as_str() {
            "system" => Roots::System,
            _ => Roots::File(PathBuf::from(r)),
        });
        // libpq: with sslrootcert=system the default mode is verify-full.
        let default = if roots == Some(Roots::System) {
            "verify-full"
        } else {
            "prefer"
        };
        let mode = self.sslmode.unwrap_or_else(|| default.to_string());
        let (negotiate, check) = match mode.as_str() {
            // No TLS: the files are not read, as libpq does not read them.
            "disable" => return (SslMode::Disable, Ok(Settings::PLAIN)),
            // libpq's allow tries without TLS first; tokio-postgres can
            // only try with it first. Either way both are accepted.
            "allow" | "prefer" => (SslMode::Prefer, Check::Nothing),
            "require" if roots.is_some() => (SslMode::Require, Check::Chain),
            "require" => (SslMode::Require, Check::Nothing),
            "verify-ca" => (SslMode::Require, Check::Chain),
            "verify-full" => (SslMode::Require, Check::Full),
            _ => {
                let problem = format!(
                    "sslmode={mode:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                );
                return (SslMode::Require, Err(problem));
            }
        };
        let problem = if check != Check::Nothing && roots.is_none() {
            Some(format!(
                "sslmode={mode} needs sslrootcert: a PEM file of the certificates that may sign \
                 the server's, or sslrootcert=system for the Mozilla roots"
            ))
        } else if roots == Some(Roots::System) && check != Check::Full {
            Some(format!(
                "sslrootcert=system needs sslmode=verify-full (a public root vouches for a name, \
                 so the name must be checked), not sslmode={mode}"
            ))
        } else {
            None
        };
        let client = match (sslcert, sslkey) {
            (Some(cert), Some(key)) => Ok(Some((PathBuf::from(cert), PathBuf::from(key)))),
            (None, None) => Ok(None),
            (Some(_), None) => Err("sslcert needs sslkey (the client certificate's key)"),
            (None, Some(_)) => Err("sslkey needs sslcert (the client certificate)"),
        };
        let settings = match (problem, client) {
            (Some(problem), _) => Err(problem),
            (None, Err(problem)) => Err(problem.to_string()),
            (None, Ok(client)) => Ok(Settings {
                check,
                roots,
                client,
            }),
        };
        (negotiate, settings)
    }
}

/// Parses a connection string: thorn reads the TLS options, tokio-postgres
/// the rest, and the mode is set where libpq would use it.
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, Tls), tokio_postgres::Error> {
    use tokio_postgres::config::Host;
    let (rest, ssl_mode, mut tls) = split(url);
    let mut config: tokio_postgres::Config = rest.parse()?;
    // `rest` holds no sslmode, so tokio-postgres read its default; another
    // mode means it found one where the split did not look.
    if config.get_ssl_mode() != SslMode::Prefer {
        tls = Tls::refusing("sslmode is written where thorn cannot read it");
    }
    config.ssl_mode(ssl_mode);
    // With only `hostaddr`, its addresses are the names the handshake
    // checks: tokio-postgres refuses TLS without a host name.
    if config.get_hosts().is_empty() {
        for addr in config.get_hostaddrs().to_vec() {
            config.host(addr.to_string());
        }
    }
    // As libpq: no TLS is asked for over unix sockets, whatever the mode
    // (the server would refuse it, failing `require`). A `hostaddr` is
    // reached over TCP, whatever `host` says. tokio-postgres has one mode
    // for all hosts, so a list that mixes sockets with TCP hosts keeps it.
    let unix = |h: &Host| !matches!(h, Host::Tcp(_));
    let hosts = config.get_hosts();
    if !hosts.is_empty() && hosts.iter().all(unix) && config.get_hostaddrs().is_empty() {
        config.ssl_mode(SslMode::Disable);
        tls = Tls::plain();
    }
    Ok((config, tls))
}

/// Splits a connection string into what tokio-postgres reads and thorn's
/// TLS options. A string this cannot take apart is passed on whole, for
/// tokio-postgres to say what is wrong with it, and its connections fail
/// (no option is ever taken to be its default by mistake).
fn split(url: &str) -> (String, SslMode, Tls) {
    let Some((rest, written)) = take_options(url) else {
        let problem = "the connection string's options cannot be read (a quote left open?)";
        return (url.to_string(), SslMode::Require, Tls::refusing(problem));
    };
    let (mode, settings) = written.settle();
    (rest, mode, Tls(Arc::new(settings)))
}

fn take_options(url: &str) -> Option<(String, Written)> {
    let mut written = Written::default();
    let after_scheme = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"));
    if let Some(after_scheme) = after_scheme {
        // The query starts where tokio-postgres looks for it: after the
        // user info, which ends at the first '@' (a password may hold '?').
        let start = url.len() - after_scheme.len() + after_scheme.find('@').map_or(0, |at| at + 1);
        let Some(mark) = url[start..].find('?').map(|q| start + q) else {
            return Some((url.to_string(), written));
        };
        let (base, query) = (&url[..mark], &url[mark + 1..]);
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|s| s.into_owned())
            };
            let key = decode(key).ok()?;
            if OURS.contains(&key.as_str()) {
                written.set(&key, decode(value).ok()?);
            } else {
                kept.push(pair);
            }
        }
        let rest = match kept.is_empty() {
            true => base.to_string(),
            false => format!("{base}?{}", kept.join("&")),
        };
        return Some((rest, written));
    }
    let mut kept = Vec::new();
    for (key, value, text) in key_values(url)? {
        if OURS.contains(&key.as_str()) {
            written.set(&key, value);
        } else {
            kept.push(text);
        }
    }
    Some((kept.join(" "), written))
}

/// The pairs of a `key=value` connection string (libpq's rules: spaces
/// around `=` allowed, values single-quoted or bare, `\` escaping the next
/// character), each with its own text as written.
fn key_values(s: &str) -> Option<Vec<(String, String, &str)>> {
    let mut pairs = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::CharIndices>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_spaces(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            return Some(pairs);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        skip_spaces(&mut chars);
        chars.next_if(|(_, c)| *c == '=')?;
        skip_spaces(&mut chars);
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                None if quoted => return None,
                None => break s.len(),
                Some((i, '\'')) if quoted => break i + 1,
                Some((i, c)) if c.is_whitespace() && !quoted => break i,
                // A backslash at the very end escapes nothing, and is dropped.
                Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                Some((_, c)) => value.push(c),
            }
        };
        pairs.push((key, value, &s[start..end]));
    }
}

impl Tls {
    /// For a target reached without TLS whatever the options say (a unix
    /// socket): its files are not read.
    fn plain() -> Tls {
        Tls(Arc::new(Ok(Settings::PLAIN)))
    }

    /// Fails every connection, and the config check, with `problem`.
    fn refusing(problem: &str) -> Tls {
        Tls(Arc::new(Err(problem.to_string())))
    }

    /// Whether a connection could be made as the options say: they fit
    /// together, and the files can be read. Start-up and `thorn
    /// check-config` call it (through the config's check), so that a
    /// mistake is a config error, not a retry loop.
    pub fn check(&self) -> Result<(), String> {
        self.client_config().map(|_| ())
    }

    fn client_config(&self) -> Result<ClientConfig, String> {
        let settings = self.0.as_ref().as_ref().map_err(Clone::clone)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let verifier: Arc<dyn ServerCertVerifier> = match (settings.check, &settings.roots) {
            (Check::Nothing, _) => Arc::new(Lenient {
                chain: None,
                provider,
            }),
            // `settle` refuses these options; never take any certificate
            // for a check that was asked for.
            (_, None) => return Err("a certificate check needs sslrootcert".into()),
            (check, Some(roots)) => {
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(root_store(roots)?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| e.to_string())?;
                match check {
                    Check::Full => webpki,
                    _ => Arc::new(Lenient {
                        chain: Some(webpki),
                        provider,
                    }),
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &settings.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certificates(cert).map_err(|e| format!("sslcert {e}"))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    format!("sslkey {}: no private key read from it: {e}", key.display())
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("sslcert and sslkey do not fit together: {e}"))?
            }
        };
        // PostgreSQL 17 wants it for `sslnegotiation=direct`; earlier
        // servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(config)
    }
}

fn root_store(roots: &Roots) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Roots::File(path) => {
            for cert in read_certificates(path).map_err(|e| format!("sslrootcert {e}"))? {
                store
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        }
    }
    Ok(store)
}

/// The certificates of a PEM file; at least one. (Also the receivers'
/// extra roots, `security.extra_ca_files`.)
pub fn read_certificates(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

impl MakeTlsConnect<Socket> for Tls {
    type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
    type Error = BoxError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, BoxError> {
        let config = self.client_config()?;
        let mut make = MakeRustlsConnect::new(config);
        // tokio-postgres asks for a connector even where it will not use
        // one: a unix socket, or `hostaddr` alone, has no name (and a
        // handshake without one it refuses itself). rustls would refuse
        // the empty name before any of that, failing the connection.
        let domain = match domain {
            "" => "localhost",
            name => name,
        };
        Ok(MakeTlsConnect::<Socket>::make_tls_connect(
            &mut make, domain,
        )?)
    }
}

/// What webpki does not check: for `prefer` and `require` without a root,
/// the certificate (any is taken, as libpq does); for `verify-ca`, the
/// name, which webpki checks last (after the chain, its dates and
/// revocation). The handshake's signatures are always checked, or the
/// session would not be bound to the certificate at all.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::Error::InvalidCertificate;
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(url: &str) -> (String, Written) {
        take_options(url).expect("splits")
    }

    #[test]
    fn a_url_loses_only_the_tls_options() {
        let (rest, written) = taken(
            "postgres://u:p%40ss@db.example:5433/app?application_name=x&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca%20certs.pem&connect_timeout=5",
        );
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db.example:5433/app?application_name=x&connect_timeout=5"
        );
        assert_eq!(written.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(written.sslrootcert.as_deref(), Some("/etc/ca certs.pem"));
        let (rest, _) = taken("postgresql://h/db?sslmode=disable");
        assert_eq!(rest, "postgresql://h/db");
        // A '?' in the password is not the query's start.
        let (rest, written) = taken("postgres://u:p?w@h/db?sslmode=require");
        assert_eq!(rest, "postgres://u:p?w@h/db");
        assert_eq!(written.sslmode.as_deref(), Some("require"));
        let (rest, written) = taken("postgres://h/db");
        assert_eq!(
            (rest.as_str(), written),
            ("postgres://h/db", Written::default())
        );
    }

    #[test]
    fn key_value_strings_follow_libpqs_quoting() {
        let (rest, written) = taken(
            "host=db  sslmode = require password='a b\\'c' sslcert='/a b/c\\'d.pem' sslkey=/k\\ ey dbname=app",
        );
        assert_eq!(rest, "host=db password='a b\\'c' dbname=app");
        assert_eq!(written.sslmode.as_deref(), Some("require"));
        assert_eq!(written.sslcert.as_deref(), Some("/a b/c'd.pem"));
        assert_eq!(written.sslkey.as_deref(), Some("/k ey"));
        assert!(take_options("host=db password='open").is_none());
        // A backslash at the end is dropped, as tokio-postgres does.
        let (rest, written) = taken("sslmode=require password=x\\");
        assert_eq!(rest, "password=x\\");
        assert_eq!(written.sslmode.as_deref(), Some("require"));
        assert!(take_options("host").is_none());
    }

    #[test]
    fn modes_map_to_libpqs_meaning() {
        let settle = |mode: Option<&str>, root: Option<&str>| {
            let written = Written {
                sslmode: mode.map(str::to_string),
                sslrootcert: root.map(str::to_string),
                ..Written::default()
            };
            let (negotiate, settings) = written.settle();
            (negotiate, settings.map(|s| s.check))
        };
        assert_eq!(settle(None, None), (SslMode::Prefer, Ok(Check::Nothing)));
        assert_eq!(
            settle(Some("disable"), None),
            (SslMode::Disable, Ok(Check::Nothing))
        );
        assert_eq!(
            settle(Some("allow"), None),
            (SslMode::Prefer, Ok(Check::Nothing))
        );
        assert_eq!(
            settle(Some("require"), None),
            (SslMode::Require, Ok(Check::Nothing))
        );
        assert_eq!(
            settle(Some("require"), Some("/ca")),
            (SslMode::Require, Ok(Check::Chain))
        );
        assert_eq!(
            settle(Some("verify-ca"), Some("/ca")),
            (SslMode::Require, Ok(Check::Chain))
        );
        assert_eq!(
            settle(Some("verify-full"), Some("/ca")),
            (SslMode::Require, Ok(Check::Full))
        );
        assert_eq!(
            settle(None, Some("system")),
            (SslMode::Require, Ok(Check::Full))
        );
        let problem = |mode, root| settle(mode, root).1.expect_err("refused");
        assert!(problem(Some("verify-full"), None).contains("needs sslrootcert"));
        assert!(problem(Some("verify-ca"), None).contains("needs sslrootcert"));
        assert!(problem(Some("require"), Some("system")).contains("needs sslmode=verify-full"));
        assert!(problem(Some("strict"), None).contains("not one of"));
        let half = Written {
            sslcert: Some("/c".into()),
            ..Written::default()
        };
        assert!(half
            .settle()
            .1
            .expect_err("refused")
            .contains("needs sslkey"));
    }
}
