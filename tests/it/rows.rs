//! Unusual rows, end to end: every common column type rendered exactly as
//! to_jsonb renders it, `json` holding \u0000, 1,500 columns, 5 MB.

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_postgres::Client;

use crate::support::{
    assert_signed, subscribe, wait_ended, Daemon, RawServer, Receiver, TestDb, QUIET, WAIT,
};

/// What PostgreSQL's to_jsonb renders for the single row of zoo.
async fn rendered(db: &Client) -> String {
    db.query_one("SELECT to_jsonb(z)::text FROM zoo z", &[])
        .await
        .expect("to_jsonb")
        .get(0)
}

/// The `data` member of a JSON envelope, as raw text.
fn raw_data(body: &[u8]) -> String {
    let text = String::from_utf8(body.to_vec()).expect("UTF-8 body");
    let start = text.find("\"data\": ").expect("data") + "\"data\": ".len();
    text[start..text.len() - 1].to_owned()
}

#[tokio::test]
async fn every_common_column_type_arrives_exactly_as_to_jsonb_renders_it() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        r#"CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy 😀');
           CREATE DOMAIN positive AS numeric CHECK (VALUE > 0);
           CREATE TYPE point3 AS (x float8, y float8, label text);
           CREATE TABLE zoo (
               id bigint PRIMARY KEY,
               n numeric, big bigint, small smallint, i int, r real, d float8,
               money_ numeric(20, 4), b boolean,
               ts timestamptz, tsz timestamp, day date, t time, tz timetz, iv interval,
               bytes bytea, u uuid, ints int[], texts text[], nested int[][],
               j json, jb jsonb, m mood, pos positive, p point3, ip inet, net cidr,
               mac macaddr, bits bit varying(8), rng int4range, x xml, c char(3),
               vc varchar(10), txt text, nothing text, "Odd ""Name""" text,
               -- Names that collide with what the capture query uses inside
               -- (regression: a column named t once replaced the row).
               "new" int, "old" int, ev int, name text, fire boolean, thorn__t int);
           SELECT thorn.webhook_model('public.zoo');"#,
    )
    .await
    .expect("table");
    let mut rx = Receiver::start().await;
    subscribe(&db, "zoo.*", &rx.url("/"), None, "secret").await;
    let daemon = Daemon::start(t.config());
    // The writer's session renders timestamptz in its own time zone.
    db.batch_execute("SET TIME ZONE 'Asia/Kathmandu'")
        .await
        .expect("tz");
    db.batch_execute(
        r#"INSERT INTO zoo VALUES (
               9007199254740993,
               12345678901234567890.12345678901234567890, 9223372036854775807, -32768,
               -2147483648, 3.4028235e38, 'NaN', 12.3400, true,
               '2024-02-29 23:59:59.999999+14', '0001-01-01 00:00:00', '2000-01-01',
               '24:00:00', '12:00+05:45', '1 year 2 mons -3 days 04:05:06.789',
               '\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
               '{1,NULL,3}', '{"a\"b","","NULL",null,"ü"}', '{{1,2},{3,4}}',
               '{"b": 1, "a": [1.0, 2e3], "a": "dup"}', '{"z": 0.10, "y": {"x": null}}',
               'happy 😀', 0.000001, '(1.5,-0,"la ""bel""")', '::ffff:1.2.3.4', '10.0.0.0/8',
               '08:00:2b:01:02:03', B'1010', '[1,10)', '<a>&amp;</a>', 'ab',
               E'tab\tnl\n', 'Ünïcödé ✓ 🦀 𝕏, \u0000 as text, \\ and " too', NULL, 'q')"#,
    )
    .await
    .unwrap_or_else(|e| panic!("{}", thorn::db::Why(&e)));
    let mut expected = vec![rendered(&db).await];
    db.batch_execute(
        "UPDATE zoo SET txt = repeat('wide ', 20000), ints = ARRAY(SELECT generate_series(1, 5000))",
    )
    .await
    .expect("update");
    expected.push(rendered(&db).await);
    expected.push(expected[1].clone());
    db.batch_execute("DELETE FROM zoo").await.expect("delete");

    let got = rx.expect(3, WAIT, QUIET).await;
    let mut bodies: Vec<(String, String)> = got
        .iter()
        .map(|r| (r.header("hook-event").to_owned(), raw_data(&r.body)))
        .collect();
    bodies.sort_by_key(|(event, _)| {
        ["zoo.created", "zoo.changed", "zoo.removed"]
            .iter()
            .position(|e| e == event)
    });
    for ((event, body), want) in bodies.iter().zip(&expected) {
        // Value by value first (for a readable failure), then byte for byte.
        let got: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
        let want_map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(want).expect("JSON");
        assert_eq!(got.len(), want_map.len(), "{event}");
        for (key, value) in &want_map {
            assert_eq!(got.get(key), Some(value), "{event}: column {key}");
        }
        assert_eq!(body, want, "{event}: to_jsonb's text, unchanged");
    }
    let created: serde_json::Value = serde_json::from_str(&bodies[0].1).expect("JSON");
    for (key, literal) in [
        ("id", "9007199254740993"),
        ("n", "12345678901234567890.12345678901234567890"),
        ("big", "9223372036854775807"),
        ("money_", "12.3400"),
        ("d", "\"NaN\""),
        ("ts", "\"2024-02-29T15:44:59.999999+05:45\""),
        ("tsz", "\"0001-01-01T00:00:00\""),
        ("iv", "\"1 year 2 mons -3 days +04:05:06.789\""),
        ("bytes", "\"\\\\x00ff10\""),
        ("ints", "[1, null, 3]"),
        ("nested", "[[1, 2], [3, 4]]"),
        ("jb", "{\"y\": {\"x\": null}, \"z\": 0.10}"),
        ("m", "\"happy 😀\""),
        ("pos", "0.000001"),
        ("nothing", "null"),
    ] {
        assert!(
            bodies[0].1.contains(&format!("\"{key}\": {literal}")),
            "{key}: expected {literal} in {}",
            bodies[0].1
        );
    }
    assert!(created["txt"].as_str().is_some_and(|s| s.contains("🦀 𝕏")));
    assert_eq!(created["Odd \"Name\""], "q");
    assert_eq!(created["p"]["label"], "la \"bel\"");
    let changed: serde_json::Value = serde_json::from_str(&bodies[1].1).expect("JSON");
    assert_eq!(changed["txt"].as_str().map(str::len), Some(100_000));
    assert_eq!(changed["ints"].as_array().map(Vec::len), Some(5000));
    daemon.stop().await;
}

