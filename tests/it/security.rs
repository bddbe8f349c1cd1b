//! The address guard, URL rules, secrets and least privilege, end to end
//! against real servers on loopback. What a receiver can do to a delivery
//! (redirects, TLS, response bounds) is in receivers.rs.

use std::time::Duration;

use crate::support::{
    article_table, captured_logs, eventually, subscribe, wait_ended, write_article, Daemon,
    Receiver, TestDb, QUIET, WAIT,
};

/// Names from /etc/hosts (never edited here) that resolve to loopback.
async fn loopback_names() -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    for name in ["runsc", "vm", "localhost.localdomain", "ip6-localhost"] {
        if let Ok(Ok(addrs)) =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host((name, 80))).await
        {
            let addrs: Vec<_> = addrs.collect();
            if !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()) {
                names.push(name.to_owned());
            }
        }
    }
    names
}

#[tokio::test]
async fn hostile_urls_never_reach_a_loopback_receiver() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    let p = rx.addr.port();
    let mut urls: Vec<String> = [
        "http://127.0.0.1:{p}/",
        "http://127.0.0.1.:{p}/",
        "http://2130706433:{p}/",
        "http://0x7f000001:{p}/",
        "http://0x7F.0x0.0x0.0x1:{p}/",
        "http://0177.0.0.1:{p}/",
        "http://017700000001:{p}/",
        "http://127.1:{p}/",
        "http://127.0.1:{p}/",
        "http://0x7f.1:{p}/",
        "http://%31%32%37.0.0.1:{p}/",
        "http://\u{ff11}\u{ff12}\u{ff17}.\u{ff10}.\u{ff10}.\u{ff11}:{p}/",
        "http://0.0.0.0:{p}/",
        "http://0:{p}/",
        "http://[::1]:{p}/",
        "http://[::]:{p}/",
        "http://[0:0:0:0:0:0:0:1]:{p}/",
        "http://[::ffff:127.0.0.1]:{p}/",
        "http://[::ffff:7f00:1]:{p}/",
        "http://[::127.0.0.1]:{p}/",
        "http://[64:ff9b::127.0.0.1]:{p}/",
        "http://[2002:7f00:1::1]:{p}/",
        "http://user:pw@127.0.0.1:{p}/",
        "https://127.0.0.1:{p}/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://10.0.0.1:{p}/",
        "http://192.168.0.1/",
        "http://100.64.0.1/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://\u{24db}ocalhost:{p}/",
        "http://LOCALHOST:{p}/",
        "http://localhost.:{p}/",
        "http://hooks.localhost:{p}/",
    ]
    .iter()
    .map(|u| u.replace("{p}", &p.to_string()))
    .collect();
    for name in loopback_names().await {
        urls.push(format!("http://{name}:{p}/"));
        urls.push(format!("http://{name}:{p}/?via=name"));
    }
    for url in &urls {
        subscribe(&db, "article.*", url, None, "secret").await;
    }
    let mut config = t.config();
    config.security = Default::default();
    let daemon = Daemon::start(config);
    write_article(&db).await;

    let ended = wait_ended(&db, urls.len(), WAIT).await;
    assert_eq!(ended.len(), urls.len());
    for e in &ended {
        assert_eq!(
            (e.state.as_str(), e.class.as_deref(), e.attempts),
            ("dead", Some("blocked"), 1),
            "{e:#?}"
        );
        let error = e.error.as_deref().unwrap_or("");
        assert!(!error.contains("pw"), "{error}");
    }
    assert!(
        rx.next(QUIET).await.is_none(),
        "nothing may reach the receiver"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn https_only_and_allowed_ports_refuse_before_connecting() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    let mut other = Receiver::start().await;
    subscribe(&db, "article.*", &rx.url("/a"), None, "secret").await;
    subscribe(&db, "article.*", &other.url("/b"), None, "secret").await;

    // Only the first receiver's port is allowed.
    let mut config = t.config();
    config.security.allowed_ports = vec![rx.addr.port()];
    let daemon = Daemon::start(config);
    write_article(&db).await;
    let ended = wait_ended(&db, 2, WAIT).await;
    daemon.stop().await;
    let by_path = |path: &str| {
        ended
            .iter()
            .find(|e| e.url.ends_with(path))
            .cloned()
            .expect("row")
    };
    assert_eq!(by_path("/a").state, "delivered");
    let b = by_path("/b");
    assert_eq!(
        (b.state.as_str(), b.class.as_deref(), b.attempts),
        ("dead", Some("blocked"), 1)
    );
    assert!(b
        .error
        .as_deref()
        .unwrap_or("")
        .contains("security.allowed_ports"));
    rx.expect(1, WAIT, QUIET).await;
    assert!(other.next(QUIET).await.is_none());

    // https_only: plain http is refused even to an allowed network.
    db.batch_execute("DELETE FROM thorn.delivery; DELETE FROM thorn.event")
        .await
        .expect("clean");
    let mut config = t.config();
    config.security.https_only = true;
    let daemon = Daemon::start(config);
    write_article(&db).await;
    let ended = wait_ended(&db, 2, WAIT).await;
    daemon.stop().await;
    for e in &ended {
        assert_eq!(
            (e.state.as_str(), e.class.as_deref(), e.attempts),
            ("dead", Some("blocked"), 1),
            "{e:#?}"
        );
        assert!(e.error.as_deref().unwrap_or("").contains("https_only"));
    }
    assert!(rx.next(QUIET).await.is_none());
    assert!(other.next(QUIET).await.is_none());
}

