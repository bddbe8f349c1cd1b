//! Subscribers kept in the daemon's config (`[subscribers.<name>]`):
//! written at start, delivered to and signed like any other, changed only
//! through the config, followed on restart and on SIGHUP, and refused as a
//! whole, naming the field, when one is bad.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use thorn::config::Config;
use tokio_postgres::Client;

use crate::process::Process;
use crate::support::{
    api_config, article_table, eventually, python_sign, Call, Daemon, Receiver, TestDb, ADMIN,
    QUIET, WAIT,
};

/// `base` with one `[subscribers.<name>]` table per (name, body) appended.
fn with_subscribers(base: &str, tables: &[(&str, String)]) -> String {
    let mut text = base.to_owned();
    for (name, body) in tables {
        text.push_str(&format!("\n[subscribers.{name}]\n{body}\n"));
    }
    text
}

/// Rewrites the daemon's config file and makes it reload.
fn reload(daemon: &Process, config: &str) {
    daemon.rewrite_config(config);
    daemon.signal("HUP");
}

fn load(text: &str) -> Config {
    Config::load(Some(text), &HashMap::new()).expect("config")
}

/// The config-made rows as (name, url, active), by name.
async fn config_rows(db: &Client) -> Vec<(String, String, bool)> {
    db.query(
        "SELECT config_name, url, active FROM thorn.subscriber
         WHERE config_name IS NOT NULL ORDER BY config_name",
        &[],
    )
    .await
    .expect("config rows")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// The database's refusal of `sql`, as its message.
async fn refusal(db: &Client, sql: &str) -> String {
    let error = db.batch_execute(sql).await.expect_err(sql);
    error
        .as_db_error()
        .expect("a database error")
        .message()
        .to_owned()
}

#[tokio::test]
async fn config_subscribers_get_signed_deliveries_and_only_the_config_changes_them() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut audit = Receiver::start().await;
    let mut crm = Receiver::start().await;
    let first = with_subscribers(
        &t.config_text(),
        &[
            (
                "audit",
                format!(
                    "event = \"article.*\"\nurl = \"{}\"\nhmac_secret = \"audit-secret\"\nhmac_digest = \"SHA512\"",
                    audit.url("/a")
                ),
            ),
            (
                "crm",
                format!("event = \"article.created\"\nurl = \"{}\"", crm.url("/c")),
            ),
        ],
    );
    let daemon = Daemon::start(load(&first));
    eventually(
        &db,
        "SELECT count(*) = 2 FROM thorn.subscriber WHERE config_name IS NOT NULL",
    )
    .await;
    db.batch_execute("INSERT INTO article (title) VALUES ('one')")
        .await
        .expect("insert");
    let to_audit = audit.expect(1, WAIT, QUIET).await;
    let to_crm = crm.expect(1, WAIT, QUIET).await;
    let crm_secret: String = db
        .query_one(
            "SELECT hmac_secret FROM thorn.subscriber WHERE config_name = 'crm'",
            &[],
        )
        .await
        .expect("crm row")
        .get(0);
    assert_eq!(crm_secret.len(), 64, "an absent secret is generated");
    let expected = python_sign(&[
        ("sha512", "audit-secret", &to_audit[0].body),
        ("sha256", &crm_secret, &to_crm[0].body),
    ]);
    assert_eq!(to_audit[0].header("hook-hmac"), expected[0]);
    assert_eq!(to_crm[0].header("hook-hmac"), expected[1]);
    assert_eq!(to_crm[0].header("hook-event"), "article.created");

    // SQL may switch one off, and nothing else.
    for sql in [
        "UPDATE thorn.subscriber SET url = 'http://127.0.0.1:9/x' WHERE config_name = 'audit'",
        "UPDATE thorn.subscriber SET hmac_secret = 'another-secret' WHERE config_name = 'audit'",
        "UPDATE thorn.subscriber SET config_name = NULL WHERE config_name = 'audit'",
        "DELETE FROM thorn.subscriber WHERE config_name = 'audit'",
    ] {
        let message = refusal(&db, sql).await;
        assert!(message.contains("[subscribers.audit]"), "{sql}: {message}");
    }
    let message = refusal(
        &db,
        "INSERT INTO thorn.subscriber (event, url, config_name) VALUES ('a', 'http://h/', 'forged')",
    )
    .await;
    assert!(message.contains("[subscribers.forged]"), "{message}");
    db.batch_execute(
        "UPDATE thorn.subscriber SET hmac_digest = 'SHA512' WHERE config_name = 'audit';
         UPDATE thorn.subscriber SET active = false, deactivated_reason = 'by hand'
         WHERE config_name = 'audit'",
    )
    .await
    .expect("repeating a value and switching off are allowed");

    // So may the API: changes and deletion are a 409 naming the table.
    let api = Call::new(&api_config(&t)).await;
    let id: uuid::Uuid = db
        .query_one(
            "SELECT id FROM thorn.subscriber WHERE config_name = 'crm'",
            &[],
        )
        .await
        .expect("crm id")
        .get(0);
    let path = format!("/hooks/{id}/");
    let as_admin = |method: Method, body: Option<Value>| api.send(method, &path, Some(ADMIN), body);
    let (_, shown) = as_admin(Method::GET, None).await;
    assert_eq!(shown["config_name"], "crm", "{shown}");
    let (status, body) = as_admin(
        Method::PATCH,
        Some(serde_json::json!({"url": "http://127.0.0.1:9/elsewhere"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"], "from_config", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("[subscribers.crm]"),
        "{body}"
    );
    assert_eq!(as_admin(Method::DELETE, None).await.0, StatusCode::CONFLICT);
    let (status, _) = as_admin(Method::PATCH, Some(serde_json::json!({"active": false}))).await;
    assert_eq!(status, StatusCode::OK, "switching off is allowed");
    daemon.stop().await;

    // A restart with crm removed and audit moved: crm is switched off and
    // kept with its deliveries, and the switched-off audit is on again at
    // its new URL.
    let second = with_subscribers(
        &t.config_text(),
        &[(
            "audit",
            format!(
                "event = \"article.*\"\nurl = \"{}\"\nhmac_secret = \"audit-secret\"\nhmac_digest = \"sha512\"",
                audit.url("/moved")
            ),
        )],
    );
    let daemon = Daemon::start(load(&second));
    eventually(
        &db,
        "SELECT count(*) = 2
                AND bool_and(config_name <> 'audit' OR (active AND url LIKE '%/moved'
                                                         AND deactivated_reason IS NULL))
                AND bool_and(config_name <> 'crm' OR (NOT active
                                                       AND deactivated_reason = 'removed from thorn''s config'))
         FROM thorn.subscriber WHERE config_name IS NOT NULL",
    )
    .await;
    let kept: i64 = db
        .query_one(
            "SELECT count(*) FROM thorn.delivery WHERE subscriber_id = $1",
            &[&id],
        )
        .await
        .expect("crm's deliveries")
        .get(0);
    assert_eq!(kept, 1, "a removed entry keeps its deliveries");
    db.batch_execute("INSERT INTO article (title) VALUES ('two')")
        .await
        .expect("insert");
    let moved = audit.expect(1, WAIT, QUIET).await;
    assert_eq!(moved[0].path, "/moved");
    assert!(crm.next(QUIET).await.is_none(), "crm was switched off");
    // Removed, it stays off until the config has it back: switching it on
    // by hand would deliver for an entry no config names.
    let (status, body) = as_admin(Method::PATCH, Some(serde_json::json!({"active": true}))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("put it back there"),
        "{body}"
    );
    // Nor can a row still in the config be marked removed by hand (and so
    // made deletable, to come back with a new id and secret).
    let message = refusal(
        &db,
        "UPDATE thorn.subscriber SET active = false,
                deactivated_reason = 'removed from thorn''s config'
         WHERE config_name = 'audit'",
    )
    .await;
    assert!(message.contains("[subscribers.audit]"), "{message}");
    // Removed from the config, it may be deleted.
    assert_eq!(
        as_admin(Method::DELETE, None).await.0,
        StatusCode::NO_CONTENT
    );
    daemon.stop().await;

    // A daemon whose config has no [subscribers] table leaves them be.
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO article (title) VALUES ('three')")
        .await
        .expect("insert");
    audit.expect(1, WAIT, QUIET).await;
    assert_eq!(config_rows(&db).await.len(), 1);
    daemon.stop().await;
}

#[tokio::test]
async fn sighup_applies_subscriber_changes_and_bad_ones_are_refused_by_name() {
    let t = TestDb::new().await;
    let db = t.client().await;
    let rx = Receiver::start().await;
    fn one<'a>(name: &'a str, url: &str) -> (&'a str, String) {
        (name, format!("event = \"article.*\"\nurl = \"{url}\""))
    }
    let mut daemon = Process::run(&with_subscribers(
        &t.config_text(),
        &[one("a", &rx.url("/a"))],
    ));
    eventually(
        &db,
        "SELECT count(*) = 1 FROM thorn.subscriber WHERE config_name = 'a'",
    )
    .await;

    let both = with_subscribers(
        &t.config_text(),
        &[one("a", &rx.url("/a2")), one("b", &rx.url("/b"))],
    );
    reload(&daemon, &both);
    eventually(
        &db,
        "SELECT count(*) = 2 AND bool_and(url NOT LIKE '%/a') FROM thorn.subscriber
         WHERE config_name IS NOT NULL",
    )
    .await;
    let id_of_a = || async {
        db.query_one(
            "SELECT id FROM thorn.subscriber WHERE config_name = 'a'",
            &[],
        )
        .await
        .expect("a")
        .get::<_, uuid::Uuid>(0)
    };
    let a = id_of_a().await;

    // Taken out, a is switched off; put back, it is on again, the same row.
    reload(
        &daemon,
        &with_subscribers(&t.config_text(), &[one("b", &rx.url("/b"))]),
    );
    eventually(
        &db,
        "SELECT NOT active AND deactivated_reason = 'removed from thorn''s config'
         FROM thorn.subscriber WHERE config_name = 'a'",
    )
    .await;
    reload(&daemon, &both);
    eventually(
        &db,
        "SELECT active AND deactivated_reason IS NULL FROM thorn.subscriber WHERE config_name = 'a'",
    )
    .await;
    assert_eq!(id_of_a().await, a);
    let before = config_rows(&db).await;

    // Without a [subscribers] table, the rows are left as they are.
    reload(&daemon, &t.config_text());
    daemon
        .wait_for_log("[subscribers] is gone", Duration::from_secs(20))
        .await;
    assert_eq!(config_rows(&db).await, before);

    // One bad entry: nothing is written, every bad field is named.
    reload(
        &daemon,
        &with_subscribers(
            &t.config_text(),
            &[
                one("a", &rx.url("/a3")),
                ("b", "event = \"a..b\"\nurl = \"ftp://h/\"".to_owned()),
            ],
        ),
    );
    daemon
        .wait_for_log("subscribers.b.url", Duration::from_secs(20))
        .await;
    let log = daemon.log();
    assert!(log.contains("subscribers.b.event"), "{log}");
    assert_eq!(config_rows(&db).await, before);
    daemon.stop_cleanly(WAIT).await;

    // A bad entry at start: the daemon does not start, and
    // `check-config` finds it beforehand (the URL rules even without the
    // database).
    let bad = with_subscribers(
        &t.config_text(),
        &[
            ("b", "event = \"x\"\nurl = \"not a url\"".to_owned()),
            // Valid for the database; refused by the address guard.
            ("c", "event = \"x\"\nurl = \"http://10.0.0.5/x\"".to_owned()),
        ],
    );
    for args in [
        &["run"][..],
        &["check-config", "--database", "require"],
        &["check-config"],
    ] {
        let mut refused = Process::spawn(&bad, args);
        let status = refused.wait(WAIT).await;
        assert_eq!(status.code(), Some(64), "{args:?}: {}", refused.log());
        assert!(
            refused
                .log()
                .contains("subscribers.c.url: 10.0.0.5 is not a global address"),
            "{args:?}: {}",
            refused.log()
        );
        assert!(
            refused.log().contains("subscribers.b.url"),
            "{args:?}: {}",
            refused.log()
        );
    }
    assert_eq!(config_rows(&db).await, before);
}

/// A SIGHUP while the daemon is still starting is applied after start-up
/// has written the config it began with, so the newer config wins (start-up
/// is held here by a lock on thorn.model, which it reads after migrating).
#[tokio::test]
async fn a_reload_during_start_up_is_not_undone_by_it() {
    let t = TestDb::new().await;
    let mut db = t.client().await;
    let entry = |url: &str| [("a", format!("event = \"article.*\"\nurl = \"{url}\""))];
    let old = with_subscribers(&t.config_text(), &entry("http://127.0.0.1:9/old"));
    let new = with_subscribers(&t.config_text(), &entry("http://127.0.0.1:9/new"));
    let hold = db.transaction().await.expect("begin");
    hold.batch_execute("LOCK TABLE thorn.model")
        .await
        .expect("lock");
    let mut daemon = Process::run(&old);
    // Started, and waiting for the lock.
    let waiting = t.client().await;
    eventually(
        &waiting,
        "SELECT count(*) > 0 FROM pg_locks
         WHERE NOT granted AND relation = 'thorn.model'::regclass",
    )
    .await;
    reload(&daemon, &new);
    daemon
        .wait_for_log("SIGHUP: reloading the config", Duration::from_secs(20))
        .await;
    hold.commit().await.expect("release");
    // Start-up has written the config it began with; then the newer one
    // comes, and stays.
    daemon
        .wait_for_log("thorn is running", Duration::from_secs(20))
        .await;
    eventually(
        &waiting,
        "SELECT url LIKE '%/new' FROM thorn.subscriber WHERE config_name = 'a'",
    )
    .await;
    daemon.stop_cleanly(WAIT).await;
}

/// `[security]` changes only at a restart (the delivery client is built
/// once), so a reload judges its subscribers' URLs by the running one: an
/// address that only the new `[security]` allows is refused, since every
/// delivery there would be, and one that only the new one would refuse is
/// written and delivered to until the restart.
#[tokio::test]
async fn a_reload_judges_subscriber_urls_by_the_running_security() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    let loopback = "allow_networks = [\"127.0.0.0/8\"]";
    assert!(t.config_text().contains(loopback));
    let with = |networks: &str, url: &str| {
        with_subscribers(
            &t.config_text().replace(loopback, networks),
            &[("a", format!("event = \"article.*\"\nurl = \"{url}\""))],
        )
    };
    let mut daemon = Process::run(&with(loopback, &rx.url("/a")));
    eventually(
        &db,
        "SELECT count(*) = 1 FROM thorn.subscriber WHERE config_name = 'a'",
    )
    .await;

    reload(
        &daemon,
        &with(
            "allow_networks = [\"127.0.0.0/8\", \"10.0.0.0/8\"]",
            "http://10.0.0.5/x",
        ),
    );
    daemon
        .wait_for_log(
            "subscribers.a.url: 10.0.0.5 is not a global address",
            Duration::from_secs(20),
        )
        .await;
    assert!(daemon.log().contains("only applied by a restart"));
    assert_eq!(config_rows(&db).await[0].1, rx.url("/a"), "nothing written");

    reload(&daemon, &with("allow_networks = []", &rx.url("/a2")));
    eventually(
        &db,
        "SELECT url LIKE '%/a2' FROM thorn.subscriber WHERE config_name = 'a'",
    )
    .await;
    db.batch_execute("INSERT INTO article (title) VALUES ('one')")
        .await
        .expect("insert");
    assert_eq!(rx.expect(1, WAIT, QUIET).await[0].path, "/a2");
    daemon.stop_cleanly(WAIT).await;
}
