//! The one HTTP client: guarded DNS, explicit timeouts, no redirects, no
//! proxies, verified TLS; and the request of DESIGN.md §5.
//!
//! Literal IP hosts (in any spelling the URL parser accepts: 2130706433,
//! 0x7f000001, 127.1, [::ffff:7f00:1]) never reach a resolver, so they are
//! checked here before the request; names are checked in [`GuardedResolver`]
//! on the addresses DNS returned, and only those addresses are connected to.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use super::guard::Guard;
use crate::config::Config;
use crate::db::queue::Claimed;
use crate::payload::{ContentType, Envelope};
use crate::sign::{self, Digest, Signer};

pub const USER_AGENT: &str = concat!("thorn/", env!("CARGO_PKG_VERSION"));

/// Why an attempt did not succeed, as the stable class stored in
/// `thorn.delivery.error_class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A non-2xx answer (redirects included: they are never followed).
    Status(u16),
    Timeout,
    Connect,
    Dns,
    Tls,
    /// Refused by the address guard or the URL rules: never retried.
    Blocked,
    /// Anything else while sending or reading (a broken response, …).
    Request,
    /// The subscriber was deactivated after the delivery was created.
    Inactive,
    /// The row cannot be sent as stored (unknown digest or content type, an
    /// event name that is no header value).
    Invalid,
}

impl Failure {
    pub fn class(self) -> &'static str {
        match self {
            Failure::Status(_) => "http_status",
            Failure::Timeout => "timeout",
            Failure::Connect => "connect",
            Failure::Dns => "dns",
            Failure::Tls => "tls",
            Failure::Blocked => "blocked",
            Failure::Request => "request",
            Failure::Inactive => "inactive",
            Failure::Invalid => "invalid",
        }
    }

    /// Failures that no retry can cure.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Failure::Blocked | Failure::Inactive | Failure::Invalid | Failure::Status(410)
        )
    }
}

/// What one attempt produced.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub result: Result<u16, Failure>,
    pub error: Option<String>,
    pub duration: Duration,
    /// The start of the response body, for operators.
    pub response: Option<String>,
    pub retry_after: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("{0} resolves only to addresses that deliveries may not reach")]
    Blocked(String),
    #[error("cannot resolve {0}: {1}")]
    Lookup(String, #[source] std::io::Error),
}

/// Resolves with the system resolver, then keeps only permitted addresses.
struct GuardedResolver {
    guard: Guard,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            // One trailing dot marks a fully qualified name; the system
            // resolver may not accept it, but it names the same host.
            let host = name.as_str().to_ascii_lowercase();
            let host = host.strip_suffix('.').unwrap_or(&host).to_owned();
            let found: Vec<SocketAddr> = if is_localhost_name(&host) {
                // RFC 6761: localhost names are loopback whatever a
                // resolver says (systemd-resolved answers *.localhost).
                vec![
                    SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
                    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
                ]
            } else {
                tokio::net::lookup_host((host.as_str(), 0))
                    .await
                    .map_err(|e| ResolveError::Lookup(host.clone(), e))?
                    .collect()
            };
            let permitted: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| guard.permits(a.ip()))
                .collect();
            if permitted.is_empty() {
                return Err(ResolveError::Blocked(host).into());
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

fn is_localhost_name(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost")
}

/// Sends deliveries. Cheap to clone: the connection pool is shared.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    guard: Guard,
    https_only: bool,
    allowed_ports: Arc<[u16]>,
    max_response_bytes: usize,
}