#[tokio::test]
async fn secrets_stay_out_of_logs_errors_and_debug_output() {
    const SECRET: &str = "hmac-canary-7d1c9e";
    const URL_PASSWORD: &str = "url-canary-51ab";
    const URL_TOKEN: &str = "query-canary-93fe";
    const DB_PASSWORD: &str = "db-canary-44c0";
    let logs = captured_logs();

    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let rx = Receiver::start().await;
    rx.respond_with(&[500, 500, 500]);
    // Failing in every way a delivery can: an HTTP error, a blocked address,
    // a refused connection, a failed lookup.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    for url in [
        format!("http://u:{URL_PASSWORD}@{}/h?token={URL_TOKEN}", rx.addr),
        format!("http://u:{URL_PASSWORD}@10.1.2.3/h?token={URL_TOKEN}"),
        format!("http://u:{URL_PASSWORD}@127.0.0.1:{closed}/h?token={URL_TOKEN}"),
        format!("http://u:{URL_PASSWORD}@no-such-host.invalid/h?token={URL_TOKEN}"),
    ] {
        subscribe(&db, "article.*", &url, None, SECRET).await;
    }
    let mut config = t.config();
    config.database_url.0 = config
        .database_url
        .0
        .replace("postgres@", &format!("postgres:{DB_PASSWORD}@"));
    let debug = format!("{config:?}");
    assert!(!debug.contains(DB_PASSWORD), "{debug}");
    let kv = thorn::config::DatabaseUrl(format!("host=h user=u password={DB_PASSWORD}"));
    assert!(!format!("{kv:?}").contains(DB_PASSWORD));

    let daemon = Daemon::start(config);
    write_article(&db).await;
    let ended = wait_ended(&db, 4, WAIT).await;
    daemon.stop().await;
    let classes: Vec<_> = ended
        .iter()
        .map(|e| e.class.clone().unwrap_or_default())
        .collect();
    for class in ["http_status", "blocked", "connect", "dns"] {
        assert!(classes.iter().any(|c| c == class), "{classes:?}");
    }
    let stored: String = ended
        .iter()
        .map(|e| format!("{:?}{:?}", e.error, e.response))
        .collect();
    let logged = logs.text();
    assert!(logged.contains("delivery failed"), "the capture works");
    for canary in [SECRET, URL_PASSWORD, URL_TOKEN] {
        assert!(!stored.contains(canary), "{canary} in {stored}");
        assert!(!logged.contains(canary), "{canary} in the logs");
    }
    assert!(!logged.contains(DB_PASSWORD));

    // A claimed delivery's Debug output hides its secret.
    let claimed = thorn::db::queue::Claimed {
        id: uuid::Uuid::new_v4(),
        attempts: 0,
        event_id: 1,
        event: "a.b".into(),
        reference: None,
        sender: None,
        data: "{}".into(),
        subscriber_id: uuid::Uuid::new_v4(),
        url: "https://e.com/".into(),
        secret: thorn::sign::Secret(SECRET.into()),
        digest: "sha256".into(),
        content_type: "application/json".into(),
        active: true,
        ordered: false,
        signer: "sign".into(),
        event_age: std::time::Duration::ZERO,
        claimed_at: std::time::Instant::now(),
        lease: std::time::SystemTime::now(),
    };
    assert!(!format!("{claimed:?}").contains(SECRET));
}

