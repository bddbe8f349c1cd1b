//! Upgrading a database from an earlier schema.
//!
//! For each starting schema, a database is built as the release that had it
//! left it (its files of sql/, each in its own transaction, recorded in
//! thorn.migration) and filled through that schema's own SQL: annotated
//! tables (one partitioned), subscribers, events, and deliveries delivered,
//! dead and pending. Then the real migration runs. The annotations must still
//! capture, the subscribers keep what they had, and the daemon must deliver
//! what was pending and what is captured afterwards, signed with the old
//! secrets, and nothing else.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio_postgres::Client;
use uuid::Uuid;

use crate::support::{
    eventually, python_compat_sign, python_sign, standard_verify, subscribe, Daemon, Receiver,
    Role, TestDb, QUIET, WAIT,
};

/// The versioned files of sql/, in order: (version, name, SQL). The name is
/// the file's without its number, as MIGRATIONS in src/db/migrate.rs has it.
fn migration_files() -> Vec<(i32, String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut files: Vec<(i32, String, String)> = std::fs::read_dir(&dir)
        .expect("sql/")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let stem = path.file_stem()?.to_str()?.to_owned();
            // roles.sql has no number: it is not a migration.
            let (number, name) = stem.split_once('_')?;
            let version = number.parse().ok()?;
            let sql = std::fs::read_to_string(&path).expect("a migration file");
            Some((version, name.to_owned(), sql))
        })
        .collect();
    files.sort();
    files
}

/// A database at the schema of `versions`, as `thorn migrate` of a release
/// that had those migrations left it: thorn.migration made as apply_missing
/// makes it, then each file in its own transaction, recorded.
async fn database_at(versions: &[i32]) -> TestDb {
    let t = TestDb::empty().await;
    let mut db = t.client().await;
    db.batch_execute(thorn::db::migrate::MIGRATION_TABLE)
        .await
        .expect("thorn.migration");
    for (version, name, sql) in migration_files() {
        if !versions.contains(&version) {
            continue;
        }
        let tx = db.transaction().await.expect("begin");
        tx.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("schema {version}: {}", thorn::db::Why(&e)));
        tx.execute(
            "INSERT INTO thorn.migration (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await
        .expect("record the migration");
        tx.commit().await.expect("commit");
    }
    t
}

/// A table annotated with every option, and a partitioned one. Partitioned
/// tables could be annotated from schema 2 on; before schema 10 only the
/// parent is, and schema 10's migration makes its partitions follow. The
/// partitioned one holds `json`, whose `\u0000` captures before schema 25
/// could not render.
const TABLES: &str = "
    CREATE TABLE public.article (
        id serial PRIMARY KEY, title text NOT NULL, state text NOT NULL DEFAULT 'draft',
        author text, password_hash text, views int NOT NULL DEFAULT 0);
    CREATE TABLE public.reading (id int, at date, value int, note json, PRIMARY KEY (id, at))
        PARTITION BY RANGE (at);
    CREATE TABLE public.reading_2024 PARTITION OF public.reading
        FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
    CREATE TABLE public.reading_2025 PARTITION OF public.reading
        FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');";

/// The same calls from schema 2 to now: their signatures never changed.
const ANNOTATE: &str = "
    SELECT thorn.webhook_model('public.article', sender_field => 'author',
        reference => '/article/{id}/', exclude => ARRAY['password_hash'],
        watch => ARRAY['title', 'state']);
    SELECT thorn.webhook_event('public.article', 'article.published', 'change',
        $$new.state = 'published' AND old.state IS DISTINCT FROM 'published'$$);
    SELECT thorn.webhook_model('public.reading', reference => '/reading/{id}',
        columns => ARRAY['id', 'at', 'value']);";

/// thorn.model and thorn.model_event as every upgrade must leave them.
const ANNOTATIONS: [&str; 4] = [
    r#"(article,article,article.created,article.changed,article.removed,author,/article/{id}/,,{password_hash},"{title,state}")"#,
    r#"(reading,reading,reading.created,reading.changed,reading.removed,,/reading/{id},"{id,at,value}",,)"#,
    r#"(reading_2024,reading,reading.created,reading.changed,reading.removed,,/reading/{id},"{id,at,value}",,)"#,
    r#"(reading_2025,reading,reading.created,reading.changed,reading.removed,,/reading/{id},"{id,at,value}",,)"#,
];
const CUSTOM_EVENTS: [&str; 1] = [
    r#"(article,article.published,change,"new.state = 'published' AND old.state IS DISTINCT FROM 'published'")"#,
];

