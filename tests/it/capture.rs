//! Capture: what the generated triggers write to the outbox.

use serde_json::json;
use tokio_postgres::Client;

use crate::support::TestDb;

const ARTICLE: &str = "CREATE TABLE public.article (
    id serial PRIMARY KEY, title text NOT NULL, state text NOT NULL DEFAULT 'draft',
    author text, password_hash text)";

/// (name, ref, sender, data) of every event, in order.
async fn events(db: &Client) -> Vec<(String, Option<String>, Option<String>, serde_json::Value)> {
    db.query(
        "SELECT name, ref, sender, data FROM thorn.event ORDER BY id",
        &[],
    )
    .await
    .expect("events")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

async fn names(db: &Client) -> Vec<String> {
    events(db).await.into_iter().map(|e| e.0).collect()
}

#[tokio::test]
async fn default_event_names_for_create_change_delete() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article');
         INSERT INTO article (title) VALUES ('a');
         UPDATE article SET title = 'b';
         DELETE FROM article;",
    )
    .await
    .expect("writes");
    assert_eq!(
        names(&db).await,
        ["article.created", "article.changed", "article.removed"]
    );
}

#[tokio::test]
async fn model_name_and_null_disables_an_event() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article', model => 'post', on_change => NULL,
                                    on_delete => 'post.gone');
         INSERT INTO article (title) VALUES ('a');
         UPDATE article SET title = 'b';
         DELETE FROM article;",
    )
    .await
    .expect("writes");
    assert_eq!(names(&db).await, ["post.created", "post.gone"]);
    let model: (String, Option<String>) = db
        .query_one("SELECT model, on_change FROM thorn.model", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("model row");
    assert_eq!(model, ("post".to_owned(), None));
}

#[tokio::test]
async fn custom_conditional_event() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article', on_create => NULL, on_change => NULL, on_delete => NULL);
         SELECT thorn.webhook_event('public.article', 'article.published', fires_on => 'change',
             condition => $$NEW.state = 'published' AND OLD.state IS DISTINCT FROM 'published'$$);
         SELECT thorn.webhook_event('public.article', 'article.drafted', fires_on => 'create',
             condition => $$new.state = 'draft'$$);
         INSERT INTO article (title) VALUES ('a'), ('b');
         INSERT INTO article (title, state) VALUES ('c', 'published');
         UPDATE article SET state = 'published' WHERE title = 'a';
         UPDATE article SET title = 'a2' WHERE title = 'a';",
    )
    .await
    .expect("writes");
    let got = events(&db).await;
    let summary: Vec<(&str, &str)> = got
        .iter()
        .map(|e| (e.0.as_str(), e.3["title"].as_str().expect("title")))
        .collect();
    assert_eq!(
        summary,
        [
            ("article.drafted", "a"),
            ("article.drafted", "b"),
            ("article.published", "a")
        ]
    );
}

#[tokio::test]
async fn watch_limits_change_events_and_no_op_updates_emit_nothing() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article', on_create => NULL, watch => ARRAY['state']);
         INSERT INTO article (title) VALUES ('a'), ('b');
         UPDATE article SET title = 'changed';            -- not watched
         UPDATE article SET state = state;                -- no change at all
         UPDATE article SET state = 'x' WHERE title = 'nothing matches';
         UPDATE article SET state = 'published' WHERE id = 1;",
    )
    .await
    .expect("writes");
    let got = events(&db).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].3["state"], "published");

    // Without watch, any column counts, but an identical row does not.
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article', on_create => NULL);
         UPDATE article SET title = title;
         UPDATE article SET title = 'again' WHERE id = 2;",
    )
    .await
    .expect("writes");
    assert_eq!(events(&db).await.len(), 2);
}

