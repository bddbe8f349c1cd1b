//! Bearer tokens: `Authorization: Bearer <JWT>`, checked with the configured
//! HS256 secret and/or RSA (RS256) / EC (ES256) public key. `sub` is the
//! caller's owner name; a claim named `api.admin_claim` that is `true` makes
//! the caller an admin, who sees every subscription.
//!
//! A token's algorithm only selects among the keys of its own family, so an
//! HS256 token can never be checked against a public key (the classic
//! algorithm-confusion attack).

use anyhow::Context;
use axum::http::{header, HeaderMap};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::errors::ApiError;
use crate::config::Api as ApiConfig;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub owner: String,
    pub admin: bool,
}

impl Caller {
    /// The owner filter for queries: admins see everything.
    pub fn scope(&self) -> Option<&str> {
        (!self.admin).then_some(self.owner.as_str())
    }
}

pub struct Key {
    algorithms: &'static [Algorithm],
    key: DecodingKey,
}

pub struct Auth {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    require_exp: bool,
    admin_claim: String,
}

/// Reads a PEM RSA or EC public key. Config validation calls it too, so
/// that an unusable file is a bad config (exit 64) and not a failed start.
pub fn public_key(path: &std::path::Path) -> anyhow::Result<Key> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok(Key {
            algorithms: &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok(Key {
            algorithms: &[Algorithm::ES256, Algorithm::ES384],
            key,
        });
    }
    anyhow::bail!("{} is not a PEM RSA or EC public key", path.display())
}

impl Auth {
    /// Reads the keys the config names; fails when one is unusable.
    pub fn from_config(api: &ApiConfig) -> anyhow::Result<Auth> {
        let mut keys = Vec::new();
        if let Some(secret) = &api.jwt_secret {
            keys.push(Key {
                algorithms: &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                key: DecodingKey::from_secret(secret.0.as_bytes()),
            });
        }
        if let Some(path) = &api.jwt_public_key_file {
            keys.push(public_key(path).context("api.jwt_public_key_file")?);
        }
        if keys.is_empty() {
            // The API still listens (the daemon's deliveries do not wait
            // on it) but can trust nobody: every request gets a 401 saying
            // why.
            tracing::warn!(
                "api.listen is set without api.jwt_secret or api.jwt_public_key_file: \
                 the API refuses every request"
            );
        }
        Ok(Auth {
            keys,
            issuer: api.jwt_issuer.clone(),
            audience: api.jwt_audience.clone(),
            require_exp: api.jwt_require_exp,
            admin_claim: api.admin_claim.clone(),
        })
    }

    /// The caller named by the request's bearer token, or a 401.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if self.keys.is_empty() {
            return Err(ApiError::unauthorized(
                "this API has no key to check tokens with: set api.jwt_secret \
                 or api.jwt_public_key_file",
            ));
        }
        let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized("an Authorization: Bearer <JWT> header is required")
        })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be Bearer <JWT>")
            })?;
        self.verify(token)
    }

    fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let bad = || ApiError::unauthorized("the token is not valid");
        let header = jsonwebtoken::decode_header(token).map_err(|_| bad())?;
        let key = self
            .keys
            .iter()
            .find(|k| k.algorithms.contains(&header.alg))
            .ok_or_else(|| ApiError::unauthorized("the token's algorithm is not accepted"))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = 30;
        validation.validate_nbf = true;
        // The library compares iss and aud only when the token has them:
        // configured, they must be there.
        let mut required = vec!["sub"];
        if self.require_exp {
            required.push("exp");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        if self.issuer.is_some() {
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|error| {
                tracing::debug!(%error, "refused a bearer token");
                match error.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                        ApiError::unauthorized("the token has expired")
                    }
                    _ => bad(),
                }
            })?;
        // Times the library could not read as numbers it passes over: a
        // token whose exp is "1000" would never expire.
        for claim in ["exp", "nbf"] {
            if data
                .claims
                .get(claim)
                .is_some_and(|v| !v.as_f64().is_some_and(|t| t >= 0.0))
            {
                return Err(ApiError::unauthorized(
                    "the token's exp and nbf must be numbers of seconds",
                ));
            }
        }
        // NUL: PostgreSQL text cannot hold it.
        let owner = match data.claims.get("sub") {
            Some(Value::String(s)) if !s.trim().is_empty() && !s.contains('\0') => s.clone(),
            _ => {
                return Err(ApiError::unauthorized(
                    "the token's sub must be a non-empty string",
                ))
            }
        };
        let admin = !self.admin_claim.is_empty()
            && data.claims.get(&self.admin_claim) == Some(&Value::Bool(true));
        Ok(Caller { owner, admin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn auth() -> Auth {
        let api = ApiConfig {
            jwt_secret: Some(crate::config::Redacted("0123456789abcdef0123".into())),
            ..ApiConfig::default()
        };
        Auth::from_config(&api).expect("auth")
    }

    fn token(claims: Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("token")
    }

    #[test]
    fn sub_is_the_owner_and_admin_is_a_claim() {
        let a = auth();
        let key = "0123456789abcdef0123";
        assert_eq!(
            a.verify(&token(serde_json::json!({"sub": "alice"}), key))
                .expect("ok"),
            Caller {
                owner: "alice".into(),
                admin: false
            }
        );
        assert!(
            a.verify(&token(
                serde_json::json!({"sub": "root", "admin": true}),
                key
            ))
            .expect("ok")
            .admin
        );
        assert!(
            !a.verify(&token(
                serde_json::json!({"sub": "eve", "admin": "yes"}),
                key
            ))
            .expect("ok")
            .admin
        );
    }

    #[test]
    fn refuses_bad_tokens() {
        let a = auth();
        let key = "0123456789abcdef0123";
        for bad in [
            token(
                serde_json::json!({"sub": "alice"}),
                "another secret entirely",
            ),
            token(serde_json::json!({"name": "alice"}), key),
            token(serde_json::json!({"sub": ""}), key),
            token(serde_json::json!({"sub": "alice", "exp": 1_000_000}), key),
            // times that are no numbers are refused, not passed over
            token(serde_json::json!({"sub": "alice", "exp": "1000"}), key),
            token(serde_json::json!({"sub": "alice", "exp": -5}), key),
            token(
                serde_json::json!({"sub": "alice", "nbf": "9999999999"}),
                key,
            ),
            token(serde_json::json!({"sub": "al\u{0}ice"}), key),
            "not.a.jwt".into(),
            // alg "none"
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.".into(),
        ] {
            assert!(a.verify(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_configured_issuer_and_audience_must_be_in_the_token() {
        let api = ApiConfig {
            jwt_secret: Some(crate::config::Redacted("0123456789abcdef0123".into())),
            jwt_issuer: Some("https://id.example".into()),
            jwt_audience: Some("thorn".into()),
            ..ApiConfig::default()
        };
        let a = Auth::from_config(&api).expect("auth");
        let key = "0123456789abcdef0123";
        let good = serde_json::json!({"sub": "alice", "iss": "https://id.example", "aud": "thorn"});
        assert!(a.verify(&token(good, key)).is_ok());
        for claims in [
            serde_json::json!({"sub": "alice"}),
            serde_json::json!({"sub": "alice", "aud": "thorn"}),
            serde_json::json!({"sub": "alice", "iss": "https://id.example"}),
            serde_json::json!({"sub": "alice", "iss": 5, "aud": 7}),
            serde_json::json!({"sub": "alice", "iss": "evil", "aud": "thorn"}),
        ] {
            assert!(a.verify(&token(claims.clone(), key)).is_err(), "{claims}");
        }
    }
}