/// Written before the upgrade: events 1 to 7 (with schema 1, which has no
/// capture, they are written to the outbox by hand afterwards).
const WRITES_BEFORE: &str = r#"
    INSERT INTO article (title, author, password_hash) VALUES ('First', 'alice', 'h1');
    INSERT INTO article (title, author, password_hash) VALUES ('Second', 'bob', 'h2');
    UPDATE article SET title = 'First!' WHERE id = 1;
    UPDATE article SET state = 'published' WHERE id = 2;
    INSERT INTO article (title, author, password_hash) VALUES ('Third', 'alice', 'h3');
    INSERT INTO reading VALUES (1, '2024-05-01', 10, '"n"');"#;

/// Written after the upgrade: events 9 to 20. The statements commented
/// "nothing" change only excluded, unwatched or uncarried columns; the
/// partition created last takes its parent's annotation (schema 10's event
/// trigger).
const WRITES_AFTER: &str = r#"
    INSERT INTO article (title, author, password_hash) VALUES ('Fresh', 'alice', 'h4');
    UPDATE article SET password_hash = 'h5' WHERE id = 4;  -- nothing
    UPDATE article SET views = 7 WHERE id = 4;             -- nothing
    UPDATE article SET title = 'Fresher' WHERE id = 4;
    UPDATE article SET state = 'published' WHERE id = 4;
    UPDATE article SET title = title || '+' WHERE id IN (1, 3);
    DELETE FROM article WHERE id = 4;
    INSERT INTO reading VALUES (2, '2025-02-01', 20, '"p"');
    INSERT INTO reading_2025 VALUES (3, '2025-03-01', 30, '"d"');
    UPDATE reading_2024 SET value = 11 WHERE id = 1;
    UPDATE reading SET note = '"\u0000"' WHERE id = 2;  -- nothing
    DELETE FROM reading_2025 WHERE id = 3;
    CREATE TABLE public.reading_2026 PARTITION OF public.reading
        FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
    INSERT INTO reading_2026 VALUES (4, '2026-01-02', 40, '"n"');"#;

/// One outbox row, and the subscribers that must receive it after the
/// upgrade.
struct Ev {
    name: &'static str,
    reference: &'static str,
    sender: Option<&'static str>,
    /// The jsonb text, as the daemon splices it into the body.
    data: &'static str,
    source: Option<&'static str>,
    to: &'static [&'static str],
}

const fn ev(
    name: &'static str,
    reference: &'static str,
    sender: Option<&'static str>,
    data: &'static str,
    source: Option<&'static str>,
    to: &'static [&'static str],
) -> Ev {
    Ev {
        name,
        reference,
        sender,
        data,
        source,
        to,
    }
}

const ALICE: Option<&str> = Some("alice");
const BOB: Option<&str> = Some("bob");
const ARTICLE: Option<&str> = Some("article");
const READING: Option<&str> = Some("reading");

/// Events 1 to 8. 1 to 3 are dispatched before the upgrade (see `seed`): 1
/// was delivered to alice (and is pending for off, switched off since), 2 is
/// dead for bob, 3 is pending for alice (a retry, due). 8 was written to the
/// outbox directly, as applications may.
#[rustfmt::skip]
const BEFORE: [Ev; 8] = [
    ev("article.created", "/article/1/", ALICE,
       r#"{"id": 1, "state": "draft", "title": "First", "views": 0, "author": "alice"}"#,
       ARTICLE, &[]),
    ev("article.created", "/article/2/", BOB,
       r#"{"id": 2, "state": "draft", "title": "Second", "views": 0, "author": "bob"}"#,
       ARTICLE, &[]),
    ev("article.changed", "/article/1/", ALICE,
       r#"{"id": 1, "state": "draft", "title": "First!", "views": 0, "author": "alice"}"#,
       ARTICLE, &["alice"]),
    ev("article.changed", "/article/2/", BOB,
       r#"{"id": 2, "state": "published", "title": "Second", "views": 0, "author": "bob"}"#,
       ARTICLE, &["bob"]),
    ev("article.published", "/article/2/", BOB,
       r#"{"id": 2, "state": "published", "title": "Second", "views": 0, "author": "bob"}"#,
       ARTICLE, &["bob"]),
    ev("article.created", "/article/3/", ALICE,
       r#"{"id": 3, "state": "draft", "title": "Third", "views": 0, "author": "alice"}"#,
       ARTICLE, &["alice"]),
    ev("reading.created", "/reading/1", None,
       r#"{"at": "2024-05-01", "id": 1, "value": 10}"#,
       READING, &["any", "ops"]),
    ev("invoice.paid", "/invoice/9", None,
       r#"{"total": 12.50}"#,
       None, &["any"]),
];

