//! Hostile input: subscriber rows, annotation calls, DDL after annotation.
//! Unusual rows are in rows.rs.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::support::{subscribe, TestDb};

fn db_message(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|e| format!("{} (column {:?})", e.message(), e.column()))
        .unwrap_or_else(|| error.to_string())
}

#[tokio::test]
async fn bad_subscriber_rows_are_refused_naming_the_column() {
    let t = TestDb::new().await;
    let db = t.client().await;
    let long_event = format!("a.{}", "b".repeat(254));
    let cases: Vec<(String, String, String, &str, &str, &str)> = [
        // (event, url, secret, digest, content_type, column)
        (
            "",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            "a..b",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            ".a",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            "a.",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            "a.**",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            "**",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            "a*",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            "a b",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            "a.\tb",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            " a",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            "a\u{1}b",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        (
            &long_event,
            "https://e.com/",
            "secret",
            "sha256",
            "application/json",
            "event",
        ),
        ("a", "", "secret", "sha256", "application/json", "url"),
        (
            "a",
            "e.com/hook",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "//e.com/hook",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "ftp://e.com/",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "file:///etc/passwd",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "javascript:alert(1)",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "gopher://e.com:70/",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "http://",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "http:///path",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "http://:80/",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "http:e.com",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "https:// e.com/",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "https://e.com/a b",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "https://e.com/\n",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "https://e.com:99999/",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "https://e.com:0/",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "https://e.com:abc/",
            "secret",
            "sha256",
            "application/json",
            "url",
        ),
        (
            "a",
            "https://e.com/",
            "secret",
            "md5",
            "application/json",
            "hmac_digest",
        ),
        (
            "a",
            "https://e.com/",
            "secret",
            "sha-256",
            "application/json",
            "hmac_digest",
        ),
        (
            "a",
            "https://e.com/",
            "secret",
            "",
            "application/json",
            "hmac_digest",
        ),
        (
            "a",
            "https://e.com/",
            "secret",
            "sha256",
            "text/plain",
            "content_type",
        ),
        (
            "a",
            "https://e.com/",
            "secret",
            "sha256",
            "application/json; charset=utf-8",
            "content_type",
        ),
        (
            "a",
            "https://e.com/",
            "secret",
            "sha256",
            "",
            "content_type",
        ),
        (
            "a",
            "https://e.com/",
            "",
            "sha256",
            "application/json",
            "hmac_secret",
        ),
    ]
    .iter()
    .map(|(e, u, s, d, c, col)| (e.to_string(), u.to_string(), s.to_string(), *d, *c, *col))
    .collect();
    for (event, url, secret, digest, content_type, column) in &cases {
        let error = db
            .execute(
                "INSERT INTO thorn.subscriber (event, url, hmac_secret, hmac_digest, content_type)
                 VALUES ($1, $2, $3, $4, $5)",
                &[event, url, secret, digest, content_type],
            )
            .await
            .expect_err(&format!(
                "{event:?} {url:?} {secret:?} {digest:?} {content_type:?}"
            ));
        let message = db_message(&error);
        assert!(
            message.contains(&format!("thorn.subscriber.{column}"))
                && message.contains(&format!("Some(\"{column}\")")),
            "{event:?} {url:?}: {message}"
        );
    }
    // NULLs are refused the same way.
    for (sql, column) in [
        ("INSERT INTO thorn.subscriber (event, url) VALUES (NULL, 'https://e.com/')", "event"),
        ("INSERT INTO thorn.subscriber (event, url) VALUES ('a', NULL)", "url"),
        ("INSERT INTO thorn.subscriber (event, url, hmac_secret) VALUES ('a', 'https://e.com/', NULL)", "hmac_secret"),
    ] {
        let message = db_message(&db.batch_execute(sql).await.expect_err(sql));
        assert!(message.contains(&format!("thorn.subscriber.{column}")), "{sql}: {message}");
    }
    // Updates are checked like inserts.
    let id = subscribe(&db, "a.*", "https://e.com/", None, "secret").await;
    let error = db
        .execute(
            "UPDATE thorn.subscriber SET url = 'ftp://e.com/' WHERE id = $1",
            &[&id],
        )
        .await
        .expect_err("bad update");
    assert!(db_message(&error).contains("thorn.subscriber.url"));

    // What is accepted: Thorn's 6-character example secret, digests and
    // content types in any case (stored lower-case), every pattern form,
    // event names up to 255 characters, IPv6 literals, userinfo, ports.
    let ok_event = format!("a.{}", "b".repeat(253));
    for (event, url, digest, content_type) in [
        ("*", "https://e.com", "SHA256", "Application/JSON"),
        (
            "article.*",
            "http://e.com:8080/h?x=1#f",
            "Sha1",
            "APPLICATION/X-WWW-FORM-URLENCODED",
        ),
        (
            "*.created",
            "https://[2001:db8::1]:443/",
            "sha224",
            "application/json",
        ),
        ("a.*.c", "https://u:p@e.com/", "SHA384", "application/json"),
        (
            ok_event.as_str(),
            "https://xn--bcher-kva.example/",
            "sHa512",
            "application/json",
        ),
        (
            "émoji.✓",
            "https://e.com/ünïcode",
            "sha256",
            "application/json",
        ),
    ] {
        let row = db
            .query_one(
                "INSERT INTO thorn.subscriber (event, url, hmac_secret, hmac_digest, content_type)
                 VALUES ($1, $2, 'secret', $3, $4) RETURNING hmac_digest, content_type",
                &[&event, &url, &digest, &content_type],
            )
            .await
            .unwrap_or_else(|e| panic!("{event} {url}: {}", db_message(&e)));
        let (d, c): (String, String) = (row.get(0), row.get(1));
        assert_eq!(d, digest.to_lowercase());
        assert_eq!(c, content_type.to_lowercase());
    }
}

#[tokio::test]
async fn default_secrets_are_64_uniform_characters_of_thorns_alphabet() {
    let t = TestDb::new().await;
    let db = t.client().await;
    let secrets: Vec<String> = db
        .query(
            "SELECT thorn.random_secret() FROM generate_series(1, 1000)",
            &[],
        )
        .await
        .expect("secrets")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let alphabet: Vec<char> = ('A'..='Z')
        .chain('a'..='z')
        .chain('0'..='9')
        .chain("!#$%&()*+,-./:;<=>?@[\\]^_`{|}~".chars())
        .collect();
    assert_eq!(alphabet.len(), 92);
    let mut counts: HashMap<char, usize> = HashMap::new();
    for s in &secrets {
        assert_eq!(s.chars().count(), 64);
        for c in s.chars() {
            assert!(alphabet.contains(&c), "{c:?} is not in the alphabet");
            *counts.entry(c).or_default() += 1;
        }
    }
    let distinct: std::collections::HashSet<&String> = secrets.iter().collect();
    assert_eq!(distinct.len(), secrets.len());
    // 64,000 draws over 92 symbols: about 696 each, σ ≈ 26. A biased
    // mapping (a plain modulo) would skew the first symbols by ~20%.
    assert_eq!(counts.len(), 92);
    for (c, n) in &counts {
        assert!((540..=850).contains(n), "{c:?} drawn {n} times");
    }
    // The column default uses it.
    let secret: String = db
        .query_one(
            "INSERT INTO thorn.subscriber (event, url) VALUES ('a', 'https://e.com/') RETURNING hmac_secret",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    assert_eq!(secret.chars().count(), 64);
}

const ARTICLE: &str = "CREATE TABLE public.article (
    id serial PRIMARY KEY, title text NOT NULL, state text NOT NULL DEFAULT 'draft',
    author text, secret text)";

async fn event_names(db: &Client) -> Vec<String> {
    db.query("SELECT name FROM thorn.event ORDER BY id", &[])
        .await
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn hostile_annotation_calls_fail_at_once_and_never_break_writes() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute("CREATE VIEW article_view AS SELECT * FROM article")
        .await
        .expect("view");
    let cases = [
        (
            "SELECT thorn.webhook_model('public.nope')",
            "does not exist",
        ),
        (
            "SELECT thorn.webhook_model('public.article_view')",
            "is not a table",
        ),
        (
            "SELECT thorn.webhook_model('thorn.subscriber')",
            "schema thorn",
        ),
        (
            "SELECT thorn.webhook_model('public.article', sender_field => 'nope')",
            "sender_field",
        ),
        (
            "SELECT thorn.webhook_model('public.article', reference => '/a/{nope}/')",
            "reference",
        ),
        (
            "SELECT thorn.webhook_model('public.article', columns => ARRAY['id', 'nope'])",
            "columns",
        ),
        (
            "SELECT thorn.webhook_model('public.article', columns => ARRAY[NULL])",
            "columns",
        ),
        (
            "SELECT thorn.webhook_model('public.article', exclude => ARRAY['nope'])",
            "exclude",
        ),
        (
            "SELECT thorn.webhook_model('public.article', watch => ARRAY['nope'])",
            "watch",
        ),
        (
            "SELECT thorn.webhook_model('public.article', watch => ARRAY[]::text[])",
            "watch",
        ),
        (
            "SELECT thorn.webhook_model('public.article', model => 'a b')",
            "model",
        ),
        (
            "SELECT thorn.webhook_model('public.article', on_change => 'a..b')",
            "on_change",
        ),
        (
            "SELECT thorn.webhook_model('public.article', on_delete => '*')",
            "on_delete",
        ),
    ];
    for (sql, expected) in cases {
        let message = db_message(&db.batch_execute(sql).await.expect_err(sql));
        assert!(message.contains(expected), "{sql}: {message}");
    }
    db.batch_execute("SELECT thorn.webhook_model('public.article')")
        .await
        .expect("annotate");
    let conditions = [
        ("change", "new.nope = 1", "do not compile"),
        ("change", "new.title = ", "do not compile"),
        ("change", "new.title", "do not compile"),
        ("create", "old.id = 1", "do not compile"),
        ("delete", "new.id = 1", "do not compile"),
        (
            "change",
            "true)) AS ev(name, fire); DROP TABLE article; --",
            "do not compile",
        ),
        ("change", "$thorn_capture$", "thorn_capture"),
        ("change", "", "condition"),
        ("sometimes", "true", "fires_on"),
    ];
    for (fires_on, condition, expected) in conditions {
        let error = db
            .execute(
                "SELECT thorn.webhook_event('public.article', 'article.custom', $1, $2)",
                &[&fires_on, &condition],
            )
            .await
            .expect_err(condition);
        let message = db_message(&error);
        assert!(message.contains(expected), "{condition}: {message}");
        if condition == "new.title" {
            let hint = error.as_db_error().and_then(|e| e.hint()).unwrap_or("");
            assert!(hint.contains("boolean"), "{condition}: {hint}");
        }
    }
    // After all of that the table is intact, writable and captured.
    db.batch_execute("INSERT INTO article (title) VALUES ('still fine')")
        .await
        .expect("write");
    assert_eq!(event_names(&db).await, ["article.created"]);

    // A second annotation replaces the first: one set of triggers, new names.
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article', model => 'post', on_delete => NULL)",
    )
    .await
    .expect("re-annotate");
    let triggers: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.article'::regclass",
            &[],
        )
        .await
        .expect("triggers")
        .get(0);
    assert_eq!(triggers, 2, "create and change, no delete");
    db.batch_execute("UPDATE article SET title = 'x'; DELETE FROM article;")
        .await
        .expect("writes");
    assert_eq!(event_names(&db).await, ["article.created", "post.changed"]);
}

