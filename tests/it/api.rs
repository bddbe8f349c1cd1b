//! The subscriptions REST API over real HTTP against a real database: two
//! users, an admin, bad tokens, bad ids, bad input, the address guard, and a
//! subscription made through the API receiving a signed delivery.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::support::{
    api_config, article_table, free_port, python_sign, subscribe, token, token_with, unix_now,
    wait_for_port, ApiServer, Call, Daemon, Receiver, TestDb, ADMIN, QUIET, WAIT,
};

/// Checks the one error shape and returns the field names.
fn error_fields(body: &Value, code: &str) -> Vec<String> {
    assert_eq!(body["error"], code, "{body}");
    assert!(body["message"].is_string(), "{body}");
    let fields = body["fields"].as_object().expect("fields object");
    fields.keys().cloned().collect()
}

#[tokio::test]
async fn two_users_see_only_their_own_subscriptions() {
    let t = TestDb::new().await;
    let api = Call::new(&api_config(&t)).await;

    let (status, created) = api
        .send(
            Method::POST,
            "/hooks/",
            Some("alice"),
            Some(json!({"event": "article.*", "url": "http://127.0.0.1:9/a"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    for key in [
        "id",
        "event",
        "url",
        "content_type",
        "owner",
        "hmac_secret",
        "hmac_digest",
        "created_at",
        "updated_at",
        "subscription",
    ] {
        assert!(created.get(key).is_some(), "{key} missing from {created}");
    }
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["owner"], "alice");
    assert_eq!(created["user"], "alice", "Thorn's name for the owner");
    assert_eq!(created["hmac_digest"], "sha256");
    assert_eq!(created["content_type"], "application/json");
    assert_eq!(created["hmac_secret"].as_str().map(str::len), Some(64));
    assert_eq!(
        created["subscription"],
        format!("{}/hooks/{id}/", api.server.base)
    );
    assert!(created["created_at"].as_str().expect("ts").ends_with('Z'));
    let alices = format!("/hooks/{id}/");

    let (status, bobs) = api
        .send(
            Method::POST,
            "/hooks",
            Some("bob"),
            Some(
                json!({"event": "*", "url": "http://127.0.0.1:9/b", "hmac_digest": "SHA512",
                        "hmac_secret": "bobs-own-secret"}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{bobs}");
    assert_eq!(bobs["hmac_digest"], "sha512", "any case, stored lower-case");
    assert_eq!(bobs["hmac_secret"], "bobs-own-secret");

    // Lists are scoped.
    let (status, list) = api.send(Method::GET, "/hooks/", Some("alice"), None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, vec![id.as_str()]);
    let (_, list) = api.send(Method::GET, "/hooks/", Some("carol"), None).await;
    assert_eq!(list, json!([]));

    // Bob can neither read, change nor delete Alice's subscription: 404,
    // the same answer as for an id that does not exist.
    for (method, body) in [
        (Method::GET, None),
        (
            Method::PUT,
            Some(json!({"event": "x", "url": "http://127.0.0.1:9/x"})),
        ),
        (
            Method::PATCH,
            Some(json!({"url": "http://127.0.0.1:9/stolen"})),
        ),
        (Method::PATCH, Some(json!({"event": "a..b"}))),
        (Method::DELETE, None),
    ] {
        let (status, body) = api.send(method.clone(), &alices, Some("bob"), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} by bob: {body}");
        error_fields(&body, "not_found");
    }
    let (status, unknown) = api
        .send(
            Method::GET,
            &format!("/hooks/{}/", uuid::Uuid::new_v4()),
            Some("alice"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, bobs_try) = api.send(Method::GET, &alices, Some("bob"), None).await;
    assert_eq!(
        bobs_try, unknown,
        "another owner's id looks exactly like an unknown one"
    );

    // Alice's row is untouched.
    let (status, mine) = api.send(Method::GET, &alices, Some("alice"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mine["url"], "http://127.0.0.1:9/a");
    assert_eq!(
        mine["hmac_secret"], created["hmac_secret"],
        "GET shows the owner's secret"
    );

    // PATCH changes what it names; PUT needs event and url.
    let (status, patched) = api
        .send(
            Method::PATCH,
            &alices,
            Some("alice"),
            Some(json!({"event": "article.created", "ordered": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["event"], "article.created");
    assert_eq!(patched["ordered"], true);
    assert_eq!(patched["url"], "http://127.0.0.1:9/a");
    assert_eq!(patched["created_at"], created["created_at"]);
    let (status, body) = api
        .send(
            Method::PUT,
            &alices,
            Some("alice"),
            Some(json!({"event": "article.*"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_fields(&body, "invalid"), vec!["url"]);
    let (status, put) = api
        .send(
            Method::PUT,
            &alices,
            Some("alice"),
            Some(json!({"event": "article.*", "url": "http://127.0.0.1:9/put", "content_type": "application/x-www-form-urlencoded"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!(put["content_type"], "application/x-www-form-urlencoded");

    // Nobody but an admin files a subscription under another name.
    let (status, body) = api
        .send(
            Method::PATCH,
            &alices,
            Some("alice"),
            Some(json!({"owner": "bob"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_fields(&body, "invalid"), vec!["owner"]);

    // An admin sees and manages everything.
    let admin = token_with("root", json!({"admin": true}));
    let listed: Value = api
        .http
        .get(api.server.url("/hooks/"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("admin list")
        .json()
        .await
        .expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
    let moved = api
        .http
        .patch(api.server.url(&alices))
        .bearer_auth(&admin)
        .json(&json!({"owner": "dave"}))
        .send()
        .await
        .expect("admin patch");
    assert_eq!(moved.status(), StatusCode::OK);
    let (status, _) = api.send(Method::GET, &alices, Some("alice"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "now dave's");
    let (status, _) = api.send(Method::GET, &alices, Some("dave"), None).await;
    assert_eq!(status, StatusCode::OK);

    // DELETE → 204, then it is gone.
    let (status, body) = api.send(Method::DELETE, &alices, Some("dave"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(body, Value::Null);
    let (status, _) = api.send(Method::DELETE, &alices, Some("dave"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn tokens_are_required_and_checked() {
    let t = TestDb::new().await;
    let api = Call::new(&api_config(&t)).await;
    let http = &api.http;
    let hooks = api.server.url("/hooks/");

    let (status, body) = api.send(Method::GET, "/hooks/", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    error_fields(&body, "unauthorized");
    let (status, _) = api
        .send(
            Method::POST,
            "/hooks/",
            None,
            Some(json!({"event": "a", "url": "http://127.0.0.1:9/"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Even a malformed id answers 401 first: nothing is told before auth.
    let (status, _) = api.send(Method::DELETE, "/hooks/nope/", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let wrong_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice", "exp": unix_now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(b"some other secret entirely"),
    )
    .expect("token");
    let expired = token_with("alice", json!({"exp": unix_now() - 3600}));
    let wrong_issuer_is_fine_without_config = token_with("alice", json!({"iss": "x"}));
    for (name, auth) in [
        ("wrong key", format!("Bearer {wrong_key}")),
        ("expired", format!("Bearer {expired}")),
        ("garbage", "Bearer not-a-token".into()),
        ("basic", "Basic YWxpY2U6cHc=".into()),
        (
            "alg none",
            "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.".into(),
        ),
        ("no sub", format!("Bearer {}", token_with("", json!({})))),
    ] {
        let response = http
            .get(&hooks)
            .header("authorization", auth)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name}");
        assert_eq!(
            response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer")
        );
    }
    let ok = http
        .get(&hooks)
        .bearer_auth(wrong_issuer_is_fine_without_config)
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), StatusCode::OK);

    // RS256 and ES256 with configured public keys.
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/keys");
    let rsa = jsonwebtoken::EncodingKey::from_rsa_pem(
        &std::fs::read(keys.join("rsa_private.pem")).expect("rsa key"),
    )
    .expect("rsa");
    let rs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &json!({"sub": "alice"}),
        &rsa,
    )
    .expect("rs256");
    let response = http
        .get(&hooks)
        .bearer_auth(&rs256)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK, "RS256");

    let mut ec_config = api_config(&t);
    ec_config.api.jwt_secret = None;
    ec_config.api.jwt_public_key_file = Some(keys.join("ec_public.pem"));
    let ec_api = ApiServer::start(&ec_config).await;
    let ec = jsonwebtoken::EncodingKey::from_ec_pem(
        &std::fs::read(keys.join("ec_private.pem")).expect("ec key"),
    )
    .expect("ec");
    let es256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &json!({"sub": "alice"}),
        &ec,
    )
    .expect("es256");
    let url = ec_api.url("/hooks/");
    let response = http
        .get(&url)
        .bearer_auth(&es256)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK, "ES256");
    // Without a configured HS256 secret, HS256 tokens are refused (no
    // algorithm confusion with the public key).
    let response = http
        .get(&url)
        .bearer_auth(token("alice"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // The RSA key is not this server's.
    let response = http
        .get(&url)
        .bearer_auth(&rs256)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn malformed_ids_are_404_never_500() {
    let t = TestDb::new().await;
    let api = Call::new(&api_config(&t)).await;
    let long = "a".repeat(5000);
    for id in [
        "not-a-uuid",
        "123",
        "00000000-0000-0000-0000-00000000000g",
        "%00",
        "%FF",
        "%27%20OR%201=1--",
        "{00000000-0000-0000-0000-000000000000}",
        "00000000000000000000000000000000",
        long.as_str(),
    ] {
        for method in [Method::GET, Method::PUT, Method::PATCH, Method::DELETE] {
            let body = (method == Method::PUT || method == Method::PATCH)
                .then(|| json!({"event": "a", "url": "http://127.0.0.1:9/"}));
            let (status, body) = api
                .send(
                    method.clone(),
                    &format!("/hooks/{id}/"),
                    Some("alice"),
                    body,
                )
                .await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {id}: {body}");
            error_fields(&body, "not_found");
        }
    }
    let (status, body) = api.send(Method::GET, "/nowhere", Some("alice"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_fields(&body, "not_found");
    let (status, body) = api
        .send(Method::DELETE, "/hooks/", Some("alice"), None)
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    error_fields(&body, "method_not_allowed");
}

#[tokio::test]
async fn bad_input_names_every_field() {
    let t = TestDb::new().await;
    let api = Call::new(&api_config(&t)).await;

    let (status, body) = api
        .send(Method::POST, "/hooks/", Some("alice"), Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_fields(&body, "invalid"), vec!["event", "url"]);
    assert_eq!(body["fields"]["event"][0], "this field is required");

    let (status, body) = api
        .send(
            Method::POST,
            "/hooks/",
            Some("alice"),
            Some(json!({
                "event": "article..created",
                "url": "ftp://example.com/",
                "hmac_digest": "md5",
                "content_type": "text/plain",
                "hmac_secret": "",
                "hmac_signer": "itsdangerous",
                "ordered": "yes",
            })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_fields(&body, "invalid"),
        vec![
            "content_type",
            "event",
            "hmac_digest",
            "hmac_secret",
            "hmac_signer",
            "ordered",
            "url"
        ]
    );
    // NUL, which PostgreSQL text cannot hold: a 400 naming the fields, not
    // a 500.
    let (nul_status, nul) = api
        .send(
            Method::POST,
            "/hooks/",
            Some("alice"),
            Some(json!({
                "event": "article.\u{0}",
                "url": "https://example.com/",
                "hmac_secret": "secret\u{0}secret",
            })),
        )
        .await;
    assert_eq!(nul_status, StatusCode::BAD_REQUEST, "{nul}");
    let fields = error_fields(&nul, "invalid");
    assert!(
        fields.contains(&"event".to_owned()) && fields.contains(&"hmac_secret".to_owned()),
        "{nul}"
    );
    // The messages are the database's own, the ones the trigger raises.
    assert!(body["fields"]["hmac_digest"][0]
        .as_str()
        .expect("msg")
        .contains("sha256"));

    let (status, body) = api
        .send(
            Method::POST,
            "/hooks/",
            Some("alice"),
            Some(json!({"event": 5, "url": null})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_fields(&body, "invalid"), vec!["event", "url"]);

    for raw in ["not json", "[1, 2]", ""] {
        let response = api
            .http
            .post(api.server.url("/hooks/"))
            .bearer_auth(token("alice"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{raw:?}");
        let body: Value = response.json().await.expect("json");
        error_fields(&body, "bad_request");
    }
    let (_, list) = api.send(Method::GET, "/hooks/", Some("alice"), None).await;
    assert_eq!(list, json!([]), "nothing was created");
}

#[tokio::test]
async fn urls_the_address_guard_refuses_are_refused_at_subscribe_time() {
    let t = TestDb::new().await;
    let mut strict = api_config(&t);
    strict.security.allowed.clear();
    let api = Call::new(&strict).await;
    for url in [
        "http://127.0.0.1:8080/h",
        "http://localhost:8080/h",
        "http://[::1]/h",
        "http://169.254.169.254/latest/meta-data",
        "http://2130706433/",
        "http://10.0.0.1/",
    ] {
        let (status, body) = api
            .send(
                Method::POST,
                "/hooks/",
                Some("alice"),
                Some(json!({"event": "a", "url": url})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {body}");
        assert_eq!(error_fields(&body, "invalid"), vec!["url"], "{url}");
    }
    // PATCH is checked the same way.
    let db = t.client().await;
    let id =
        crate::support::subscribe(&db, "a", "https://example.com/h", Some("alice"), "secret").await;
    let (status, body) = api
        .send(
            Method::PATCH,
            &format!("/hooks/{id}/"),
            Some("alice"),
            Some(json!({"url": "http://127.0.0.1/"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // security.allow_networks lets them in (the tests' own config).
    let open = Call::new(&api_config(&t)).await;
    let (status, body) = open
        .send(
            Method::POST,
            "/hooks/",
            Some("alice"),
            Some(json!({"event": "a", "url": "http://127.0.0.1:8080/h"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn a_subscription_made_through_the_api_in_thorn_run_receives_signed_deliveries() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    let mut config = api_config(&t);
    let port = free_port();
    config.api.listen = Some(([127, 0, 0, 1], port).into());
    let daemon = Daemon::start(config);
    wait_for_port(port).await;

    let created: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/hooks/"))
        .bearer_auth(token("alice"))
        .json(&json!({"event": "article.created", "url": rx.url("/alice"), "hmac_digest": "sha1"}))
        .send()
        .await
        .expect("subscribe")
        .json()
        .await
        .expect("json");
    let secret = created["hmac_secret"].as_str().expect("secret").to_owned();

    db.batch_execute(
        "INSERT INTO article (title, author) VALUES ('mine', 'alice'), ('theirs', 'bob')",
    )
    .await
    .expect("insert");
    let got = rx.expect(1, WAIT, QUIET).await.remove(0);
    assert_eq!(got.path, "/alice");
    assert_eq!(
        got.header("hook-subscription"),
        created["id"].as_str().expect("id")
    );
    assert_eq!(got.json()["data"]["title"], "mine");
    let expected = python_sign(&[("sha1", &secret, &got.body)]);
    assert_eq!(got.header("hook-hmac"), expected[0]);
    daemon.stop().await;
}

#[tokio::test]
async fn an_api_without_a_token_key_refuses_every_request_and_the_daemon_still_delivers() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "article.created", &rx.url("/"), None, "secret").await;
    // DESIGN's example: only api.listen, no key to check tokens with.
    let mut config = t.config();
    let port = free_port();
    config.api.listen = Some(([127, 0, 0, 1], port).into());
    let daemon = Daemon::start(config);
    wait_for_port(port).await;

    let answer = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/hooks/"))
        .bearer_auth(token("alice"))
        .send()
        .await
        .expect("list");
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    let body = answer.text().await.expect("body");
    assert!(body.contains("api.jwt_secret"), "{body}");

    db.execute(
        "INSERT INTO article (title) VALUES ('still delivered')",
        &[],
    )
    .await
    .expect("insert");
    let got = rx.expect(1, WAIT, QUIET).await;
    assert_eq!(got[0].json()["data"]["title"], "still delivered");
    daemon.stop().await;
}

/// A row locked elsewhere gives its request a 503 after the API's
/// lock_timeout, and while that request waits, others are answered: each
/// request holds a connection of its own (with one shared connection, a
/// GET waited behind the PATCH for the whole lock timeout).
#[tokio::test]
async fn a_row_locked_elsewhere_is_a_503_and_holds_nobody_up() {
    let t = TestDb::new().await;
    let api = std::sync::Arc::new(Call::new(&api_config(&t)).await);
    let (status, created) = api
        .send(
            Method::POST,
            "/hooks/",
            Some("alice"),
            Some(json!({"event": "article.*", "url": "http://127.0.0.1:9/a"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let path = format!("/hooks/{}/", created["id"].as_str().expect("id"));
    let mut db = t.client().await;
    let lock = db.transaction().await.expect("begin");
    lock.execute("SELECT 1 FROM thorn.subscriber FOR UPDATE", &[])
        .await
        .expect("row lock");
    let patching = {
        let (api, path) = (api.clone(), path.clone());
        tokio::spawn(async move {
            let body = json!({"event": "article.created"});
            api.send(Method::PATCH, &path, Some("alice"), Some(body))
                .await
        })
    };
    // Let the PATCH reach its UPDATE, which waits for the lock (2 s).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, body) = api.send(Method::GET, "/hooks/", Some("bob"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        !patching.is_finished(),
        "the GET was answered while the PATCH still waited"
    );
    let (status, body) = patching.await.expect("task");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "unavailable", "{body}");
    lock.commit().await.expect("commit");
    let (status, body) = api
        .send(
            Method::PATCH,
            &path,
            Some("alice"),
            Some(json!({"event": "article.created"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Sends `request` on a new connection; returns the status code of the
/// answer and its body (the connection is closed by the server or after
/// the answer's Content-Length), or None if the server closed it unanswered.
async fn raw(base: &str, request: &[u8]) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    socket.write_all(request).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = socket.read(&mut buf).await.unwrap_or(0);
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|l| l.trim().parse::<usize>().ok());
            if n == 0 || length.is_some_and(|l| body.len() >= l) {
                let status = head.split(' ').nth(1)?.parse().ok()?;
                return Some((status, body.to_owned()));
            }
        }
        if n == 0 {
            return None;
        }
    }
}

/// The API faces whoever reaches it and runs in the delivering process, so
/// clients cannot hold it: no token, no body read; bodies are bounded;
/// idle and slow connections are closed; connections are capped.
#[tokio::test]
async fn clients_cannot_hold_the_api() {
    use std::time::Duration;
    use thorn::serve::{HEADER_TIMEOUT, MAX_CONNECTIONS, REQUEST_TIMEOUT};
    use tokio::io::AsyncWriteExt;
    let t = TestDb::new().await;
    let api = Call::new(&api_config(&t)).await;
    let base = api.server.base.clone();
    let bearer = format!("Authorization: Bearer {}\r\n", token("alice"));

    // Without a token, a 401 at once: the announced body is never waited for.
    let (status, body) = raw(
        &base,
        b"POST /hooks/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n{",
    )
    .await
    .expect("answered");
    assert_eq!(status, 401, "{body}");
    // A bad id, not even UTF-8: 401 without a token, 404 with one.
    let bad_id = |auth: &str| {
        format!("GET /hooks/%FF/ HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
    };
    assert_eq!(
        raw(&base, bad_id("").as_bytes()).await.map(|a| a.0),
        Some(401)
    );
    let (status, body) = raw(&base, bad_id(&bearer).as_bytes())
        .await
        .expect("answered");
    assert_eq!(status, 404);
    error_fields(&serde_json::from_str(&body).expect("JSON"), "not_found");
    // Too large: a 413 in the API's shape.
    let big = format!(
        "POST /hooks/ HTTP/1.1\r\nHost: x\r\n{bearer}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{\"event\": \"{}\"}}",
        thorn::api::hooks::MAX_BODY + 20,
        "a".repeat(thorn::api::hooks::MAX_BODY + 7)
    );
    let (status, body) = raw(&base, big.as_bytes()).await.expect("answered");
    assert_eq!(status, 413, "{body}");
    error_fields(&serde_json::from_str(&body).expect("JSON"), "too_large");
    // A Host that is not a host is not echoed into the subscription's link.
    let json = r#"{"event": "a.b", "url": "https://example.com/"}"#;
    let (status, body) = raw(
        &base,
        format!(
            "POST /hooks/ HTTP/1.1\r\nHost: evil\"><script>\r\n{bearer}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
            json.len()
        )
        .as_bytes(),
    )
    .await
    .expect("answered");
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        created["subscription"]
            .as_str()
            .unwrap_or("")
            .starts_with("http://localhost/hooks/"),
        "{created}"
    );

    // An idle connection, and one whose body stalls, are closed.
    let idle = async {
        let started = std::time::Instant::now();
        assert!(
            raw(&base, b"").await.is_none(),
            "an idle connection is closed unanswered"
        );
        assert!(started.elapsed() >= HEADER_TIMEOUT / 2);
    };
    let stalled = async {
        let request = format!(
            "PATCH /hooks/{}/ HTTP/1.1\r\nHost: x\r\n{bearer}Content-Length: 100\r\n\r\n{{",
            created["id"].as_str().expect("id")
        );
        let started = std::time::Instant::now();
        let (status, body) = raw(&base, request.as_bytes()).await.expect("answered");
        assert_eq!(status, 408, "{body}");
        error_fields(&serde_json::from_str(&body).expect("JSON"), "timeout");
        assert!(started.elapsed() >= REQUEST_TIMEOUT / 2);
    };
    // A client that sends requests and never reads the answers: once the
    // buffers are full, the server's writes stall, and it closes the
    // connection (its writes to us then fail) instead of holding it.
    let unread = async {
        let addr = base.trim_start_matches("http://");
        let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let requests = format!("GET /hooks/ HTTP/1.1\r\nHost: x\r\n{bearer}\r\n").repeat(100);
        let writer =
            tokio::spawn(
                async move { while socket.write_all(requests.as_bytes()).await.is_ok() {} },
            );
        tokio::time::timeout(Duration::from_secs(90), writer)
            .await
            .expect("a connection whose answers are never read stayed open")
            .expect("writer");
    };
    tokio::join!(idle, stalled, unread);

    // At the cap, a new connection waits until one ends.
    let addr = base.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut socket = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        // Half a request line, so that each is surely accepted and served.
        socket.write_all(b"GET").await.expect("write");
        held.push(socket);
    }
    let list = format!("GET /hooks/ HTTP/1.1\r\nHost: x\r\n{bearer}Connection: close\r\n\r\n");
    let waiting = tokio::spawn({
        let base = base.clone();
        async move { raw(&base, list.as_bytes()).await }
    });
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "answered beyond the cap");
    drop(held);
    let (status, _) = waiting.await.expect("task").expect("answered");
    assert_eq!(status, 200);
}

/// A subscription of alice's to `a.*`; its path.
async fn alices_subscription(api: &Call) -> String {
    let body = json!({"event": "a.*", "url": "https://example.com/"});
    let (_, created) = api
        .send(Method::POST, "/hooks/", Some("alice"), Some(body))
        .await;
    format!("/hooks/{}/", created["id"].as_str().expect("id"))
}

/// An operator's switch-off holds: the owner may switch their own
/// subscription off and on, but not one an admin or `thorn subscriber
/// disable` switched off; an operator's switch-on lifts it. A config sync
/// that would switch such a row on leaves it off.
#[tokio::test]
async fn an_operators_switch_off_holds_against_the_owner() {
    let t = TestDb::new().await;
    let api = Call::new(&api_config(&t)).await;
    let path = alices_subscription(&api).await;
    let patch = |who: &'static str, active: bool| {
        api.send(
            Method::PATCH,
            &path,
            Some(who),
            Some(json!({"active": active})),
        )
    };
    // The owner's own switch-off is theirs to undo.
    assert_eq!(patch("alice", false).await.0, StatusCode::OK);
    let (status, body) = patch("alice", true).await;
    assert_eq!(
        (status, body["operator_off"].clone()),
        (StatusCode::OK, json!(false))
    );
    // An admin's holds.
    let (status, body) = patch(ADMIN, false).await;
    assert_eq!(
        (status, body["operator_off"].clone()),
        (StatusCode::OK, json!(true))
    );
    let (status, body) = patch("alice", true).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "operator_off", "{body}");
    let (status, body) = patch(ADMIN, true).await;
    assert_eq!(
        (status, body["active"].clone()),
        (StatusCode::OK, json!(true))
    );
    // So does the CLI's, until the CLI lifts it.
    let id = &path["/hooks/".len()..path.len() - 1];
    let (code, _, err) = crate::support::thorn_cli(&t.url, &["subscriber", "disable", id]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(patch("alice", true).await.0, StatusCode::CONFLICT);
    let (code, _, err) = crate::support::thorn_cli(&t.url, &["subscriber", "enable", id]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(patch("alice", false).await.0, StatusCode::OK);
    assert_eq!(patch("alice", true).await.0, StatusCode::OK);

    // A config subscriber an operator switched off stays off through a
    // sync that would switch it on (a new URL), and the sync succeeds.
    let db = t.client().await;
    let sync = |url: &str| {
        format!(
            "SELECT count(*) FROM thorn.sync_config_subscribers('{{\"c\": {{\"event\": \"a.*\", \"url\": \"{url}\"}}}}')"
        )
    };
    db.batch_execute(&sync("https://example.com/1"))
        .await
        .expect("sync");
    db.batch_execute(
        "UPDATE thorn.subscriber SET active = false, operator_off = true,
                deactivated_reason = 'abuse' WHERE config_name = 'c'",
    )
    .await
    .expect("operator switch-off");
    db.batch_execute(&sync("https://example.com/2"))
        .await
        .expect("a sync that would switch it on");
    let row = db
        .query_one(
            "SELECT url, active, deactivated_reason FROM thorn.subscriber WHERE config_name = 'c'",
            &[],
        )
        .await
        .expect("row");
    let got: (String, bool, Option<String>) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        got,
        ("https://example.com/2".into(), false, Some("abuse".into()))
    );
    // Taken out of the config and put back: still the operator's
    // switch-off, not "removed" (which would let it be deleted while
    // configured, and refuse the operator's switch-on).
    db.batch_execute("SELECT count(*) FROM thorn.sync_config_subscribers('{}')")
        .await
        .expect("removed");
    // The daemon's sync reports it as kept off, not as restored.
    let config = thorn::config::Config::load(
        Some(&format!(
            "{}\n[subscribers.c]\nevent = \"a.*\"\nurl = \"https://example.com/2\"\n",
            t.config_text()
        )),
        &std::collections::HashMap::new(),
    )
    .expect("config");
    let mut sync_db = t.client().await;
    let synced = thorn::db::subscribers::sync_config(
        &mut sync_db,
        &config,
        config.subscribers.as_ref().expect("[subscribers]"),
    )
    .await
    .expect("back");
    let changes: Vec<_> = synced.iter().map(|s| (s.name.as_str(), s.change)).collect();
    assert_eq!(
        changes,
        [("c", thorn::db::subscribers::Change::KeptOff)],
        "{synced:?}"
    );
    db.batch_execute("DELETE FROM thorn.subscriber WHERE config_name = 'c'")
        .await
        .expect_err("configured again: not deletable");
    let c: String = db
        .query_one(
            "SELECT id::text FROM thorn.subscriber WHERE config_name = 'c'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    let (code, _, err) = crate::support::thorn_cli(&t.url, &["subscriber", "enable", &c]).await;
    assert_eq!(code, 0, "{err}");
    let on: bool = db
        .query_one(
            "SELECT active FROM thorn.subscriber WHERE config_name = 'c'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    assert!(on, "the operator's switch-on works");
}

#[tokio::test]
async fn writing_a_subscription_back_unchanged_changes_nothing_it_did_not_say() {
    let t = TestDb::new().await;
    let api = Call::new(&api_config(&t)).await;
    let path = alices_subscription(&api).await;
    let send = |who: &'static str, method: Method, body: Value| {
        api.send(method, &path, Some(who), Some(body))
    };
    // The owner switches it off; an admin then edits it the Thorn way (GET,
    // change a field, PUT the whole): that is no operator's switch-off.
    let (status, _) = send("alice", Method::PATCH, json!({"active": false})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, mut whole) = api.send(Method::GET, &path, Some(ADMIN), None).await;
    whole["event"] = json!("a.b");
    let (status, body) = send(ADMIN, Method::PUT, whole).await;
    assert_eq!(
        (status, body["operator_off"].clone()),
        (StatusCode::OK, json!(false)),
        "{body}"
    );
    let (status, body) = send("alice", Method::PATCH, json!({"active": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A URL the address guard refuses, set by an operator in SQL, stays
    // editable through the API while it is written back unchanged.
    let db = t.client().await;
    db.batch_execute("UPDATE thorn.subscriber SET url = 'http://10.1.2.3/x'")
        .await
        .expect("operator's URL");
    let (_, mut whole) = api.send(Method::GET, &path, Some("alice"), None).await;
    whole["event"] = json!("a.c");
    let (status, body) = send("alice", Method::PUT, whole.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    whole["url"] = json!("http://10.1.2.4/x");
    let (status, body) = send("alice", Method::PUT, whole).await;
    assert_eq!(error_fields(&body, "invalid"), ["url"], "{status}");

    // "As the row has it" means when it is written: a URL changed by an
    // operator while the body was on its way is judged by the guard.
    let addr = api.server.url("/");
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = json!({"url": "http://10.1.2.3/x"}).to_string();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        token("alice"),
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    socket.write_all(head.as_bytes()).await.expect("head");
    socket
        .write_all(&body.as_bytes()[..1])
        .await
        .expect("a byte");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    db.batch_execute("UPDATE thorn.subscriber SET url = 'http://10.9.9.9/y'")
        .await
        .expect("an operator's new URL");
    socket
        .write_all(&body.as_bytes()[1..])
        .await
        .expect("the rest");
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"url\""), "{answer}");
    let kept: String = db
        .query_one("SELECT url FROM thorn.subscriber", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(kept, "http://10.9.9.9/y");

    // Another owner's id is a 404 before its body is read, however large.
    let huge = json!({"event": "x".repeat(200_000)});
    let (status, body) = send("bob", Method::PATCH, huge.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = send("alice", Method::PATCH, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn owners_are_names_of_at_most_255_characters_everywhere() {
    let t = TestDb::new().await;
    let api = Call::new(&api_config(&t)).await;
    // Too long for the owner index: a 400 on owner, never a 500.
    let long = "q".repeat(256);
    let (status, body) = api
        .send(
            Method::POST,
            "/hooks/",
            Some(ADMIN),
            Some(json!({"event": "a", "url": "https://example.com/", "owner": long})),
        )
        .await;
    assert_eq!(error_fields(&body, "invalid"), ["owner"], "{status}");
    let sub: String = (0..5000)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    let (status, body) = api
        .send(
            Method::POST,
            "/hooks/",
            Some(sub.as_str()),
            Some(json!({"event": "a", "url": "https://example.com/"})),
        )
        .await;
    assert_eq!(error_fields(&body, "invalid"), ["owner"], "{status}");
    let (status, _) = api
        .send(
            Method::POST,
            "/hooks/",
            Some(ADMIN),
            Some(json!({"event": "a", "url": "https://example.com/", "owner": "q".repeat(255)})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // The command line and a plain INSERT follow the same rule.
    let (code, _, err) = crate::support::thorn_cli(
        &t.url,
        &[
            "subscriber",
            "add",
            "--event",
            "a",
            "--url",
            "https://example.com/",
            "--owner",
            "",
        ],
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("owner"), "{err}");
    let db = t.client().await;
    let refused = db
        .batch_execute("INSERT INTO thorn.subscriber (event, url, owner) VALUES ('a', 'https://example.com/', '')")
        .await
        .expect_err("an empty owner");
    assert_eq!(
        refused.as_db_error().and_then(|e| e.column()),
        Some("owner"),
        "{}",
        thorn::db::Why(&refused)
    );
    // A row stored before the rule keeps working: it can be switched off.
    db.batch_execute(
        "ALTER TABLE thorn.subscriber DISABLE TRIGGER subscriber_validate;
         INSERT INTO thorn.subscriber (event, url, owner) VALUES ('a', 'https://example.com/', '');
         ALTER TABLE thorn.subscriber ENABLE TRIGGER subscriber_validate;
         UPDATE thorn.subscriber SET active = false WHERE owner = '';",
    )
    .await
    .expect("an old row stays updatable");
}