/// (name, data) of every event, in order.
async fn events(db: &Client) -> Vec<(String, serde_json::Value)> {
    let rows = db.query("SELECT name, data FROM thorn.event ORDER BY id", &[]);
    let rows = rows.await.expect("events");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[tokio::test]
async fn json_holding_nul_never_fails_a_write() {
    // `json` keeps the escape \u0000 as written, `jsonb` cannot hold it:
    // rendering such a row with to_jsonb failed the application's write,
    // even with the column excluded. It is sent as U+FFFD; an escaped
    // backslash before u0000 is text and stays.
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        r#"CREATE TYPE public.tagged AS (tag text, doc json);
           CREATE TABLE public.doc (id int PRIMARY KEY, body json, secret json,
                                    tags public.tagged[], plain jsonb);
           SELECT thorn.webhook_model('public.doc', exclude => ARRAY['secret']);
           INSERT INTO doc VALUES (1, '{"a": "x\u0000y", "b": "\\u0000", "c": "\\\u0000\u0000"}',
                                   '"\u0000"', ARRAY[ROW('t', '["\u0000"]')::tagged], '{"k": 1}');
           UPDATE doc SET secret = '"\u0000\u0000"';  -- nothing carried changed
           UPDATE doc SET plain = '{"k": 2}';
           DELETE FROM doc;
           INSERT INTO doc VALUES (2, '{"z": [1.50, {"y": null}], "a": "é\n"}', '{}',
                                   ARRAY[ROW('u', '{"b": 1, "b": 2}')::tagged], '[]');"#,
    )
    .await
    .unwrap_or_else(|e| panic!("{}", thorn::db::Why(&e)));
    let body = json!({"a": "x\u{fffd}y", "b": "\\u0000", "c": "\\\u{fffd}\u{fffd}"});
    let tags = json!([{"tag": "t", "doc": ["\u{fffd}"]}]);
    let got = events(&db).await;
    let data: Vec<(&str, &serde_json::Value)> = got.iter().map(|e| (e.0.as_str(), &e.1)).collect();
    assert_eq!(
        data[..3],
        [
            (
                "doc.created",
                &json!({"id": 1, "body": body, "tags": tags, "plain": {"k": 1}})
            ),
            (
                "doc.changed",
                &json!({"id": 1, "body": body, "tags": tags, "plain": {"k": 2}})
            ),
            (
                "doc.removed",
                &json!({"id": 1, "body": body, "tags": tags, "plain": {"k": 2}})
            ),
        ]
    );
    // Without the escape, a row renders as to_jsonb renders it.
    let same: bool = db
        .query_one(
            "SELECT (SELECT data FROM thorn.event WHERE id = 4)
                    = (SELECT to_jsonb(d) - 'secret' FROM doc d WHERE id = 2)",
            &[],
        )
        .await
        .expect("compare")
        .get(0);
    assert!(same, "{:?}", got[3]);

    // The conversion is inlined into the capture's query, so it is parsed
    // with the writer's settings: it must not read its literals differently
    // in a session of an old client (a fresh session: no plan cached).
    let old_client = t.client().await;
    old_client
        .batch_execute(
            r#"SET standard_conforming_strings = off;
               INSERT INTO doc (id, body) VALUES (3, $${"a": "\u0000 \\u0000"}$$);"#,
        )
        .await
        .unwrap_or_else(|e| panic!("{}", thorn::db::Why(&e)));
    let last = events(&db).await.pop().expect("event");
    assert_eq!(last.1["body"], json!({"a": "\u{fffd} \\u0000"}));
}

