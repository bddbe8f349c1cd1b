//! Request signatures, as pure functions with known-answer tests.
//!
//! Two schemes ride on every request: Thorn's `Hook-HMAC` (base64 of an HMAC
//! of the body with the subscriber's digest) and Standard Webhooks'
//! `webhook-signature` (HMAC-SHA256 over `id.timestamp.body`). Nothing here
//! logs or formats a secret.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};

/// A subscriber's HMAC secret: its Debug output never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The digests a subscriber may choose (`thorn.subscriber.hmac_digest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown digest {0:?}: expected sha1, sha224, sha256, sha384 or sha512")]
pub struct UnknownDigest(pub String);

impl std::str::FromStr for Digest {
    type Err = UnknownDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "sha1" => Ok(Digest::Sha1),
            "sha224" => Ok(Digest::Sha224),
            "sha256" => Ok(Digest::Sha256),
            "sha384" => Ok(Digest::Sha384),
            "sha512" => Ok(Digest::Sha512),
            _ => Err(UnknownDigest(s.to_owned())),
        }
    }
}

fn mac<D>(key: &[u8], parts: &[&[u8]]) -> Vec<u8>
where
    D: Mac + hmac::digest::KeyInit,
{
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m =
        <D as hmac::digest::KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn hmac_raw(digest: Digest, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    match digest {
        Digest::Sha1 => mac::<Hmac<sha1::Sha1>>(key, parts),
        Digest::Sha224 => mac::<Hmac<sha2::Sha224>>(key, parts),
        Digest::Sha256 => mac::<Hmac<sha2::Sha256>>(key, parts),
        Digest::Sha384 => mac::<Hmac<sha2::Sha384>>(key, parts),
        Digest::Sha512 => mac::<Hmac<sha2::Sha512>>(key, parts),
    }
}

/// Thorn's `thorn.utils.hmac.sign`: standard base64 (padded) of
/// HMAC(digest, secret, body). The `Hook-HMAC` header.
pub fn hook_hmac(digest: Digest, secret: &str, body: &[u8]) -> String {
    B64.encode(hmac_raw(digest, secret.as_bytes(), &[body]))
}

/// Thorn's `compat_sign` (its default signer, itsdangerous-style):
/// k' = H("itsdangerous.Signer" + "signer" + secret), then URL-safe base64
/// without padding of HMAC(H, k', body). Only for subscribers whose
/// consumers still verify Thorn's default (`hmac_signer = 'compat'`).
pub fn compat_sign(digest: Digest, secret: &str, body: &[u8]) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: [&[u8]; 3] = [b"itsdangerous.Signer", b"signer", secret.as_bytes()];
    let derived = match digest {
        Digest::Sha1 => hash::<sha1::Sha1>(&parts),
        Digest::Sha224 => hash::<sha2::Sha224>(&parts),
        Digest::Sha256 => hash::<sha2::Sha256>(&parts),
        Digest::Sha384 => hash::<sha2::Sha384>(&parts),
        Digest::Sha512 => hash::<sha2::Sha512>(&parts),
    };
    URL_SAFE_NO_PAD.encode(hmac_raw(digest, &derived, &[body]))
}

fn hash<H: sha2::Digest>(parts: &[&[u8]]) -> Vec<u8> {
    let mut h = H::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().to_vec()
}

/// Which `Hook-HMAC` scheme a subscriber gets (`thorn.subscriber.hmac_signer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Signer {
    /// Thorn's `sign`: [`hook_hmac`].
    #[default]
    Sign,
    /// Thorn's `compat_sign`: [`compat_sign`].
    Compat,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown signer {0:?}: expected sign or compat")]
pub struct UnknownSigner(pub String);

impl std::str::FromStr for Signer {
    type Err = UnknownSigner;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "sign" => Ok(Signer::Sign),
            "compat" => Ok(Signer::Compat),
            _ => Err(UnknownSigner(s.to_owned())),
        }
    }
}

impl Signer {
    pub fn as_str(self) -> &'static str {
        match self {
            Signer::Sign => "sign",
            Signer::Compat => "compat",
        }
    }

    /// The `Hook-HMAC` value for `body` under this scheme.
    pub fn hook_hmac(self, digest: Digest, secret: &str, body: &[u8]) -> String {
        match self {
            Signer::Sign => hook_hmac(digest, secret, body),
            Signer::Compat => compat_sign(digest, secret, body),
        }
    }

    /// Checks a `Hook-HMAC` header under this scheme in constant time.
    pub fn verify(self, digest: Digest, secret: &str, body: &[u8], header: &str) -> bool {
        constant_time_eq(
            header.trim().as_bytes(),
            self.hook_hmac(digest, secret, body).as_bytes(),
        )
    }
}

/// The Standard Webhooks key: a `whsec_` secret is base64 of the key bytes;
/// any other secret is used as its UTF-8 bytes.
fn standard_key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| B64.decode(b64).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// Standard Webhooks: `v1,` + base64(HMAC-SHA256(key, "id.timestamp.body")).
/// The `webhook-signature` header.
pub fn webhook_signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let sig = hmac_raw(
        Digest::Sha256,
        &standard_key(secret),
        &[id.as_bytes(), b".", ts.as_bytes(), b".", body],
    );
    format!("v1,{}", B64.encode(sig))
}