/// Events 9 to 20, from WRITES_AFTER.
#[rustfmt::skip]
const AFTER: [Ev; 12] = [
    ev("article.created", "/article/4/", ALICE,
       r#"{"id": 4, "state": "draft", "title": "Fresh", "views": 0, "author": "alice"}"#,
       ARTICLE, &["alice"]),
    ev("article.changed", "/article/4/", ALICE,
       r#"{"id": 4, "state": "draft", "title": "Fresher", "views": 7, "author": "alice"}"#,
       ARTICLE, &["alice"]),
    ev("article.changed", "/article/4/", ALICE,
       r#"{"id": 4, "state": "published", "title": "Fresher", "views": 7, "author": "alice"}"#,
       ARTICLE, &["alice"]),
    ev("article.published", "/article/4/", ALICE,
       r#"{"id": 4, "state": "published", "title": "Fresher", "views": 7, "author": "alice"}"#,
       ARTICLE, &["alice", "compat"]),
    ev("article.changed", "/article/1/", ALICE,
       r#"{"id": 1, "state": "draft", "title": "First!+", "views": 0, "author": "alice"}"#,
       ARTICLE, &["alice"]),
    ev("article.changed", "/article/3/", ALICE,
       r#"{"id": 3, "state": "draft", "title": "Third+", "views": 0, "author": "alice"}"#,
       ARTICLE, &["alice"]),
    ev("article.removed", "/article/4/", ALICE,
       r#"{"id": 4, "state": "published", "title": "Fresher", "views": 7, "author": "alice"}"#,
       ARTICLE, &["alice"]),
    ev("reading.created", "/reading/2", None,
       r#"{"at": "2025-02-01", "id": 2, "value": 20}"#,
       READING, &["any", "ops"]),
    ev("reading.created", "/reading/3", None,
       r#"{"at": "2025-03-01", "id": 3, "value": 30}"#,
       Some("reading_2025"), &["any", "ops"]),
    ev("reading.changed", "/reading/1", None,
       r#"{"at": "2024-05-01", "id": 1, "value": 11}"#,
       Some("reading_2024"), &["any", "ops"]),
    ev("reading.removed", "/reading/3", None,
       r#"{"at": "2025-03-01", "id": 3, "value": 30}"#,
       Some("reading_2025"), &["any", "ops"]),
    ev("reading.created", "/reading/4", None,
       r#"{"at": "2026-01-02", "id": 4, "value": 40}"#,
       Some("reading_2026"), &["any", "ops"]),
];

/// A subscriber; its URL is the receiver's `/<name>`.
struct Sub {
    name: &'static str,
    event: &'static str,
    owner: Option<&'static str>,
    secret: &'static str,
    digest: &'static str,
    content_type: &'static str,
    signer: &'static str,
    active: bool,
    /// The migration it needs: hmac_signer came with 3, config subscribers
    /// with 15.
    since: i32,
}

/// Accepted until schema 17, which keeps such rows working: the rest is no
/// base64, so the whole secret is used as plain text.
const OLD_WHSEC: &str = "whsec_bob!secret";
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const FORM: &str = "application/x-www-form-urlencoded";

/// The subscribers a database with `versions` can hold.
fn subscribers(versions: &[i32]) -> Vec<Sub> {
    let sub = |name, event, owner, secret, digest| Sub {
        name,
        event,
        owner,
        secret,
        digest,
        content_type: "application/json",
        signer: "sign",
        active: true,
        since: 1,
    };
    let bob_secret = if versions.contains(&17) {
        WHSEC
    } else {
        OLD_WHSEC
    };
    let all = vec![
        sub("alice", "article.*", ALICE, "alice-secret", "sha512"),
        sub("bob", "article.*", BOB, bob_secret, "sha256"),
        // Events with a sender go to their owner's subscribers only: this one
        // gets those without.
        Sub {
            content_type: FORM,
            ..sub("any", "*", None, "any-secret", "sha1")
        },
        Sub {
            active: false,
            ..sub("off", "article.*", ALICE, "off-secret", "sha256")
        },
        Sub {
            signer: "compat",
            since: 3,
            ..sub("compat", "article.published", ALICE, "compat-ret", "sha256")
        },
        // Made by the config's sync, which keeps the row's secret while the
        // config gives none.
        Sub {
            since: 15,
            ..sub("ops", "reading.*", None, "ops-secret", "sha256")
        },
    ];
    all.into_iter()
        .filter(|s| versions.contains(&s.since))
        .collect()
}

/// The deliveries made before the upgrade (see `seed`).
const D_DELIVERED: Uuid = Uuid::from_u128(0xd1);
const D_INACTIVE: Uuid = Uuid::from_u128(0xd2);
const D_DEAD: Uuid = Uuid::from_u128(0xd3);
const D_RETRY: Uuid = Uuid::from_u128(0xd4);