/// Whether the captures of `table` render rows as a table holding `json`.
async fn renders_as_json(db: &Client, table: &str) -> bool {
    db.query_one("SELECT thorn._captures_json($1::text::regclass)", &[&table])
        .await
        .expect("captures")
        .get(0)
}

#[tokio::test]
async fn the_ddl_guard_follows_json_in_and_out_of_a_tables_rows() {
    let t = TestDb::new().await;
    let db = t.client().await;
    // A column, an attribute of a composite type, a change of type.
    db.batch_execute(
        "CREATE TYPE public.pair AS (a int);
         CREATE TABLE public.note (id int PRIMARY KEY, p public.pair);
         SELECT thorn.webhook_model('public.note');",
    )
    .await
    .expect("note");
    assert!(!renders_as_json(&db, "note").await);
    db.batch_execute(
        r#"ALTER TYPE public.pair ADD ATTRIBUTE j json;
           INSERT INTO note VALUES (1, ROW(1, '"\u0000"'));
           ALTER TYPE public.pair DROP ATTRIBUTE j;
           ALTER TABLE note ADD COLUMN meta json;
           INSERT INTO note VALUES (2, NULL, '"\u0000"');"#,
    )
    .await
    .unwrap_or_else(|e| panic!("{}", thorn::db::Why(&e)));
    assert!(renders_as_json(&db, "note").await);
    db.batch_execute("ALTER TABLE note ALTER COLUMN meta TYPE jsonb USING NULL")
        .await
        .expect("to jsonb");
    assert!(!renders_as_json(&db, "note").await);
    // A column added through a partitioned table reaches its partitions,
    // whose own captures take direct writes; and a column added to a table
    // whose row type an annotated table holds reaches that one.
    db.batch_execute(
        r#"CREATE TABLE public.reading (id int, at int) PARTITION BY RANGE (at);
           CREATE TABLE public.reading_1 PARTITION OF public.reading FOR VALUES FROM (0) TO (100);
           SELECT thorn.webhook_model('public.reading');
           ALTER TABLE reading ADD COLUMN raw json;
           INSERT INTO reading_1 VALUES (1, 1, '"\u0000"');
           CREATE TABLE public.address (street text);
           CREATE TABLE public.person (id int PRIMARY KEY, home public.address);
           SELECT thorn.webhook_model('public.person');
           ALTER TABLE address ADD COLUMN extra json;
           INSERT INTO person VALUES (1, ROW('x', '"\u0000"'));"#,
    )
    .await
    .unwrap_or_else(|e| panic!("{}", thorn::db::Why(&e)));
    for table in ["reading", "reading_1", "person"] {
        assert!(renders_as_json(&db, table).await, "{table}");
    }
    let data: Vec<serde_json::Value> = events(&db).await.into_iter().map(|e| e.1).collect();
    assert_eq!(
        data,
        [
            json!({"id": 1, "p": {"a": 1, "j": "\u{fffd}"}}),
            json!({"id": 2, "p": null, "meta": "\u{fffd}"}),
            json!({"id": 1, "at": 1, "raw": "\u{fffd}"}),
            json!({"id": 1, "home": {"street": "x", "extra": "\u{fffd}"}}),
        ]
    );
}