/// A role name of its own for one test: roles belong to the whole server,
/// and tests run in parallel.
fn role_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The test database's URL, logging in as `role` (trust auth: no password).
fn url_as(url: &str, role: &str) -> String {
    let mut u = url::Url::parse(url).expect("url");
    let _ = u.set_username(role);
    let _ = u.set_password(None);
    u.to_string()
}

#[tokio::test]
async fn least_privilege_daemon_and_application_roles() {
    let t = TestDb::new().await;
    let admin = t.client().await;
    let daemon_role = role_name("thorn_daemon");
    let app_role = role_name("thorn_app");
    let grants = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/roles.sql"))
        .expect("sql/roles.sql")
        .replace(":'daemon'", &format!("'{daemon_role}'"));
    admin
        .batch_execute(&format!(
            "CREATE ROLE {daemon_role} LOGIN; CREATE ROLE {app_role} LOGIN;
             CREATE TABLE public.article (id serial PRIMARY KEY, title text NOT NULL);
             SELECT thorn.webhook_model('public.article');
             GRANT USAGE ON SCHEMA public TO {app_role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.article TO {app_role};
             GRANT USAGE ON SEQUENCE public.article_id_seq TO {app_role};"
        ))
        .await
        .expect("roles");
    let result = async {
        admin
            .batch_execute(&grants)
            .await
            .expect("sql/roles.sql applies");
        let mut rx = Receiver::start().await;
        subscribe(&admin, "article.*", &rx.url("/"), None, "secret").await;
        let app = crate::support::connect(&url_as(&t.url, &app_role)).await;
        let no_rights: bool = app
            .query_one(
                "SELECT NOT has_schema_privilege(current_user, 'thorn', 'USAGE')
                        AND NOT has_schema_privilege(current_user, 'thorn', 'CREATE')",
                &[],
            )
            .await
            .expect("privileges")
            .get(0);
        assert!(
            no_rights,
            "the application role has no rights on schema thorn"
        );
        assert!(app
            .batch_execute("SELECT * FROM thorn.event")
            .await
            .is_err());

        let mut config = t.config();
        config.database_url.0 = url_as(&t.url, &daemon_role);
        // It may write its config's subscribers (and, below, no others).
        config.subscribers = Some(std::collections::BTreeMap::from([(
            "ops".to_owned(),
            crate::support::config_subscriber("nothing.matches", rx.url("/ops")),
        )]));
        let daemon = Daemon::start(config);
        eventually(
            &admin,
            "SELECT count(*) = 1 FROM thorn.subscriber WHERE config_name = 'ops'",
        )
        .await;
        app.batch_execute(
            "INSERT INTO article (title) VALUES ('a');
             UPDATE article SET title = 'b';
             DELETE FROM article;",
        )
        .await
        .expect("the application writes the annotated table");
        let got = rx.expect(3, WAIT, QUIET).await;
        let events: Vec<String> = got
            .iter()
            .map(|r| r.header("hook-event").to_owned())
            .collect();
        assert_eq!(events.len(), 3);
        for e in ["article.created", "article.changed", "article.removed"] {
            assert!(events.iter().any(|x| x == e), "{events:?}");
        }
        let ended = wait_ended(&admin, 3, WAIT).await;
        assert!(ended.iter().all(|e| e.state == "delivered"), "{ended:#?}");
        // The daemon's role cannot change the schema or read application data.
        let daemon_db = crate::support::connect(&url_as(&t.url, &daemon_role)).await;
        assert!(daemon_db
            .batch_execute("CREATE TABLE thorn.x (a int)")
            .await
            .is_err());
        assert!(daemon_db
            .batch_execute("SELECT * FROM public.article")
            .await
            .is_err());
        assert!(daemon_db
            .batch_execute(
                "INSERT INTO thorn.subscriber (event, url) VALUES ('a', 'https://e.com/')"
            )
            .await
            .is_err());
        drop(daemon_db);
        drop(app);
        daemon.stop().await;
    };
    result.await;
    for role in [&daemon_role, &app_role] {
        let _ = admin
            .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
            .await;
    }
}

// Capture functions run as the schema owner; a writer must not be able to
// make them call its own code by putting look-alike functions, operators or
// types first on its search_path.
#[tokio::test]
async fn a_writer_search_path_cannot_hijack_the_capture_triggers() {
    let t = TestDb::new().await;
    let admin = t.client().await;
    let app_role = role_name("thorn_hijack");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {app_role} LOGIN;
             DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO {app_role}', current_database()); END $$;
             CREATE TABLE public.article (id serial PRIMARY KEY, title text NOT NULL,
                                          author text, secret text);
             SELECT thorn.webhook_model('public.article', sender_field => 'author',
                                        reference => '/article/{{id}}/', exclude => ARRAY['secret']);
             GRANT USAGE ON SCHEMA public TO {app_role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.article TO {app_role};
             GRANT USAGE ON SEQUENCE public.article_id_seq TO {app_role};"
        ))
        .await
        .expect("set-up");
    let result = async {
        let app = crate::support::connect(&url_as(&t.url, &app_role)).await;
        // Exact-type matches beat pg_catalog's polymorphic and variadic
        // originals, and the writer puts its schema first.
        app.batch_execute(
            r#"CREATE SCHEMA evil;
               CREATE FUNCTION evil.concat(text, text, text) RETURNS text
                   LANGUAGE sql AS $$ SELECT 'hijacked' $$;
               CREATE FUNCTION evil.to_jsonb(public.article) RETURNS jsonb
                   LANGUAGE sql AS $$ SELECT '{"hijacked": true}'::jsonb $$;
               CREATE FUNCTION evil.field(jsonb, text) RETURNS text
                   LANGUAGE sql AS $$ SELECT 'hijacked' $$;
               CREATE OPERATOR evil.->> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = evil.field);
               CREATE FUNCTION evil.minus(jsonb, text[]) RETURNS jsonb
                   LANGUAGE sql AS $$ SELECT '{"hijacked": true}'::jsonb $$;
               CREATE OPERATOR evil.- (LEFTARG = jsonb, RIGHTARG = text[], FUNCTION = evil.minus);
               CREATE FUNCTION evil.jsonb_eq(jsonb, jsonb) RETURNS boolean
                   LANGUAGE sql AS $$ SELECT false $$;
               CREATE FUNCTION evil.get(jsonb, text) RETURNS jsonb
                   LANGUAGE sql AS $$ SELECT '"hijacked"'::jsonb $$;
               CREATE OPERATOR evil.-> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = evil.get);
               CREATE FUNCTION evil.never(jsonb, jsonb) RETURNS boolean
                   LANGUAGE sql AS $$ SELECT false $$;
               CREATE OPERATOR evil.= (LEFTARG = jsonb, RIGHTARG = jsonb, FUNCTION = evil.never);
               CREATE FUNCTION evil.pg_try_advisory_xact_lock_shared(integer, integer) RETURNS boolean
                   LANGUAGE sql AS $$ SELECT true $$;
               SET search_path = evil, pg_catalog, public;
               INSERT INTO article (title, author, secret) VALUES ('a', 'alice', 's3cret');
               UPDATE article SET title = 'b';
               UPDATE article SET title = 'b';
               DELETE FROM article;"#,
        )
        .await
        .expect("the writer's statements");
        let rows = admin
            .query(
                "SELECT name, ref, sender, data::text FROM thorn.event ORDER BY id",
                &[],
            )
            .await
            .expect("events");
        let events: Vec<(String, Option<String>, Option<String>, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        // The second UPDATE changed nothing: no event. A hijacked jsonb_eq,
        // or a hijacked -> or = in the pairing of old and new rows on the
        // key (unpaired rows count as changed), would have made one.
        let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["article.created", "article.changed", "article.removed"],
            "{events:#?}"
        );
        for (_, reference, sender, data) in &events {
            assert_eq!(reference.as_deref(), Some("/article/1/"), "{events:#?}");
            assert_eq!(sender.as_deref(), Some("alice"), "{events:#?}");
            assert!(
                !data.contains("hijacked") && !data.contains("s3cret"),
                "{data}"
            );
            assert!(data.contains(r#""author": "alice""#), "{data}");
        }
    };
    result.await;
    let _ = admin
        .batch_execute(&format!("DROP OWNED BY {app_role}; DROP ROLE {app_role}"))
        .await;
}