async fn insert_event(db: &Client, e: &Ev) {
    db.execute(
        "INSERT INTO thorn.event (name, ref, sender, data, source)
         VALUES ($1, $2, $3, $4::text::jsonb, $5::text::regclass)",
        &[&e.name, &e.reference, &e.sender, &e.data, &e.source],
    )
    .await
    .expect("an outbox row");
}

/// Fills a database at the schema of `versions` as the users of its release
/// did, with the SQL it has; returns the subscribers' ids by name.
async fn seed(db: &Client, versions: &[i32], rx: &Receiver) -> BTreeMap<&'static str, Uuid> {
    db.batch_execute(TABLES).await.expect("tables");
    if versions.contains(&2) {
        db.batch_execute(ANNOTATE).await.expect("annotations");
    }
    let mut ids = BTreeMap::new();
    for (n, s) in (0..).zip(subscribers(versions)) {
        let url = rx.url(&format!("/{}", s.name));
        let id: Uuid = if s.name == "ops" {
            let entries = serde_json::json!({"ops": {
                "event": s.event, "url": url, "hmac_secret": s.secret}});
            db.query_one(
                "SELECT subscriber_id FROM thorn.sync_config_subscribers($1)",
                &[&entries],
            )
            .await
            .expect("a config subscriber")
            .get(0)
        } else {
            // hmac_signer exists from schema 3 on.
            let (signer, signer_value) = match versions.contains(&3) {
                true => (", hmac_signer", ", $10"),
                false => ("", ""),
            };
            let sql = format!(
                "INSERT INTO thorn.subscriber (id, event, url, owner, hmac_secret, hmac_digest,
                     content_type, active, deactivated_reason{signer})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9{signer_value})"
            );
            let id = Uuid::from_u128(0xa0 + n);
            let reason = (!s.active).then_some("switched off by hand");
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
                &id,
                &s.event,
                &url,
                &s.owner,
                &s.secret,
                &s.digest,
                &s.content_type,
                &s.active,
                &reason,
                &s.signer,
            ];
            let count = if versions.contains(&3) { 10 } else { 9 };
            db.execute(&sql, &params[..count])
                .await
                .expect("a subscriber");
            id
        };
        ids.insert(s.name, id);
    }
    db.batch_execute(WRITES_BEFORE).await.expect("writes");
    if !versions.contains(&2) {
        // No capture yet: what it would have written, by hand.
        for e in &BEFORE[..7] {
            insert_event(db, e).await;
        }
    }
    insert_event(db, &BEFORE[7]).await;
    // Events 1 to 3 dispatched as a daemon of the time did: the events
    // marked, one delivery row per recipient (in the columns of schema 1,
    // which no later schema changed), then each attempt's outcome. Event 1
    // went to alice, and to off, which was switched off before its attempt;
    // 2 is dead for bob; 3 failed once for alice and its retry is due.
    db.execute(
        "UPDATE thorn.event SET dispatched_at = now() - interval '1 minute' WHERE id <= 3",
        &[],
    )
    .await
    .expect("dispatched");
    db.execute(
        "INSERT INTO thorn.delivery (id, event_id, subscriber_id, state, attempts,
             next_attempt_at, last_attempt_at, status_code, error_class, error, duration_ms,
             response, created_at, delivered_at)
         VALUES ($1, 1, $5, 'delivered', 1, now() - interval '1 minute',
                 now() - interval '1 minute', 200, NULL, NULL, 12, 'ok',
                 now() - interval '1 minute', now() - interval '1 minute'),
                ($2, 1, $6, 'pending', 0, now() - interval '1 minute', NULL, NULL, NULL, NULL,
                 NULL, NULL, now() - interval '1 minute', NULL),
                ($3, 2, $7, 'dead', 3, now() - interval '1 minute', now() - interval '1 minute',
                 500, 'http_status', 'HTTP 500 Internal Server Error', 30, 'boom',
                 now() - interval '1 minute', NULL),
                ($4, 3, $5, 'pending', 1, now() - interval '1 second',
                 now() - interval '1 minute', 503, 'http_status', 'HTTP 503 Service Unavailable',
                 25, NULL, now() - interval '1 minute', NULL)",
        &[
            &D_DELIVERED,
            &D_INACTIVE,
            &D_DEAD,
            &D_RETRY,
            &ids["alice"],
            &ids["off"],
            &ids["bob"],
        ],
    )
    .await
    .expect("deliveries");
    ids
}