#[tokio::test]
async fn a_json_nul_arrives_signed_as_the_replacement_character() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "CREATE TABLE public.doc (id int PRIMARY KEY, body json);
         SELECT thorn.webhook_model('public.doc');",
    )
    .await
    .expect("annotated table");
    let mut rx = Receiver::start().await;
    subscribe(&db, "doc.*", &rx.url("/"), None, "secret").await;
    let daemon = Daemon::start(t.config());

    db.batch_execute(r#"INSERT INTO doc VALUES (1, '{"a": "x\u0000y"}')"#)
        .await
        .expect("a write holding \\u0000 goes through");
    let got = rx.expect(1, WAIT, QUIET).await.remove(0);
    assert_eq!(
        got.text(),
        "{\"event\": \"doc.created\", \"ref\": null, \"sender\": null, \
         \"data\": {\"id\": 1, \"body\": {\"a\": \"x\u{fffd}y\"}}}"
    );
    assert_signed("secret", &got);
    daemon.stop().await;
}

#[tokio::test]
async fn a_table_with_1500_columns_is_captured_and_delivered() {
    let t = TestDb::new().await;
    let db = t.client().await;
    let columns: Vec<String> = (0..1500).map(|i| format!("c{i} int DEFAULT {i}")).collect();
    db.batch_execute(&format!(
        "CREATE TABLE wide (id int PRIMARY KEY, {});
         SELECT thorn.webhook_model('public.wide');",
        columns.join(", ")
    ))
    .await
    .expect("wide table");
    let mut rx = Receiver::start().await;
    subscribe(&db, "wide.*", &rx.url("/"), None, "secret").await;
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO wide (id) VALUES (1)")
        .await
        .expect("insert");
    let got = rx.expect(1, WAIT, QUIET).await;
    let data = &got[0].json()["data"];
    assert_eq!(data.as_object().map(|o| o.len()), Some(1501));
    assert_eq!(data["c1499"], 1499);
    daemon.stop().await;
}

#[tokio::test]
async fn a_five_megabyte_row_is_delivered_whole() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "CREATE TABLE doc (id int PRIMARY KEY, body text);
         SELECT thorn.webhook_model('public.doc');",
    )
    .await
    .expect("table");
    // A plain server: the axum test receiver caps bodies at 2 MB.
    let mut server = RawServer::start(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await;
    })
    .await;
    subscribe(&db, "doc.*", &server.url("/"), None, "secret").await;
    let mut config = t.config();
    config.delivery.timeout = std::time::Duration::from_secs(10);
    config.delivery.lease_setting = Some(std::time::Duration::from_secs(30));
    let daemon = Daemon::start(config);
    // 5 MB of incompressible text, written in a transaction that goes on
    // after the insert and commits.
    db.batch_execute(
        "BEGIN;
         INSERT INTO doc SELECT 1, string_agg(md5(i::text), '') FROM generate_series(1, 163840) i;
         SELECT pg_notify('unrelated', 'the transaction continues');
         COMMIT;",
    )
    .await
    .expect("a 5 MB row commits");
    let ended = wait_ended(&db, 1, WAIT).await;
    assert_eq!(ended[0].state, "delivered", "{:?}", ended[0].error);
    let (_, body) = tokio::time::timeout(WAIT, server.requests.recv())
        .await
        .expect("request")
        .expect("body");
    let envelope: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(
        envelope["data"]["body"].as_str().map(str::len),
        Some(5 * 1024 * 1024)
    );
    daemon.stop().await;
}