/// Old and new rows pair up by position, so an UPDATE of the key itself
/// is judged against the row it was: no event when nothing watched
/// changed, the right OLD for a condition, and rows whose keys move onto
/// each other each compared with their own old values.
#[tokio::test]
async fn updates_that_change_keys_pair_each_row_with_its_old_self() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "CREATE TABLE item (id int PRIMARY KEY DEFERRABLE, title text, state text);
         SELECT thorn.webhook_model('public.item', watch => ARRAY['title']);
         SELECT thorn.webhook_event('public.item', 'item.published', fires_on => 'change',
             condition => $$NEW.state = 'published' AND OLD.state IS DISTINCT FROM 'published'$$);
         INSERT INTO item VALUES (1, 'one', 'published'), (11, 'x', 'draft'), (2, 'y', 'draft');
         DELETE FROM thorn.event;",
    )
    .await
    .expect("table");

    // The key changes, nothing watched does, and it was published before.
    db.batch_execute("UPDATE item SET id = 5 WHERE id = 1")
        .await
        .expect("key change");
    assert!(names(&db).await.is_empty(), "{:?}", events(&db).await);

    // 11 becomes 2 and 2 becomes 3: both titles change.
    db.batch_execute(
        "UPDATE item SET id = CASE id WHEN 11 THEN 2 ELSE 3 END,
                         title = CASE id WHEN 11 THEN 'y' ELSE 'z' END
         WHERE id IN (11, 2)",
    )
    .await
    .expect("keys moved onto each other");
    let mut changed: Vec<(i64, String)> = events(&db)
        .await
        .iter()
        .map(|e| {
            assert_eq!(e.0, "item.changed");
            (
                e.3["id"].as_i64().expect("id"),
                e.3["title"].as_str().expect("title").to_owned(),
            )
        })
        .collect();
    changed.sort();
    assert_eq!(changed, [(2, "y".to_owned()), (3, "z".to_owned())]);

    // A condition over OLD sees the row's own old values after a key change.
    db.batch_execute(
        "DELETE FROM thorn.event;
         UPDATE item SET id = 20, state = 'published' WHERE id = 2;
         UPDATE item SET id = 21, state = 'published' WHERE id = 5;",
    )
    .await
    .expect("publish");
    assert_eq!(names(&db).await, ["item.published"]);
}

/// A row moved to another partition by a key change is still paired with
/// its old self (PostgreSQL adds its old and new versions to the parent's
/// transition tables as the delete and insert of the move).
#[tokio::test]
async fn a_row_moved_to_another_partition_is_paired_with_its_old_self() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "CREATE TABLE part (id int PRIMARY KEY, title text) PARTITION BY RANGE (id);
         CREATE TABLE part_low PARTITION OF part FOR VALUES FROM (0) TO (100);
         CREATE TABLE part_high PARTITION OF part FOR VALUES FROM (100) TO (200);
         SELECT thorn.webhook_model('public.part', watch => ARRAY['title']);
         INSERT INTO part VALUES (1, 'a'), (2, 'b'), (150, 'c');
         DELETE FROM thorn.event;
         UPDATE part SET id = id + 100 WHERE id < 3;",
    )
    .await
    .expect("moved without a title change");
    assert!(names(&db).await.is_empty(), "{:?}", events(&db).await);
    db.batch_execute("UPDATE part SET id = id - 100, title = title || '!' WHERE id = 101")
        .await
        .expect("moved back with a title change");
    let got = events(&db).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].3, json!({"id": 1, "title": "a!"}));
}

/// Without `watch`, a change is a change to what the event carries (data,
/// ref, sender): an UPDATE of an excluded column alone sends nothing (its
/// event would only tell that the hidden column changed), one of the sender
/// column does even when the payload leaves it out.
#[tokio::test]
async fn changes_to_columns_never_sent_emit_nothing() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article', sender_field => 'author',
                                    columns => ARRAY['id', 'title', 'password_hash'],
                                    exclude => ARRAY['password_hash']);
         INSERT INTO article (title, author, password_hash) VALUES ('a', 'alice', 'h1');
         UPDATE article SET password_hash = 'h2';
         UPDATE article SET state = 'published';
         UPDATE article SET author = 'bob';
         UPDATE article SET title = 'b';",
    )
    .await
    .expect("writes");
    let got = events(&db).await;
    let summary: Vec<(&str, Option<&str>, serde_json::Value)> = got
        .iter()
        .map(|e| (e.0.as_str(), e.2.as_deref(), e.3.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (
                "article.created",
                Some("alice"),
                json!({"id": 1, "title": "a"})
            ),
            (
                "article.changed",
                Some("bob"),
                json!({"id": 1, "title": "a"})
            ),
            (
                "article.changed",
                Some("bob"),
                json!({"id": 1, "title": "b"})
            ),
        ]
    );
}