/// The rows of a query, each as one text (a record or jsonb), in order.
async fn texts(db: &Client, sql: &str) -> Vec<String> {
    db.query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", thorn::db::Why(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// What the upgrade must not change, row by row.
#[derive(Debug, PartialEq)]
struct Kept {
    subscribers: Vec<String>,
    events: Vec<String>,
    deliveries: Vec<String>,
}

async fn kept(db: &Client) -> Kept {
    Kept {
        // The columns of schema 1; later ones are checked on their own.
        subscribers: texts(
            db,
            "SELECT (id, event, url, owner, hmac_secret, hmac_digest, content_type, active,
                     deactivated_reason, ordered, created_at)::text
             FROM thorn.subscriber ORDER BY id",
        )
        .await,
        events: texts(
            db,
            "SELECT to_jsonb(e)::text FROM thorn.event e ORDER BY id",
        )
        .await,
        deliveries: texts(
            db,
            "SELECT to_jsonb(d)::text FROM thorn.delivery d ORDER BY id",
        )
        .await,
    }
}

/// The outbox above `after`: id, then name | ref | sender | data | source.
async fn outbox(db: &Client, after: i64) -> Vec<(i64, String)> {
    db.query(
        "SELECT id, concat_ws(' | ', name, ref, coalesce(sender, '-'), data::text,
                              coalesce(source::text, '-'))
         FROM thorn.event WHERE id > $1 ORDER BY id",
        &[&after],
    )
    .await
    .expect("events")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// `events` as `outbox` shows them, numbered from `first_id`.
fn described(first_id: i64, events: &[Ev]) -> Vec<(i64, String)> {
    (first_id..)
        .zip(events)
        .map(|(id, e)| {
            let row = [
                e.name,
                e.reference,
                e.sender.unwrap_or("-"),
                e.data,
                e.source.unwrap_or("-"),
            ];
            (id, row.join(" | "))
        })
        .collect()
}

/// The upgrade itself: what it applies and records, what it keeps, and the
/// annotations capturing afterwards as they did.
async fn migrate_and_check(db: &mut Client, versions: &[i32]) {
    let before = kept(db).await;
    let applied = thorn::db::migrate::migrate(db)
        .await
        .unwrap_or_else(|e| panic!("upgrading from {versions:?}: {e:?}"));
    let latest = thorn::db::migrate::latest();
    let missing: Vec<i32> = (1..=latest).filter(|v| !versions.contains(v)).collect();
    assert_eq!(applied, missing);
    let version = thorn::db::migrate::current_version(db).await;
    assert_eq!(version.expect("version"), latest);
    let recorded = texts(
        db,
        "SELECT version || ' ' || name FROM thorn.migration ORDER BY version",
    );
    let files: Vec<String> = migration_files()
        .into_iter()
        .map(|(version, name, _)| format!("{version} {name}"))
        .collect();
    assert_eq!(recorded.await, files);
    assert_eq!(kept(db).await, before, "what the upgrade must not change");
    // Every capture made before honours thorn.notify (schema 21).
    assert_eq!(
        texts(
            db,
            r"SELECT proname::text FROM pg_proc
              WHERE pronamespace = 'thorn'::regnamespace AND proname LIKE 'capture\_%'
                AND prosrc NOT LIKE '%thorn.notify%'",
        )
        .await,
        Vec::<String>::new(),
        "captures that still notify whatever thorn.notify says"
    );

    if !versions.contains(&2) {
        // Nothing to annotate with before schema 2: annotate now.
        db.batch_execute(ANNOTATE).await.expect("annotations");
    }
    let annotations = texts(
        db,
        "SELECT (table_name::text, model, on_create, on_change, on_delete, sender_field,
                 reference, columns, exclude, watch)::text
         FROM thorn.model ORDER BY table_name::text",
    );
    assert_eq!(annotations.await, ANNOTATIONS);
    let custom = texts(
        db,
        "SELECT (table_name::text, event, fires_on, condition)::text
         FROM thorn.model_event ORDER BY table_name::text, event",
    );
    assert_eq!(custom.await, CUSTOM_EVENTS);
    // The DDL guard (an event trigger since schema 4, on every command since
    // 13) refuses to rename a column the annotation names.
    let refused = db
        .batch_execute("ALTER TABLE public.article RENAME COLUMN password_hash TO pw")
        .await
        .expect_err("renaming an excluded column is refused");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::DEPENDENT_OBJECTS_STILL_EXIST),
        "{}",
        thorn::db::Why(&refused)
    );

    db.batch_execute(WRITES_AFTER).await.expect("writes");
    assert_eq!(outbox(db, 8).await, described(9, &AFTER), "captured after");
    let uncaptured = thorn::db::migrate::uncaptured_partitions(db).await;
    assert_eq!(uncaptured.expect("partitions"), Vec::<String>::new());
}