/// Checks a `webhook-signature` header (space-separated `v1,<sig>` entries)
/// in constant time per entry. Used by `thorn receive`.
pub fn verify_webhook_signature(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
) -> bool {
    let expected = webhook_signature(secret, id, timestamp, body);
    header
        .split_whitespace()
        .any(|candidate| constant_time_eq(candidate.as_bytes(), expected.as_bytes()))
}

/// Checks a `Hook-HMAC` header in constant time.
pub fn verify_hook_hmac(digest: Digest, secret: &str, body: &[u8], header: &str) -> bool {
    constant_time_eq(
        header.trim().as_bytes(),
        hook_hmac(digest, secret, body).as_bytes(),
    )
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARTICLE: &[u8] =
        br#"{"event": "article.created", "ref": "/article/1/", "sender": "alice", "data": {"title": "Hello"}}"#;

    #[test]
    fn hook_hmac_known_answers() {
        // From THORN.md and Python's hmac module.
        assert_eq!(
            hook_hmac(Digest::Sha256, "KEY", b"MSG"),
            "NoW4PnbIMVpqi579pkYHK2uiHnILE/kWwJ6U+89ZOxg="
        );
        let cases = [
            (Digest::Sha1, "4rBhKrlIUkKmvYwgbedCkR+FLz4="),
            (Digest::Sha224, "+xqtDEkl08rW6kbAQ2ePaVDvSux2WoCHDEkx1Q=="),
            (Digest::Sha256, "ZEERP/LVKydqaJ6u9jOYR5QJ+QHU3Jq/tMi0tZn88Ok="),
            (
                Digest::Sha384,
                "68zKtqE8rshhYRubopf5I8nPjKcovK/nB9BikFQzjA+SP20lY2dBCbIi1AB+74Cd",
            ),
            (
                Digest::Sha512,
                "tzNVTzZbZdVvAdi45Dna1pPZEZhX58D+VwcQQkf/hIECtlPIPHJS2QOz9NnMl4oRKwslgBsnSyMbkE5DvdJ6hQ==",
            ),
        ];
        for (digest, expected) in cases {
            assert_eq!(hook_hmac(digest, "secret", ARTICLE), expected, "{digest:?}");
            assert!(verify_hook_hmac(digest, "secret", ARTICLE, expected));
        }
    }

    #[test]
    fn compat_sign_known_answers() {
        // From THORN.md; the others from Python's hashlib/hmac computing
        // itsdangerous' derivation by hand.
        assert_eq!(
            compat_sign(Digest::Sha256, "KEY", b"MSG"),
            "_EfR1r6r1FlS2Rwz2JmDzChcVAXVbiaGiqZUokPnmoE"
        );
        let cases = [
            (Digest::Sha1, "pMVTJVXTUg1ugQOZVCbTN87tFSs"),
            (Digest::Sha224, "EduiQyEOBqy2U-oEl1nSjITLi54B651T8kBKJQ"),
            (Digest::Sha256, "VVssY_At52kYNGJ4z12nTRL9Y13BgXqEPaZlesMg_Sg"),
            (
                Digest::Sha384,
                "pfo4GC7daN6x-8HoCmtHePnnqH7RGm24QAjcnX3RcShpoalWv4_RJc4XDxPAGLg7",
            ),
            (
                Digest::Sha512,
                "pjf7V6Z7oxcFFzcamNQR6AofoIjQ72ubqKlXmMRYhv76e6F60AIO6wRtHkJZIrXGaqa9WtX3jN_bi6_v15IAuQ",
            ),
        ];
        for (digest, expected) in cases {
            assert_eq!(
                compat_sign(digest, "secret", ARTICLE),
                expected,
                "{digest:?}"
            );
            assert!(Signer::Compat.verify(digest, "secret", ARTICLE, expected));
            assert!(!Signer::Sign.verify(digest, "secret", ARTICLE, expected));
        }
        assert_eq!("COMPAT".parse::<Signer>().ok(), Some(Signer::Compat));
        assert!("itsdangerous".parse::<Signer>().is_err());
    }

    #[test]
    fn digest_names_in_any_case() {
        assert_eq!("SHA512".parse::<Digest>().ok(), Some(Digest::Sha512));
        assert!("md5".parse::<Digest>().is_err());
    }

    #[test]
    fn standard_webhooks_known_answer() {
        // The example of the Standard Webhooks specification.
        let sig = webhook_signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn verification_rejects_tampering() {
        let sig = webhook_signature("secret", "id", 1, b"body");
        assert!(verify_webhook_signature(
            "secret",
            "id",
            1,
            b"body",
            &format!("v1,bogus {sig}")
        ));
        assert!(!verify_webhook_signature("secret", "id", 2, b"body", &sig));
        assert!(!verify_hook_hmac(
            Digest::Sha256,
            "secret",
            b"body!",
            &hook_hmac(Digest::Sha256, "secret", b"body")
        ));
    }
}