#[tokio::test]
async fn columns_exclude_reference_and_sender_also_on_delete() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article', sender_field => 'author',
             reference => '/article/{id}/{state}', exclude => ARRAY['password_hash']);
         INSERT INTO article (title, author, password_hash) VALUES ('Hello', 'alice', 'secret');
         DELETE FROM article;",
    )
    .await
    .expect("writes");
    let got = events(&db).await;
    assert_eq!(got.len(), 2);
    for (name, reference, sender, data) in &got {
        assert_eq!(reference.as_deref(), Some("/article/1/draft"), "{name}");
        assert_eq!(sender.as_deref(), Some("alice"), "{name}");
        assert_eq!(
            *data,
            json!({"id": 1, "title": "Hello", "state": "draft", "author": "alice"}),
            "{name}"
        );
    }

    db.batch_execute(
        "SELECT thorn.webhook_model('public.article', columns => ARRAY['id', 'title', 'password_hash'],
             exclude => ARRAY['password_hash']);
         INSERT INTO article (title, password_hash) VALUES ('B', 'secret');",
    )
    .await
    .expect("writes");
    let last = events(&db).await.pop().expect("event");
    assert_eq!(last.3, json!({"id": 2, "title": "B"}));
    assert_eq!((last.1, last.2), (None, None));
}

#[tokio::test]
async fn rolled_back_transactions_emit_nothing() {
    let t = TestDb::new().await;
    let mut db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute("SELECT thorn.webhook_model('public.article')")
        .await
        .expect("annotate");
    let tx = db.transaction().await.expect("tx");
    tx.batch_execute("INSERT INTO article (title) VALUES ('never')")
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");
    assert!(events(&db).await.is_empty());
}

#[tokio::test]
async fn ten_thousand_rows_in_one_statement() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article');
         INSERT INTO article (title) SELECT 't' || i FROM generate_series(1, 10000) AS i;
         UPDATE article SET state = 'published';",
    )
    .await
    .expect("writes");
    let counts: Vec<(String, i64)> = db
        .query(
            "SELECT name, count(*) FROM thorn.event GROUP BY name ORDER BY name",
            &[],
        )
        .await
        .expect("counts")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        counts,
        [
            ("article.changed".to_owned(), 10_000),
            ("article.created".to_owned(), 10_000)
        ]
    );
}

#[tokio::test]
async fn bad_annotations_fail_at_once_with_clear_errors() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "CREATE TABLE nokey (a int, b text);
         CREATE TABLE reserved (id int PRIMARY KEY, thorn__n int)",
    )
    .await
    .expect("tables");
    let cases = [
        (
            "SELECT thorn.webhook_model('public.reserved')",
            "thorn__n, which thorn reserves",
        ),
        (
            "SELECT thorn.webhook_model('public.nope')",
            "does not exist",
        ),
        (
            "SELECT thorn.webhook_model('public.article', sender_field => 'who')",
            "sender_field",
        ),
        (
            "SELECT thorn.webhook_model('public.article', reference => '/a/{nope}/')",
            "reference",
        ),
        (
            "SELECT thorn.webhook_model('public.article', exclude => ARRAY['x'])",
            "exclude",
        ),
        (
            "SELECT thorn.webhook_model('public.article', watch => ARRAY['x'])",
            "watch",
        ),
        (
            "SELECT thorn.webhook_model('public.article', on_create => 'bad name')",
            "on_create",
        ),
        (
            "SELECT thorn.webhook_event('public.article', 'a.b', 'change', 'true')",
            "not annotated",
        ),
    ];
    for (sql, expected) in cases {
        let error = db.batch_execute(sql).await.expect_err(sql);
        let message = error
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(message.contains(expected), "{sql}: {message}");
    }
    db.batch_execute("SELECT thorn.webhook_model('public.nokey')")
        .await
        .expect("a table without a key can have every event");
    db.batch_execute("SELECT thorn.webhook_model('public.article')")
        .await
        .expect("annotate");
    for (sql, expected) in [
        (
            "SELECT thorn.webhook_event('public.article', 'a.b', 'change', 'new.nope = 1')",
            "do not compile",
        ),
        (
            "SELECT thorn.webhook_event('public.article', 'a.b', 'create', 'old.id = 1')",
            "do not compile",
        ),
        (
            "SELECT thorn.webhook_event('public.article', 'a.b', 'sometimes', 'true')",
            "fires_on",
        ),
    ] {
        let error = db.batch_execute(sql).await.expect_err(sql);
        let message = error
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(message.contains(expected), "{sql}: {message}");
    }
    // The failed calls left the table writable and captured as before.
    db.batch_execute("INSERT INTO article (title) VALUES ('still fine')")
        .await
        .expect("write");
    assert_eq!(names(&db).await, ["article.created"]);
}