/// The body Thorn's envelope gives `e`, as JSON or as a form.
fn body(e: &Ev, content_type: &str) -> String {
    if content_type == FORM {
        return url::form_urlencoded::Serializer::new(String::new())
            .append_pair("event", e.name)
            .append_pair("ref", e.reference)
            .append_pair("sender", e.sender.unwrap_or(""))
            .append_pair("data", e.data)
            .finish();
    }
    let sender = e.sender.map_or("null".to_owned(), |s| format!("\"{s}\""));
    format!(
        r#"{{"event": "{}", "ref": "{}", "sender": {sender}, "data": {}}}"#,
        e.name, e.reference, e.data
    )
}

/// The daemon on the upgraded database: it sends exactly the pending
/// deliveries, old and new, and the events not dispatched yet, signed with
/// the subscribers' old secrets; delivered, dead and inactive ones are not
/// sent; every row ends as it should.
async fn deliver_and_check(
    t: &TestDb,
    db: &Client,
    versions: &[i32],
    ids: &BTreeMap<&'static str, Uuid>,
    rx: &mut Receiver,
) {
    let before = kept(db).await;
    let mut config = t.config();
    if versions.contains(&15) {
        // The entry the config subscriber came from, without its secret.
        let ops = crate::support::config_subscriber("reading.*", rx.url("/ops"));
        config.subscribers = Some(BTreeMap::from([("ops".to_owned(), ops)]));
    }
    let daemon = Daemon::start(config);

    let subs = subscribers(versions);
    let mut expected: Vec<(String, String, &Sub, &Ev)> = Vec::new();
    for e in BEFORE.iter().chain(&AFTER) {
        for s in subs.iter().filter(|s| e.to.contains(&s.name)) {
            expected.push((format!("/{}", s.name), body(e, s.content_type), s, e));
        }
    }
    expected.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let mut got = rx.expect(expected.len(), WAIT, QUIET).await;
    got.sort_by_key(|r| (r.path.clone(), r.text()));
    let arrived: Vec<(String, String)> = got.iter().map(|r| (r.path.clone(), r.text())).collect();
    let wanted: Vec<(String, String)> = expected
        .iter()
        .map(|(path, body, _, _)| (path.clone(), body.clone()))
        .collect();
    assert_eq!(arrived, wanted, "what arrived");

    let signed: Vec<(&str, &str, &[u8])> = got
        .iter()
        .zip(&expected)
        .filter(|(_, (_, _, s, _))| s.signer == "sign")
        .map(|(r, (_, _, s, _))| (s.digest, s.secret, &r.body[..]))
        .collect();
    let mut signatures = python_sign(&signed).into_iter();
    for (r, (_, _, s, e)) in got.iter().zip(&expected) {
        let signature = match s.signer {
            "compat" => python_compat_sign(s.digest, s.secret, &r.body),
            _ => signatures.next().expect("a signature"),
        };
        assert_eq!(r.header("hook-hmac"), signature, "{} to {}", e.name, s.name);
        standard_verify(s.secret, r);
        assert_eq!(r.header("hook-event"), e.name);
        assert_eq!(r.header("hook-subscription"), ids[s.name].to_string());
        assert_eq!(r.header("content-type"), s.content_type);
    }
    let retried = got
        .iter()
        .find(|r| r.path == "/alice" && r.text().contains(r#""title": "First!","#))
        .expect("the pending retry");
    assert_eq!(retried.header("hook-delivery"), D_RETRY.to_string());

    eventually(
        db,
        "SELECT NOT EXISTS (SELECT FROM thorn.delivery WHERE state = 'pending')
            AND NOT EXISTS (SELECT FROM thorn.event WHERE dispatched_at IS NULL)",
    )
    .await;
    let untouched = texts(
        db,
        &format!(
            "SELECT to_jsonb(d)::text FROM thorn.delivery d
             WHERE id IN ('{D_DELIVERED}', '{D_DEAD}') ORDER BY id"
        ),
    )
    .await;
    let old = &before.deliveries;
    assert_eq!(
        untouched,
        [old[0].clone(), old[2].clone()],
        "delivered, dead"
    );
    type Outcome = (i64, Uuid, String, i32, Option<String>);
    let mut outcomes: Vec<Outcome> = db
        .query(
            "SELECT event_id, subscriber_id, state, attempts, error_class FROM thorn.delivery",
            &[],
        )
        .await
        .expect("deliveries")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let mut want: Vec<Outcome> = vec![
        (1, ids["alice"], "delivered".into(), 1, None),
        (1, ids["off"], "dead".into(), 1, Some("inactive".into())),
        (2, ids["bob"], "dead".into(), 3, Some("http_status".into())),
    ];
    for (event_id, e) in (1..).zip(BEFORE.iter().chain(&AFTER)) {
        for s in subs.iter().filter(|s| e.to.contains(&s.name)) {
            // Event 3's delivery is the old retry: this was its second try.
            let attempts = if event_id == 3 { 2 } else { 1 };
            want.push((event_id, ids[s.name], "delivered".into(), attempts, None));
        }
    }
    outcomes.sort();
    want.sort();
    assert_eq!(outcomes, want, "how each delivery ended");

    // Subscribers keep their rows; the later columns hold their defaults,
    // but for the compat signer and the config subscriber's name.
    assert_eq!(kept(db).await.subscribers, before.subscribers);
    let mut later: Vec<String> = texts(
        db,
        "SELECT concat_ws(' ', id, hmac_signer, operator_off::text, coalesce(config_name, '-'),
                          (failing_since IS NULL)::text)
         FROM thorn.subscriber",
    )
    .await;
    let mut want: Vec<String> = subs
        .iter()
        .map(|s| {
            let config_name = if s.name == "ops" { "ops" } else { "-" };
            format!("{} {} false {config_name} true", ids[s.name], s.signer)
        })
        .collect();
    later.sort();
    want.sort();
    assert_eq!(later, want);
    if !versions.contains(&17) {
        // Schema 17 judges a secret only when it is set: a row with an old
        // whsec_ secret can still be switched off (as the daemon does).
        db.execute(
            "UPDATE thorn.subscriber SET active = false, deactivated_reason = 'gone'
             WHERE id = $1",
            &[&ids["bob"]],
        )
        .await
        .expect("switching off a subscriber with an old whsec_ secret");
    }
    daemon.stop().await;
}

async fn upgrade_from(versions: &[i32]) {
    let t = database_at(versions).await;
    let mut db = t.client().await;
    let mut rx = Receiver::start().await;
    let ids = seed(&db, versions, &rx).await;
    assert_eq!(
        outbox(&db, 0).await,
        described(1, &BEFORE),
        "captured before"
    );
    migrate_and_check(&mut db, versions).await;
    deliver_and_check(&t, &db, versions, &ids, &mut rx).await;
}

macro_rules! upgrades {
    ($($test:ident: $versions:expr,)*) => {$(
        #[tokio::test]
        async fn $test() {
            upgrade_from(&$versions).await;
        }
    )*};
}

// Every schema a release can have left: 1 to the one before the latest.
upgrades! {
    from_schema_1: [1],
    from_schema_2: [1, 2],
    from_schema_3: [1, 2, 3],
    from_schema_4: [1, 2, 3, 4],
    from_schema_5: [1, 2, 3, 4, 5],
    from_schema_6: [1, 2, 3, 4, 5, 6],
    from_schema_7: [1, 2, 3, 4, 5, 6, 7],
    from_schema_8: [1, 2, 3, 4, 5, 6, 7, 8],
    from_schema_9: [1, 2, 3, 4, 5, 6, 7, 8, 9],
    from_schema_10: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    from_schema_11: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    from_schema_12: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    from_schema_13: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    from_schema_14: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
    from_schema_15: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    from_schema_16: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    from_schema_17: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
    from_schema_18: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
    from_schema_19: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    from_schema_20: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    from_schema_21: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
    from_schema_22: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
    from_schema_23: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    from_schema_24: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
    from_schema_25: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25],
}