#[tokio::test]
async fn a_table_without_a_primary_key_gets_every_event() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "CREATE TABLE log (at timestamptz DEFAULT now(), line text);
         SELECT thorn.webhook_model('public.log', watch => ARRAY['line']);
         SELECT thorn.webhook_event('public.log', 'log.fixed', 'change',
             $$OLD.line = 'typo' AND NEW.line <> 'typo'$$);
         INSERT INTO log (line) VALUES ('a'), ('typo'), ('a');
         UPDATE log SET line = 'b' WHERE line = 'a';
         UPDATE log SET at = at;
         UPDATE log SET line = 'c';
         DELETE FROM log;",
    )
    .await
    .expect("change events need no key: rows pair by position");
    let mut changes = event_names(&db).await;
    changes.sort();
    assert_eq!(
        changes,
        [
            ["log.changed"; 5].as_slice(),
            &["log.created"; 3],
            &["log.fixed"],
            &["log.removed"; 3]
        ]
        .concat()
    );
}

#[tokio::test]
async fn ddl_after_annotation_keeps_writes_working_or_is_refused() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article', sender_field => 'author',
             reference => '/a/{id}/', exclude => ARRAY['secret'], watch => ARRAY['title', 'state']);
         SELECT thorn.webhook_event('public.article', 'article.published', 'change',
             $$new.state = 'published' AND old.state IS DISTINCT FROM 'published'$$);",
    )
    .await
    .expect("annotate");

    // Renaming the table: the triggers follow it, and so does thorn.model.
    db.batch_execute(
        "ALTER TABLE article RENAME TO post;
         INSERT INTO post (title, author) VALUES ('a', 'al');",
    )
    .await
    .expect("rename the table");
    let shown: String = db
        .query_one("SELECT table_name::text FROM thorn.model", &[])
        .await
        .expect("model")
        .get(0);
    assert_eq!(shown, "post");

    // Columns the annotation does not name may change freely.
    db.batch_execute(
        "ALTER TABLE post ADD COLUMN extra int DEFAULT 7;
         ALTER TABLE post RENAME COLUMN extra TO more;
         ALTER TABLE post DROP COLUMN more;
         UPDATE post SET state = 'published';",
    )
    .await
    .expect("unrelated DDL and writes");

    // Changes that would break the annotation are refused, saying why; the
    // exclude case matters most: a renamed secret column would be sent.
    for (ddl, names) in [
        ("ALTER TABLE post RENAME COLUMN secret TO pw", "exclude"),
        ("ALTER TABLE post DROP COLUMN secret", "exclude"),
        (
            "ALTER TABLE post RENAME COLUMN author TO writer",
            "sender_field",
        ),
        ("ALTER TABLE post DROP COLUMN title", "watch"),
        ("ALTER TABLE post RENAME COLUMN state TO status", "watch"),
    ] {
        let message = db_message(&db.batch_execute(ddl).await.expect_err(ddl));
        assert!(
            message.contains("would break its webhook annotation") && message.contains(names),
            "{ddl}: {message}"
        );
    }
    // The way through: change the annotation and the table together.
    db.batch_execute(
        "BEGIN;
         SELECT thorn.unwebhook_event('public.post', 'article.published');
         SELECT thorn.webhook_model('public.post', model => 'article', sender_field => 'author',
             reference => '/a/{id}/', exclude => ARRAY['secret'], watch => ARRAY['title']);
         ALTER TABLE post RENAME COLUMN state TO status;
         COMMIT;
         UPDATE post SET title = 'b';",
    )
    .await
    .expect("annotation and table changed together");
    assert_eq!(
        event_names(&db).await,
        [
            "article.created",
            "article.changed",
            "article.published",
            "article.changed"
        ]
    );

    // Dropping the table forgets its annotation and capture functions.
    db.batch_execute("DROP TABLE post").await.expect("drop");
    let (models, functions): (i64, i64) = db
        .query_one(
            "SELECT (SELECT count(*) FROM thorn.model),
                    (SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture\\_%'
                       AND pronamespace = 'thorn'::regnamespace)",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("counts");
    assert_eq!((models, functions), (0, 0));
    // A new table of the same name can be annotated.
    db.batch_execute(&format!(
        "{ARTICLE}; SELECT thorn.webhook_model('public.article');
         INSERT INTO article (title) VALUES ('again');"
    ))
    .await
    .expect("re-create");
}