#[tokio::test]
async fn unwebhook_model_removes_the_triggers() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article');
         SELECT thorn.unwebhook_model('public.article');
         INSERT INTO article (title) VALUES ('quiet');",
    )
    .await
    .expect("writes");
    assert!(events(&db).await.is_empty());
    let models: i64 = db
        .query_one("SELECT count(*) FROM thorn.model", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(models, 0);
}

#[tokio::test]
async fn migrate_twice_is_harmless() {
    let t = TestDb::new().await;
    let mut db = t.client().await;
    let again = thorn::db::migrate::migrate(&mut db)
        .await
        .expect("second migrate");
    assert!(again.is_empty());
    assert_eq!(
        thorn::db::migrate::current_version(&db)
            .await
            .expect("version"),
        thorn::db::migrate::latest()
    );
}

#[tokio::test]
async fn subscriber_rows_are_validated_and_normalised() {
    let t = TestDb::new().await;
    let db = t.client().await;
    let row = db
        .query_one(
            "INSERT INTO thorn.subscriber (event, url, hmac_digest) VALUES ('a.*', 'https://e.com/h', 'SHA512')
             RETURNING hmac_digest, hmac_secret, active",
            &[],
        )
        .await
        .expect("insert");
    let (digest, secret, active): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(digest, "sha512");
    assert_eq!(secret.chars().count(), 64);
    assert!(!secret.contains('"') && !secret.contains('\''));
    assert!(active);
    for (values, column) in [
        ("('a..b', 'https://e.com/')", "event"),
        ("('a.**', 'https://e.com/')", "event"),
        ("('a b', 'https://e.com/')", "event"),
        ("('a.*', 'ftp://e.com/')", "url"),
        ("('a.*', 'e.com/hook')", "url"),
        ("('a.*', 'https:// e.com/')", "url"),
    ] {
        let sql = format!("INSERT INTO thorn.subscriber (event, url) VALUES {values}");
        let error = db.batch_execute(&sql).await.expect_err(&sql);
        let message = error
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(
            message.contains(&format!("thorn.subscriber.{column}")),
            "{sql}: {message}"
        );
    }
    let error = db
        .batch_execute("INSERT INTO thorn.subscriber (event, url, hmac_digest) VALUES ('a', 'https://e.com', 'md5')")
        .await
        .expect_err("md5");
    assert!(error
        .as_db_error()
        .expect("db error")
        .message()
        .contains("hmac_digest"));
}