// to_jsonb renders a user-defined type through its cast to json, and the
// capture runs as the schema owner: the owner of an annotated table, with
// no right on schema thorn, must not get its own cast function run there.
#[tokio::test]
async fn a_table_owner_cannot_run_a_cast_to_json_as_the_schema_owner() {
    let t = TestDb::new().await;
    let admin = t.client().await;
    let app_role = role_name("thorn_cast");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {app_role} LOGIN;
             GRANT CREATE, USAGE ON SCHEMA public TO {app_role};
             CREATE TABLE public.note (id int PRIMARY KEY, body text);
             ALTER TABLE public.note OWNER TO {app_role};
             SELECT thorn.webhook_model('public.note');"
        ))
        .await
        .expect("set-up");
    let result = async {
        let app = crate::support::connect(&url_as(&t.url, &app_role)).await;
        // Were the cast ever called by a capture, it would run as the owner
        // of schema thorn (here a superuser) and make the role one.
        app.batch_execute(&format!(
            "CREATE TYPE mood AS ENUM ('ok');
             CREATE TYPE tone AS ENUM ('ok');
             CREATE FUNCTION escalate(anyenum) RETURNS json LANGUAGE plpgsql AS $$
             BEGIN EXECUTE 'ALTER ROLE {app_role} SUPERUSER'; RETURN '1'; END $$;
             CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE sql AS $$ SELECT escalate($1) $$;
             CREATE FUNCTION tone_json(tone) RETURNS json LANGUAGE sql AS $$ SELECT escalate($1) $$;
             ALTER TABLE note ADD COLUMN m mood[];
             CREATE CAST (tone AS json) WITH FUNCTION tone_json(tone);"
        ))
        .await
        .expect("types, functions, a column and a cast nothing captured uses");
        for ddl in [
            // the column first, then its type's cast
            "CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood)",
            // the cast first, then a column of its type, here in a domain
            "CREATE DOMAIN t AS tone; ALTER TABLE note ADD COLUMN t t",
        ] {
            let error = app.batch_execute(ddl).await.expect_err(ddl);
            let message = error.as_db_error().expect("refused").message().to_owned();
            assert!(message.contains("cast to json"), "{ddl}: {message}");
        }
        app.batch_execute("INSERT INTO note (id, body, m) VALUES (1, 'hi', '{ok}')")
            .await
            .expect("a write");
        let superuser: bool = admin
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = $1",
                &[&app_role],
            )
            .await
            .expect("role")
            .get(0);
        assert!(!superuser, "the cast ran as the schema owner");
        // A table that already reaches such a cast is refused at annotation.
        admin
            .batch_execute("CREATE TABLE public.other (id int PRIMARY KEY, t tone)")
            .await
            .expect("table");
        let error = admin
            .batch_execute("SELECT thorn.webhook_model('public.other')")
            .await
            .expect_err("annotating a table that reaches a cast to json");
        let message = error.as_db_error().expect("refused").message().to_owned();
        assert!(message.contains("cast to json (public.tone)"), "{message}");
    };
    result.await;
    admin
        .batch_execute(&format!(
            "DROP TABLE public.other; DROP CAST (public.tone AS json);
             DROP OWNED BY {app_role}; DROP ROLE {app_role}"
        ))
        .await
        .expect("cleanup");
}