impl Client {
    pub fn new(config: &Config) -> Result<Client, reqwest::Error> {
        let guard = Guard::new(config.security.allowed.clone());
        let mut builder = reqwest::Client::builder();
        for root in &config.security.extra_roots {
            builder = builder.add_root_certificate(root.clone());
        }
        // Certificates are always verified (reqwest's rustls with the webpki
        // roots plus `security.extra_ca_files`); there is deliberately no
        // switch to turn verification off. Response headers are bounded by
        // hyper: at most 100 headers and about 400 KiB of head over HTTP/1,
        // 16 KiB of header list over HTTP/2; bigger answers are errors.
        let http = builder
            .user_agent(USER_AGENT)
            .https_only(config.security.https_only)
            .timeout(config.delivery.timeout)
            .connect_timeout(config.delivery.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            // Kept for a subscriber's next requests, not much longer: each
            // holds a descriptor, and receivers may be many hosts (`thorn
            // run` also raises its open files limit to the hard one).
            .pool_idle_timeout(Duration::from_secs(15))
            .dns_resolver(Arc::new(GuardedResolver {
                guard: guard.clone(),
            }))
            .build()?;
        Ok(Client {
            http,
            guard,
            https_only: config.security.https_only,
            allowed_ports: config.security.allowed_ports.clone().into(),
            max_response_bytes: config.delivery.max_response_bytes,
        })
    }

    /// Checks a URL against the rules that need no DNS: scheme, port, and
    /// literal addresses. The message never contains more than the URL's host.
    pub fn check_url(&self, raw: &str) -> Result<Url, String> {
        let url = Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
        match url.scheme() {
            "https" => {}
            "http" if !self.https_only => {}
            "http" => return Err("plain http is refused (security.https_only)".into()),
            other => return Err(format!("scheme {other} is not http or https")),
        }
        let port = url.port_or_known_default().unwrap_or(0);
        if !self.allowed_ports.is_empty() && !self.allowed_ports.contains(&port) {
            return Err(format!("port {port} is not in security.allowed_ports"));
        }
        let literal = match url.host() {
            Some(Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            Some(Host::Domain(_)) => None,
            None => return Err("the URL has no host".into()),
        };
        if let Some(ip) = literal {
            if !self.guard.permits(ip) {
                return Err(format!("{ip} is not a global address"));
            }
        }
        Ok(url)
    }

    /// Makes one attempt at a delivery.
    pub async fn attempt(&self, d: &Claimed) -> Attempt {
        let started = Instant::now();
        let finish = |result, error: Option<String>| Attempt {
            result,
            error,
            duration: started.elapsed(),
            response: None,
            retry_after: None,
        };
        if !d.active {
            return finish(
                Err(Failure::Inactive),
                Some("the subscriber is not active".into()),
            );
        }
        let url = match self.check_url(&d.url) {
            Ok(url) => url,
            Err(message) => return finish(Err(Failure::Blocked), Some(message)),
        };
        let (Ok(digest), Some(content_type), Ok(signer)) = (
            d.digest.parse::<Digest>(),
            ContentType::from_column(&d.content_type),
            d.signer.parse::<Signer>(),
        ) else {
            return finish(
                Err(Failure::Invalid),
                Some("unknown hmac_digest, content_type or hmac_signer".into()),
            );
        };
        // Custom events are written straight into thorn.event, and a name
        // with a control character cannot be a header value: every attempt
        // would fail the same way.
        let Ok(event) = reqwest::header::HeaderValue::from_str(&d.event) else {
            return finish(
                Err(Failure::Invalid),
                Some(
                    "the event name has a control character: it cannot be sent in Hook-Event"
                        .into(),
                ),
            );
        };
        let body = Envelope {
            event: &d.event,
            reference: d.reference.as_deref(),
            sender: d.sender.as_deref(),
            data: &d.data,
        }
        .encode(content_type);
        let id = d.id.to_string();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX));
        let request = self
            .http
            .post(url)
            .header("Content-Type", content_type.header_value())
            .header("Hook-Event", event)
            .header("Hook-Delivery", &id)
            .header("Hook-Subscription", d.subscriber_id.to_string())
            .header("Hook-HMAC", signer.hook_hmac(digest, &d.secret.0, &body))
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                sign::webhook_signature(&d.secret.0, &id, timestamp, &body),
            )
            .body(body);

        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                let failure = classify(&error);
                return finish(Err(failure), Some(describe(&error)));
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let (response_text, read_error) = self.read_capped(response).await;
        let mut attempt = if status.is_success() {
            finish(Ok(status.as_u16()), None)
        } else {
            finish(
                Err(Failure::Status(status.as_u16())),
                Some(format!("HTTP {status}")),
            )
        };
        if let Some(error) = read_error {
            // A 2xx is a 2xx even if the body then broke off (or dripped
            // past the timeout): the receiver has the delivery. Other
            // answers keep their status class; the detail says both.
            attempt.error = Some(match attempt.error.take() {
                Some(status) => format!("{status}; reading the body: {error}"),
                None => format!("reading the body: {error}"),
            });
        }
        attempt.response = response_text;
        attempt.retry_after = retry_after;
        attempt
    }

    /// Reads at most `max_response_bytes` of a body, never the whole of a
    /// large one; the total timeout bounds a slow drip.
    async fn read_capped(
        &self,
        mut response: reqwest::Response,
    ) -> (Option<String>, Option<String>) {
        let mut kept = Vec::new();
        while kept.len() < self.max_response_bytes {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = self.max_response_bytes - kept.len();
                    kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) => break,
                Err(error) => return (text(kept), Some(describe(&error))),
            }
        }
        (text(kept), None)
    }
}

