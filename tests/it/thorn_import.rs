//! `thorn import-thorn` on a table shaped like Thorn's Django model
//! (`webhooks_subscriber` + `auth_user`), and the imported subscribers
//! receiving deliveries that their existing consumers can verify.

use crate::support::{
    article_table, python_compat_sign, thorn_cli, Daemon, Receiver, TestDb, QUIET, WAIT,
};

const ALICE: &str = "11111111-1111-4111-8111-111111111111";
const BOB: &str = "22222222-2222-4222-8222-222222222222";
const ANON: &str = "33333333-3333-4333-8333-333333333333";
const BROKEN: &str = "44444444-4444-4444-8444-444444444444";

#[tokio::test]
async fn imports_a_thorn_table_and_the_subscribers_verify_deliveries() {
    let t = TestDb::new().await;
    let db = t.client().await;
    let mut rx = Receiver::start().await;
    // Thorn 1.5's model as Django's migrations create it.
    db.batch_execute(
        "CREATE TABLE auth_user (
             id serial PRIMARY KEY, username varchar(150) NOT NULL UNIQUE,
             password varchar(128) NOT NULL DEFAULT '');
         CREATE TABLE webhooks_subscriber (
             id serial PRIMARY KEY,
             uuid uuid NOT NULL UNIQUE,
             event varchar(255) NOT NULL,
             url varchar(255) NOT NULL,
             user_id integer NULL REFERENCES auth_user (id),
             hmac_secret varchar(64) NOT NULL,
             hmac_digest varchar(64) NOT NULL,
             content_type varchar(255) NOT NULL,
             created_at timestamptz NOT NULL,
             updated_at timestamptz NOT NULL);
         INSERT INTO auth_user (username) VALUES ('alice'), ('bob');",
    )
    .await
    .expect("thorn tables");
    for (uuid, event, url, user, secret, digest) in [
        (
            ALICE,
            "article.*",
            rx.url("/alice"),
            Some(1),
            "alice's #1 secret!",
            "SHA256",
        ),
        (
            BOB,
            "article.created",
            rx.url("/bob"),
            Some(2),
            // Thorn's own known answers sign with this key: no minimum.
            "KEY",
            "sha512",
        ),
        (ANON, "*", rx.url("/anon"), None, "anonymous-secret", "sha1"),
        (
            BROKEN,
            "article.*",
            "ftp://example.com/".to_owned(),
            Some(1),
            "broken-secret",
            "md5",
        ),
    ] {
        let uuid = uuid::Uuid::parse_str(uuid).expect("uuid");
        db.execute(
            "INSERT INTO webhooks_subscriber
                 (uuid, event, url, user_id, hmac_secret, hmac_digest, content_type, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'application/json', '2016-05-04 03:02:01+00', now())",
            &[&uuid, &event, &url, &user, &secret, &digest],
        )
        .await
        .expect("thorn row");
    }

    // A dry run changes nothing.
    let (code, out, err) = thorn_cli(&t.url, &["import-thorn", "--dry-run"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("would import 3, already present 0, skipped 1"),
        "{out}"
    );
    let count: i64 = db
        .query_one("SELECT count(*) FROM thorn.subscriber", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 0);

    let (code, out, err) = thorn_cli(&t.url, &["import-thorn", "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json report");
    assert_eq!(report["imported"], serde_json::json!([ALICE, BOB, ANON]));
    assert_eq!(report["skipped"][0]["id"], BROKEN);
    let problems = report["skipped"][0]["problems"]
        .as_object()
        .expect("problems");
    assert!(
        problems.contains_key("url") && problems.contains_key("hmac_digest"),
        "{problems:?}"
    );

    // Again: nothing twice.
    let (code, out, _) = thorn_cli(&t.url, &["import-thorn"]).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("imported 0, already present 3, skipped 1"),
        "{out}"
    );

    let rows = db
        .query(
            "SELECT id::text, owner, hmac_digest, hmac_signer,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
             FROM thorn.subscriber ORDER BY id",
            &[],
        )
        .await
        .expect("imported rows");
    let got: Vec<(String, Option<String>, String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let when = "2016-05-04 03:02:01".to_owned();
    assert_eq!(
        got,
        vec![
            (
                ALICE.into(),
                Some("alice".into()),
                "sha256".into(),
                "compat".into(),
                when.clone()
            ),
            (
                BOB.into(),
                Some("bob".into()),
                "sha512".into(),
                "compat".into(),
                when.clone()
            ),
            (ANON.into(), None, "sha1".into(), "compat".into(), when),
        ]
    );

    // Deliveries: Alice's article goes to Alice only (sender rule); an
    // article without an author goes to every matching subscriber.
    article_table(&db).await;
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO article (title, author) VALUES ('by alice', 'alice')")
        .await
        .expect("insert");
    let alices = rx.expect(1, WAIT, QUIET).await;
    db.batch_execute("INSERT INTO article (title) VALUES ('by nobody')")
        .await
        .expect("insert");
    let mut all = rx.expect(3, WAIT, QUIET).await;
    all.sort_by(|a, b| a.path.cmp(&b.path));
    let secrets = [
        ("/alice", ALICE, "sha256", "alice's #1 secret!"),
        ("/alice", ALICE, "sha256", "alice's #1 secret!"),
        ("/anon", ANON, "sha1", "anonymous-secret"),
        ("/bob", BOB, "sha512", "KEY"),
    ];
    for (got, (path, id, digest, secret)) in alices.iter().chain(all.iter()).zip(secrets) {
        assert_eq!(got.path, path);
        assert_eq!(got.header("hook-subscription"), id, "Thorn's uuid is kept");
        // What an existing Thorn consumer verifies: compat_sign.
        assert_eq!(
            got.header("hook-hmac"),
            python_compat_sign(digest, secret, &got.body),
            "{path}"
        );
        standardwebhooks::Webhook::from_bytes(secret.as_bytes().to_vec())
            .expect("verifier")
            .verify(&got.body, &got.headers)
            .unwrap_or_else(|e| panic!("{path}: webhook-signature: {e}"));
    }
    assert_eq!(alices[0].json()["sender"], "alice");
    daemon.stop().await;
}

#[tokio::test]
async fn imports_with_the_sign_signer_and_user_ids_as_owners() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "CREATE SCHEMA legacy;
         CREATE TABLE legacy.hooks (
             id serial PRIMARY KEY, uuid uuid NOT NULL UNIQUE, event varchar(255) NOT NULL,
             url varchar(255) NOT NULL, user_id integer, hmac_secret varchar(64) NOT NULL,
             hmac_digest varchar(64) NOT NULL, content_type varchar(255) NOT NULL,
             created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL);
         INSERT INTO legacy.hooks (uuid, event, url, user_id, hmac_secret, hmac_digest,
                                   content_type, created_at, updated_at)
         VALUES (gen_random_uuid(), 'a.b', 'https://example.com/h', 7, 'secret', 'sha256',
                 'application/x-www-form-urlencoded', now(), now());",
    )
    .await
    .expect("legacy table");
    let (code, out, err) = thorn_cli(
        &t.url,
        &[
            "import-thorn",
            "--table",
            "legacy.hooks",
            "--owner-is-user-id",
            "--signer",
            "sign",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let row = db
        .query_one(
            "SELECT owner, hmac_signer, content_type FROM thorn.subscriber",
            &[],
        )
        .await
        .expect("row");
    let (owner, signer, content_type): (Option<String>, String, String) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(owner.as_deref(), Some("7"));
    assert_eq!(signer, "sign");
    assert_eq!(content_type, "application/x-www-form-urlencoded");

    let (code, _, err) = thorn_cli(&t.url, &["import-thorn", "--table", "x; DROP TABLE y"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("is not a table name"), "{err}");
}

/// Rows a Thorn table without constraints may hold: one without a uuid
/// (no id to import it under) and one whose user is gone (imported, it
/// would become anonymous and receive every event without a sender). Both
/// are reported and skipped; the rest is imported.
#[tokio::test]
async fn rows_without_a_uuid_or_a_user_are_skipped_and_said() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "CREATE TABLE auth_user (id serial PRIMARY KEY, username text NOT NULL);
         CREATE TABLE webhooks_subscriber (
             id serial PRIMARY KEY, uuid uuid, event text, url text, user_id integer,
             hmac_secret text, hmac_digest text, content_type text,
             created_at timestamptz, updated_at timestamptz);
         INSERT INTO auth_user (username) VALUES ('alice');
         INSERT INTO webhooks_subscriber
             (uuid, event, url, user_id, hmac_secret, hmac_digest, content_type, created_at)
         VALUES
             ('00000000-0000-4000-8000-000000000001', 'a.*', 'https://example.com/', 1,
              'secret-1', 'sha256', 'application/json', now()),
             ('00000000-0000-4000-8000-000000000002', 'a.*', 'https://example.com/', 99,
              'secret-2', 'sha256', 'application/json', now()),
             (NULL, 'a.*', 'https://example.com/', 1,
              'secret-3', 'sha256', 'application/json', now());",
    )
    .await
    .expect("thorn tables");
    let (code, out, err) = thorn_cli(&t.url, &["import-thorn"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("imported 1, already present 0, skipped 1"),
        "{out}"
    );
    assert!(
        out.contains("00000000-0000-4000-8000-000000000002: owner: its user_id has no row"),
        "{out}"
    );
    assert!(out.contains("skipped 1 rows without a uuid"), "{out}");
    let owners: Vec<Option<String>> = db
        .query("SELECT owner FROM thorn.subscriber", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(owners, [Some("alice".to_owned())]);
}