/// A schema owner that is not a superuser (a managed database's
/// administrator role, say) migrates a new database: on PostgreSQL 15 that
/// failed at schema 15, whose function stored a custom parameter in a SET
/// clause, which only a superuser may do. Without a superuser there is no
/// DDL guard (event triggers need one); the config's sync works and guards
/// its rows all the same.
#[tokio::test]
async fn a_schema_owner_that_is_not_a_superuser_can_migrate() {
    let t = TestDb::empty().await;
    let admin = t.client().await;
    let owner = crate::support::Role::create(&t).await;
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO {0}', current_database()); END $$;
             GRANT CREATE ON SCHEMA public TO {0}",
            owner.name
        ))
        .await
        .expect("the owner's rights");

    let (code, out, err) = crate::support::thorn_cli(&owner.url(), &["migrate"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("applied migrations"), "{out}");
    let guard: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'thorn\\_%'",
            &[],
        )
        .await
        .expect("pg_event_trigger")
        .get(0);
    assert_eq!(guard, 0);

    let app = crate::support::connect(&owner.url()).await;
    app.batch_execute(
        "CREATE TABLE public.article (id serial PRIMARY KEY, title text, secret text);
         SELECT thorn.webhook_model('public.article', exclude => ARRAY['secret']);
         INSERT INTO public.article (title, secret) VALUES ('a', 's');",
    )
    .await
    .expect("annotated and written by its owner");
    let events: i64 = app
        .query_one("SELECT count(*) FROM thorn.event", &[])
        .await
        .expect("events")
        .get(0);
    assert_eq!(events, 1);
    // Schema 15's sync, made by this role, works and guards its rows.
    crate::support::config_sync_writes_and_guards(&app).await;
}