// Columns also change under other names than ALTER TABLE: ALTER VIEW …
// RENAME COLUMN works on tables, and DROP DOMAIN … CASCADE drops columns.
// And a table under INHERITS is not followed by its capture.
#[tokio::test]
async fn ddl_that_reaches_an_annotated_table_by_other_commands_is_refused_too() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "CREATE DOMAIN secret_text AS text;
         CREATE TABLE article (id serial PRIMARY KEY, title text, secret secret_text);
         SELECT thorn.webhook_model('public.article', exclude => ARRAY['secret']);",
    )
    .await
    .expect("annotate");
    for (ddl, says) in [
        (
            "ALTER VIEW article RENAME COLUMN secret TO pw",
            "exclude names unknown column",
        ),
        (
            "ALTER MATERIALIZED VIEW article RENAME COLUMN secret TO pw",
            "exclude names unknown column",
        ),
        (
            "DROP DOMAIN secret_text CASCADE",
            "exclude names unknown column",
        ),
        (
            "CREATE TABLE child () INHERITS (article)",
            "inheritance hierarchy",
        ),
    ] {
        let message = db_message(&db.batch_execute(ddl).await.expect_err(ddl));
        assert!(
            message.contains("would break its webhook annotation") && message.contains(says),
            "{ddl}: {message}"
        );
    }
    db.batch_execute("INSERT INTO article (title, secret) VALUES ('a', 's3cret')")
        .await
        .expect("a write");
    let data: String = db
        .query_one("SELECT data::text FROM thorn.event", &[])
        .await
        .expect("the event")
        .get(0);
    assert_eq!(data, r#"{"id": 1, "title": "a"}"#);

    // Annotating a table of an inheritance hierarchy is refused; partitions
    // are followed as before.
    db.batch_execute(
        "CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE heir (id int PRIMARY KEY) INHERITS (parent);",
    )
    .await
    .expect("hierarchy");
    for table in ["parent", "heir"] {
        let error = db
            .batch_execute(&format!("SELECT thorn.webhook_model('public.{table}')"))
            .await
            .expect_err(table);
        assert!(
            db_message(&error).contains("inheritance hierarchy"),
            "{table}: {}",
            db_message(&error)
        );
    }
    db.batch_execute(
        "CREATE TABLE tree (id int PRIMARY KEY) PARTITION BY RANGE (id);
         SELECT thorn.webhook_model('public.tree');
         CREATE TABLE leaf PARTITION OF tree FOR VALUES FROM (0) TO (10);
         INSERT INTO tree VALUES (1);",
    )
    .await
    .expect("partitions");
    let names: i64 = db
        .query_one(
            "SELECT count(*) FROM thorn.event WHERE name = 'tree.created'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(names, 1);
}

#[tokio::test]
async fn a_condition_that_fails_at_run_time_aborts_the_write_loudly() {
    // Documented choice: an error inside the capture trigger aborts the
    // application's statement (the outbox promise is "committed change →
    // event"), so the write is never committed without its event.
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(ARTICLE).await.expect("table");
    db.batch_execute(
        "SELECT thorn.webhook_model('public.article');
         SELECT thorn.webhook_event('public.article', 'article.odd', 'create',
             'new.title::int % 2 = 1');",
    )
    .await
    .expect("compiles");
    db.batch_execute("INSERT INTO article (title) VALUES ('3')")
        .await
        .expect("fine");
    let error = db
        .batch_execute("INSERT INTO article (title) VALUES ('not a number')")
        .await
        .expect_err("the condition fails");
    assert!(db_message(&error).contains("invalid input syntax"));
    let rows: i64 = db
        .query_one("SELECT count(*) FROM article", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 1, "the failed write is rolled back, not half-done");
    assert_eq!(event_names(&db).await, ["article.created", "article.odd"]);
}