/// A `whsec_` secret is Standard Webhooks' base64 of the key: one that is
/// not (so receivers' libraries would refuse every signature) is refused
/// when written; one written before stays usable.
#[tokio::test]
async fn whsec_secrets_must_hold_base64() {
    let t = TestDb::new().await;
    let db = t.client().await;
    let insert = |secret: &'static str| {
        let db = &db;
        async move {
            db.execute(
                "INSERT INTO thorn.subscriber (event, url, hmac_secret) VALUES ('a.*', 'https://e.com/', $1)",
                &[&secret],
            )
            .await
        }
    };
    for good in [
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_YQ==",
        "whsec_YWI=",
        "not-whsec_at-all!",
    ] {
        insert(good).await.expect(good);
    }
    for bad in [
        "whsec_!!!notbase64",
        "whsec_YR==",
        "whsec_YWJ=",
        "whsec_YQ",
        "whsec_",
    ] {
        let error = insert(bad).await.expect_err(bad);
        let message = error.as_db_error().map(|e| e.message()).unwrap_or_default();
        assert!(
            message.contains("thorn.subscriber.hmac_secret") && message.contains("base64"),
            "{bad}: {message}"
        );
    }
    // Written before the rule (the trigger bypassed here), it is not judged
    // again until it changes: the daemon can still switch it off.
    db.batch_execute(
        "SET session_replication_role = replica;
         INSERT INTO thorn.subscriber (event, url, hmac_secret) VALUES ('old', 'https://e.com/', 'whsec_!!!');
         RESET session_replication_role;
         UPDATE thorn.subscriber SET active = false WHERE event = 'old';",
    )
    .await
    .expect("an old row stays writable");
    // Nor by the API's and the CLI's validation, while the secret is kept.
    let id: uuid::Uuid = db
        .query_one("SELECT id FROM thorn.subscriber WHERE event = 'old'", &[])
        .await
        .expect("old row")
        .get(0);
    let old = thorn::db::subscribers::get(&db, id, None)
        .await
        .expect("get")
        .expect("the old row");
    let switch_on = thorn::db::subscribers::Changes {
        active: Some(true),
        url: Some("https://e.com/new".into()),
        ..Default::default()
    };
    let found = thorn::db::subscribers::problems(&db, Some(&old), &switch_on)
        .await
        .expect("problems");
    assert!(found.is_empty(), "{found:?}");
    let error = db
        .batch_execute("UPDATE thorn.subscriber SET hmac_secret = 'whsec_!!?' WHERE event = 'old'")
        .await
        .expect_err("a new bad secret");
    assert!(format!("{error:?}").contains("base64"), "{error:?}");
}

/// A client whose server notices (RAISE WARNING …) arrive on a channel.
async fn client_with_notices(t: &TestDb) -> (Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(&t.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notice(notice) = message {
                let _ = tx.send(notice.message().to_owned());
            }
        }
    });
    (client, rx)
}

/// The tables of thorn.model, in name order.
async fn annotated(db: &Client) -> Vec<(String, String)> {
    db.query(
        "SELECT table_name::text, model FROM thorn.model ORDER BY 1",
        &[],
    )
    .await
    .expect("thorn.model")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test]