// The first migrations were numbered out of order (git log: 0005 came before
// 0004, which came before 0003), so early builds left these sets; migrate
// fills the gaps, running 3 and 4 after 5.
upgrades! {
    from_versions_1_2_5: [1, 2, 5],
    from_versions_1_2_4: [1, 2, 4],
    from_versions_1_2_4_5: [1, 2, 4, 5],
}

#[test]
fn every_earlier_schema_is_tried() {
    // A new migration makes the latest an earlier schema: add it above.
    assert_eq!(thorn::db::migrate::latest(), 26);
}

/// sql/roles.sql as it was when schema 6 was the latest (git show
/// 59a23d7:sql/roles.sql), which operators ran "once after thorn migrate".
const SCHEMA_6_DAEMON_GRANTS: &str = r#"
    GRANT USAGE ON SCHEMA thorn TO :"daemon";
    GRANT SELECT ON thorn.migration TO :"daemon";
    GRANT SELECT, UPDATE, DELETE ON thorn.event TO :"daemon";
    GRANT SELECT, INSERT, UPDATE, DELETE ON thorn.delivery TO :"daemon";
    GRANT SELECT ON thorn.subscriber TO :"daemon";
    GRANT UPDATE (active, deactivated_reason, failing_since) ON thorn.subscriber TO :"daemon";
    GRANT SELECT, UPDATE ON thorn.subscriber_version TO :"daemon";"#;