fn text(bytes: Vec<u8>) -> Option<String> {
    (!bytes.is_empty()).then(|| String::from_utf8_lossy(&bytes).replace('\0', ""))
}

/// `Retry-After` as seconds or an HTTP date, in any of the three forms
/// RFC 9110 §5.6.7 says a recipient must accept. Any length is returned:
/// the retry policy caps it (`delivery.max_retry_after`).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The class of a transport error, found by walking its causes.
fn classify(error: &reqwest::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(resolve) = e.downcast_ref::<ResolveError>() {
            return match resolve {
                ResolveError::Blocked(_) => Failure::Blocked,
                ResolveError::Lookup(..) => Failure::Dns,
            };
        }
        if e.is::<rustls::Error>() {
            return Failure::Tls;
        }
        // rustls's errors arrive wrapped in an io::Error (twice, from a
        // connect), whose source() skips the error it wraps: step into it.
        source = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(wrapped) => Some(wrapped),
            None => e.source(),
        };
    }
    if error.is_timeout() {
        return Failure::Timeout;
    }
    // What rustls does not raise itself (a peer that hangs up mid-handshake)
    // is known by its text only.
    let chain = describe(error).to_ascii_lowercase();
    if chain.contains("certificate") || chain.contains("tls") || chain.contains("handshake") {
        Failure::Tls
    } else if error.is_connect() {
        Failure::Connect
    } else {
        Failure::Request
    }
}

/// An error and its causes on one line, without the URL reqwest names in
/// it: its path and query string may carry tokens. The URL is removed by
/// its exact text, which may itself hold a ')'.
fn describe(error: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p: &String| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    let line = parts.join(": ");
    match error.url() {
        Some(url) => line.replace(&format!(" for url ({})", url.as_str()), ""),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert!(parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT")
            .is_some_and(|d| d > Duration::from_secs(86400)));
        // The obsolete forms: RFC 850 and asctime.
        assert!(parse_retry_after("Friday, 01-Jan-99 00:00:00 GMT").is_some());
        assert!(parse_retry_after("Fri Jan  1 00:00:00 2100")
            .is_some_and(|d| d > Duration::from_secs(86400)));
        assert_eq!(
            parse_retry_after("18446744073709551615"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[tokio::test]
    async fn a_peer_that_does_not_speak_tls_is_a_tls_failure() {
        // It answers the ClientHello with plain HTTP: rustls's own error,
        // whose text names neither TLS nor a certificate.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut hello = [0u8; 512];
                let _ = socket.read(&mut hello).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let error = reqwest::Client::builder()
            .resolve("receiver.test", addr)
            .build()
            .expect("client")
            .get(format!("https://receiver.test:{}/", addr.port()))
            .send()
            .await
            .expect_err("the request fails");
        assert_eq!(classify(&error), Failure::Tls, "{error:?}");
    }

    #[tokio::test]
    async fn errors_are_described_without_the_url() {
        // Nothing listens on port 1: the error names the URL, whose path
        // has a ')' before the query string.
        let url = "http://127.0.0.1:1/p(1)?token=SECRET";
        let error = reqwest::Client::new()
            .post(url)
            .send()
            .await
            .expect_err("refused");
        assert!(error.to_string().contains("SECRET"), "{error}");
        let described = describe(&error);
        assert!(
            !described.contains("SECRET") && !described.contains("token"),
            "{described}"
        );
        assert!(
            described.starts_with("error sending request"),
            "{described}"
        );
    }

    #[test]
    fn url_rules() {
        let mut config = Config::default();
        let client = Client::new(&config).expect("client");
        for bad in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data",
            "ftp://example.com/",
            "http://",
        ] {
            assert!(client.check_url(bad).is_err(), "{bad} must be refused");
        }
        assert!(client.check_url("https://example.com/hook").is_ok());
        config.security.https_only = true;
        config.security.allowed_ports = vec![443];
        let strict = Client::new(&config).expect("client");
        assert!(strict.check_url("http://example.com/").is_err());
        assert!(strict.check_url("https://example.com:8443/").is_err());
        assert!(strict.check_url("https://example.com/").is_ok());
    }
}