async fn a_partition_tree_follows_the_annotation_of_its_parent() {
    let t = TestDb::new().await;
    let (db, mut notices) = client_with_notices(&t).await;
    db.batch_execute(
        "CREATE TABLE part (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
         CREATE TABLE part1 PARTITION OF part FOR VALUES FROM (0) TO (10);
         CREATE TABLE part2 PARTITION OF part FOR VALUES FROM (10) TO (30) PARTITION BY RANGE (k);
         CREATE TABLE part2a PARTITION OF part2 FOR VALUES FROM (10) TO (20);
         SELECT thorn.webhook_model('part', reference => '/part/{id}/');
         SELECT thorn.webhook_event('part', 'part.moved', fires_on => 'change',
                                    condition => 'new.v = ''moved''');",
    )
    .await
    .expect("annotate the parent");
    assert_eq!(notices.try_recv().ok(), None, "a tree annotated whole");
    let tree = |names: &[&str]| -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (n.to_string(), "part".to_string()))
            .collect()
    };
    assert_eq!(
        annotated(&db).await,
        tree(&["part", "part1", "part2", "part2a"])
    );

    // Partitions created or attached later follow too (an event trigger:
    // the tests run as a superuser); one attached with its own annotation
    // keeps it.
    db.batch_execute(
        "CREATE TABLE part2b PARTITION OF part2 FOR VALUES FROM (20) TO (30);
         CREATE TABLE part3 (LIKE part INCLUDING ALL);
         ALTER TABLE part ATTACH PARTITION part3 FOR VALUES FROM (30) TO (40);
         CREATE TABLE part4 (LIKE part INCLUDING ALL);
         SELECT thorn.webhook_model('part4', model => 'own');
         ALTER TABLE part ATTACH PARTITION part4 FOR VALUES FROM (40) TO (50);",
    )
    .await
    .expect("new partitions");
    let mut want = tree(&["part", "part1", "part2", "part2a", "part2b", "part3"]);
    want.push(("part4".into(), "own".into()));
    want.sort();
    assert_eq!(annotated(&db).await, want);
    assert_eq!(notices.try_recv().ok(), None, "nothing missing");

    // Each statement is captured once, whichever table it names, with the
    // parent's custom event too.
    db.batch_execute(
        "INSERT INTO part VALUES (1, 1, 'through the parent');
         INSERT INTO part2b VALUES (2, 21, 'into a partition');
         INSERT INTO part VALUES (3, 35, 'into an attached one');
         UPDATE part2b SET v = 'moved';
         UPDATE part SET v = 'changed through the parent' WHERE id = 1;
         DELETE FROM part3;",
    )
    .await
    .expect("writes");
    let got: Vec<(String, Option<String>, serde_json::Value)> = events(&db)
        .await
        .into_iter()
        .map(|e| (e.0, e.1, e.3["v"].clone()))
        .collect();
    let event =
        |name: &str, id: i32, v: &str| (name.to_string(), Some(format!("/part/{id}/")), json!(v));
    assert_eq!(
        got,
        vec![
            event("part.created", 1, "through the parent"),
            event("part.created", 2, "into a partition"),
            event("part.created", 3, "into an attached one"),
            event("part.changed", 2, "moved"),
            event("part.moved", 2, "moved"),
            event("part.changed", 1, "changed through the parent"),
            event("part.removed", 3, "into an attached one"),
        ]
    );

    // Removing the parent's custom event, then its annotation, reaches the
    // whole tree.
    db.batch_execute("SELECT thorn.unwebhook_event('part', 'part.moved')")
        .await
        .expect("remove the custom event");
    let left: i64 = db
        .query_one("SELECT count(*) FROM thorn.model_event", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "no partition keeps the custom event");
    db.batch_execute("SELECT thorn.unwebhook_model('part')")
        .await
        .expect("remove the annotation");
    assert_eq!(annotated(&db).await, vec![]);
    let triggers: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'thorn_capture_%'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(triggers, 0, "every capture trigger of the tree is gone");
}

#[tokio::test]
async fn a_partition_annotated_alone_is_warned_about() {
    let t = TestDb::new().await;
    let (db, mut notices) = client_with_notices(&t).await;
    db.batch_execute(
        "CREATE TABLE other (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
         CREATE TABLE other1 PARTITION OF other FOR VALUES FROM (0) TO (10);
         SELECT thorn.webhook_model('other1');",
    )
    .await
    .expect("annotate a partition");
    let warning = notices.try_recv().expect("a warning about the parent");
    assert!(warning.contains("not captured: public.other"), "{warning}");
    // The daemon says so when it starts.
    let daemon = crate::process::Process::run(&crate::resilience::config(&t, ""));
    daemon
        .wait_for_log("not captured", crate::support::WAIT)
        .await;
    assert!(daemon.log().contains("public.other"), "{}", daemon.log());
    drop(daemon);
    let status = thorn::cli::status::collect(&db).await.expect("status");
    assert_eq!(status.uncaptured_partitions, vec!["public.other"]);
    assert!(
        status
            .to_string()
            .contains("partitions not captured (annotate their parent again): public.other"),
        "{status}"
    );

    // Annotating the parent brings the tree whole.
    db.batch_execute("SELECT thorn.webhook_model('other')")
        .await
        .expect("annotate the parent");
    let status = thorn::cli::status::collect(&db).await.expect("status");
    assert!(status.uncaptured_partitions.is_empty(), "{status}");
}