// Schema 7 made the dispatcher call thorn.advance_outbox_horizon() (revoked
// from PUBLIC) and read thorn.outbox_horizon, and nothing granted them to a
// daemon role set up before it: after the upgrade it was refused every
// dispatch. Schema 20 gives the daemon's grants to the roles that have them.
#[tokio::test]
async fn a_least_privilege_daemon_set_up_at_schema_6_still_delivers_after_the_upgrade() {
    let t = database_at(&[1, 2, 3, 4, 5, 6]).await;
    let mut admin = t.client().await;
    let role = Role::create(&t).await;
    admin
        .batch_execute(&SCHEMA_6_DAEMON_GRANTS.replace(":\"daemon\"", &role.name))
        .await
        .expect("the daemon's grants at schema 6");
    admin
        .batch_execute(
            "CREATE TABLE public.article (id serial PRIMARY KEY, title text NOT NULL);
             SELECT thorn.webhook_model('public.article');",
        )
        .await
        .expect("annotated table");
    let mut rx = Receiver::start().await;
    subscribe(&admin, "article.*", &rx.url("/"), None, "secret").await;
    thorn::db::migrate::migrate(&mut admin)
        .await
        .expect("the operator migrates");

    let missing: Vec<String> = texts(
        &admin,
        &format!(
            "SELECT p FROM (VALUES
                 ('EXECUTE thorn.advance_outbox_horizon()',
                  has_function_privilege('{0}', 'thorn.advance_outbox_horizon()', 'EXECUTE')),
                 ('SELECT thorn.outbox_horizon',
                  has_table_privilege('{0}', 'thorn.outbox_horizon', 'SELECT'))) AS v(p, has)
             WHERE NOT has",
            role.name
        ),
    )
    .await;
    assert_eq!(
        missing,
        Vec::<String>::new(),
        "what the daemon role lacks after the upgrade"
    );
    let mut config = t.config();
    config.database_url.0 = role.url();
    let daemon = Daemon::start(config);
    admin
        .batch_execute("INSERT INTO article (title) VALUES ('after the upgrade')")
        .await
        .expect("insert");
    let got = rx.expect(1, Duration::from_secs(5), QUIET).await;
    assert_eq!(got[0].header("hook-event"), "article.created");
    daemon.stop().await;
}

/// Databases migrated before sql/0015 set its flag in the function's body
/// have the sync function with a SET clause; schema 23 gives them the
/// text that 0015 makes now, and the sync keeps working and guarding.
#[tokio::test]
async fn a_sync_function_with_the_old_set_clause_is_rewritten() {
    let versions: Vec<i32> = (1..=22).collect();
    let t = database_at(&versions).await;
    let mut db = t.client().await;
    let source = || async {
        texts(
            &t.client().await,
            "SELECT prosrc || ' ' || coalesce(array_to_string(proconfig, ';'), '') FROM pg_proc
             WHERE oid = 'thorn.sync_config_subscribers(jsonb)'::regprocedure",
        )
        .await
    };
    let current = source().await;
    // The function as schema 15 made it before: the flag in a SET clause.
    let def: String = db
        .query_one(
            "SELECT pg_get_functiondef('thorn.sync_config_subscribers(jsonb)'::regprocedure)",
            &[],
        )
        .await
        .expect("def")
        .get(0);
    let block = def
        .find("    -- The flag the triggers trust")
        .zip(def.find("    PERFORM set_config('thorn.config_sync', 'on', true);\n"))
        .expect("the body's flag");
    let old = format!(
        "{}{}",
        &def[..block.0],
        &def[block.1 + "    PERFORM set_config('thorn.config_sync', 'on', true);\n".len()..]
    )
    .replace(
        "    flag_before CONSTANT text := current_setting('thorn.config_sync', true);\n",
        "",
    )
    .replace(
        "    PERFORM set_config('thorn.config_sync', coalesce(flag_before, ''), true);\n",
        "",
    )
    .replace(
        " SET search_path TO 'pg_catalog', 'pg_temp'\n",
        " SET search_path TO 'pg_catalog', 'pg_temp'\n SET \"thorn.config_sync\" TO 'on'\n",
    );
    db.batch_execute(&old).await.expect("the old function");
    assert_ne!(source().await, current);

    thorn::db::migrate::migrate(&mut db).await.expect("migrate");
    assert_eq!(source().await, current, "the text sql/0015 makes now");
    crate::support::config_sync_writes_and_guards(&db).await;
}
