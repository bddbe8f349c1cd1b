//! Statement forms beyond plain INSERT, UPDATE and DELETE: upserts, COPY,
//! savepoints, joins, writable CTEs, MERGE, the application's own BEFORE
//! triggers, generated columns, foreign-key cascades, two-phase commit. Each
//! test checks what the capture writes to the outbox against DESIGN.md §2:
//! created/changed/removed per row as stored, nothing for an UPDATE that
//! changes nothing watched, the OLD row for deletes, nothing when rolled back.

use futures_util::{pin_mut, SinkExt};
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::support::{python_sign, subscribe, wait_asleep, Daemon, Receiver, TestDb, QUIET, WAIT};

const ITEM: &str = "CREATE TABLE item (
    id int PRIMARY KEY, title text NOT NULL, state text NOT NULL DEFAULT 'draft',
    hits int NOT NULL DEFAULT 0)";

/// (name, data) of the events written since the last call, in outbox
/// order; removes them, so that each step of a test sees its own.
async fn take(db: &Client) -> Vec<(String, Value)> {
    let mut got: Vec<(i64, String, Value)> = db
        .query("DELETE FROM thorn.event RETURNING id, name, data", &[])
        .await
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    got.sort_by_key(|e| e.0);
    got.into_iter()
        .map(|(_, name, data)| (name, data))
        .collect()
}

/// [`take`] for one statement of several rows, whose events PostgreSQL may
/// write in any order: sorted by name, then data.
async fn take_unordered(db: &Client) -> Vec<(String, Value)> {
    let mut got = take(db).await;
    got.sort_by_key(|(name, data)| (name.clone(), data.to_string()));
    got
}

fn ev(name: &str, data: Value) -> (String, Value) {
    (name.to_owned(), data)
}

fn item(id: i32, title: &str, state: &str, hits: i32) -> Value {
    json!({"id": id, "title": title, "state": state, "hits": hits})
}

/// Runs `copy` (a COPY … FROM STDIN) with `rows` as its data, in one
/// message, as tokio-postgres's copy_in sends it.
async fn copy_in(
    db: &Client,
    copy: &str,
    rows: &'static [u8],
) -> Result<u64, tokio_postgres::Error> {
    let sink = db.copy_in(copy).await?;
    pin_mut!(sink);
    sink.send(rows).await?;
    sink.as_mut().finish().await
}

async fn run(db: &Client, sql: &str) {
    db.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// Runs `sql`, then [`take`]s the events it wrote.
async fn written(db: &Client, sql: &str) -> Vec<(String, Value)> {
    run(db, sql).await;
    take(db).await
}

/// Runs `sql`, then [`take_unordered`]s the events it wrote.
async fn written_unordered(db: &Client, sql: &str) -> Vec<(String, Value)> {
    run(db, sql).await;
    take_unordered(db).await
}

/// An upsert is an INSERT for the rows it inserts and an UPDATE for those
/// it updates: created for new rows, changed only when something watched
/// changed, nothing for rows left alone (DO NOTHING, a false WHERE).
#[tokio::test]
async fn upserts_emit_created_for_new_rows_and_changed_only_for_real_changes() {
    let t = TestDb::new().await;
    let db = t.client().await;
    assert_eq!(
        written(
            &db,
            &format!(
                "{ITEM};
             SELECT thorn.webhook_model('public.item', reference => '/item/{{id}}/',
                                        watch => ARRAY['title', 'state']);
             INSERT INTO item (id, title) VALUES (1, 'a');"
            )
        )
        .await,
        [ev("item.created", item(1, "a", "draft", 0))]
    );

    let upsert = "ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title";
    assert_eq!(
        written(
            &db,
            &format!("INSERT INTO item (id, title) VALUES (2, 'b') {upsert}")
        )
        .await,
        [ev("item.created", item(2, "b", "draft", 0))]
    );

    // An existing row: changed, with its reference.
    run(
        &db,
        &format!("INSERT INTO item (id, title) VALUES (1, 'a2') {upsert}"),
    )
    .await;
    let reference: Option<String> = db
        .query_one("SELECT ref FROM thorn.event", &[])
        .await
        .expect("ref")
        .get(0);
    assert_eq!(reference.as_deref(), Some("/item/1/"));
    assert_eq!(
        take(&db).await,
        [ev("item.changed", item(1, "a2", "draft", 0))]
    );

    // Updated, but nothing watched changed: nothing.
    run(
        &db,
        "INSERT INTO item (id, title) VALUES (1, 'unused')
         ON CONFLICT (id) DO UPDATE SET hits = item.hits + 1",
    )
    .await;
    run(
        &db,
        &format!("INSERT INTO item (id, title) VALUES (1, 'a2') {upsert}"),
    )
    .await;
    assert_eq!(take(&db).await, []);

    // One statement: a change, an update to the same values, an insert.
    assert_eq!(
        written_unordered(
            &db,
            &format!("INSERT INTO item (id, title) VALUES (1, 'a3'), (2, 'b'), (3, 'c') {upsert}")
        )
        .await,
        [
            ev("item.changed", item(1, "a3", "draft", 1)),
            ev("item.created", item(3, "c", "draft", 0)),
        ]
    );

    assert_eq!(
        written(
            &db,
            "INSERT INTO item (id, title) VALUES (1, 'skipped'), (4, 'd') ON CONFLICT DO NOTHING"
        )
        .await,
        [ev("item.created", item(4, "d", "draft", 0))]
    );

    run(
        &db,
        "INSERT INTO item (id, title) VALUES (2, 'skipped')
         ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title WHERE item.title = 'nope'",
    )
    .await;
    assert_eq!(take(&db).await, []);
    let titles: Vec<String> = db
        .query("SELECT title FROM item ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(titles, ["a3", "b", "c", "d"]);
}

/// In an upsert, a change condition sees the row that was there as OLD and
/// the stored row as NEW; a create condition sees only the inserted rows.
#[tokio::test]
async fn upsert_conditions_see_the_existing_row_as_old() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        &format!(
            "{ITEM};
             SELECT thorn.webhook_model('public.item', on_create => NULL, on_change => NULL,
                                        on_delete => NULL);
             SELECT thorn.webhook_event('public.item', 'item.published', fires_on => 'change',
                 condition => $$NEW.state = 'published' AND OLD.state IS DISTINCT FROM 'published'$$);
             SELECT thorn.webhook_event('public.item', 'item.renamed', fires_on => 'change',
                 condition => $$NEW.title <> OLD.title$$);
             SELECT thorn.webhook_event('public.item', 'item.born_published', fires_on => 'create',
                 condition => $$NEW.state = 'published'$$);
             INSERT INTO item (id, title) VALUES (1, 'a'), (2, 'b');"
        ),
    )
    .await;
    assert_eq!(take(&db).await, []);

    let upsert = "ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title, state = EXCLUDED.state";
    assert_eq!(
        written_unordered(
            &db,
            &format!(
                "INSERT INTO item (id, title, state) VALUES
                 (1, 'a', 'published'), (2, 'b2', 'draft'), (3, 'c', 'published'), (4, 'd', 'draft')
             {upsert}"
            )
        )
        .await,
        [
            ev("item.born_published", item(3, "c", "published", 0)),
            ev("item.published", item(1, "a", "published", 0)),
            ev("item.renamed", item(2, "b2", "draft", 0)),
        ]
    );

    // Published already, same title: neither condition holds.
    run(
        &db,
        &format!("INSERT INTO item (id, title, state) VALUES (1, 'a', 'published') {upsert}"),
    )
    .await;
    assert_eq!(take(&db).await, []);
}

/// COPY FROM STDIN is an INSERT for the capture; a COPY that fails on a
/// later row leaves nothing.
#[tokio::test]
async fn copy_from_stdin_is_captured_like_an_insert() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        &format!("{ITEM}; SELECT thorn.webhook_model('public.item');"),
    )
    .await;

    let copy = "COPY item (id, title, state) FROM STDIN";
    let copied = copy_in(&db, copy, b"1\ta\tdraft\n2\tb\tpublished\n")
        .await
        .expect("copy");
    assert_eq!(copied, 2);
    assert_eq!(
        take(&db).await,
        [
            ev("item.created", item(1, "a", "draft", 0)),
            ev("item.created", item(2, "b", "published", 0)),
        ]
    );

    // The second row is a duplicate key: the whole COPY is rolled back.
    copy_in(&db, copy, b"3\tc\tdraft\n1\tagain\tdraft\n")
        .await
        .expect_err("duplicate key");
    assert_eq!(take(&db).await, []);
}

/// ROLLBACK TO SAVEPOINT drops the events of the rolled-back part only,
/// also when the capture had already run in the statement that failed.
#[tokio::test]
async fn rolled_back_savepoints_discard_only_their_events() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        &format!(
            "{ITEM}; SELECT thorn.webhook_model('public.item');
             -- Runs after the capture (statement triggers fire in name order)
             -- and fails the statement: its events must go with it.
             CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF EXISTS (SELECT 1 FROM item WHERE title = 'boom') THEN
                     RAISE EXCEPTION 'boom';
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER zz_refuse_boom AFTER INSERT ON item
                 FOR EACH STATEMENT EXECUTE FUNCTION refuse_boom();"
        ),
    )
    .await;

    run(
        &db,
        "BEGIN;
         INSERT INTO item (id, title) VALUES (1, 'kept');
         SAVEPOINT s;
         INSERT INTO item (id, title) VALUES (2, 'rolled back');
         UPDATE item SET title = 'rolled back' WHERE id = 1;
         ROLLBACK TO SAVEPOINT s;
         UPDATE item SET title = 'kept too' WHERE id = 1;
         SAVEPOINT t;
         INSERT INTO item (id, title) VALUES (3, 'released');
         RELEASE SAVEPOINT t;
         SAVEPOINT u;",
    )
    .await;
    db.batch_execute("INSERT INTO item (id, title) VALUES (4, 'fine'), (5, 'boom')")
        .await
        .expect_err("refused after the capture ran");
    run(&db, "ROLLBACK TO SAVEPOINT u; COMMIT;").await;
    assert_eq!(
        take(&db).await,
        [
            ev("item.created", item(1, "kept", "draft", 0)),
            ev("item.changed", item(1, "kept too", "draft", 0)),
            ev("item.created", item(3, "released", "draft", 0)),
        ]
    );

    // A PL/pgSQL EXCEPTION block is a subtransaction too.
    assert_eq!(
        written(
            &db,
            "DO $$
         BEGIN
             BEGIN
                 INSERT INTO item (id, title) VALUES (6, 'failed part');
                 UPDATE item SET title = 'failed part' WHERE id = 3;
                 PERFORM 1 / 0;
             EXCEPTION WHEN division_by_zero THEN
                 INSERT INTO item (id, title) VALUES (7, 'handler');
             END;
             BEGIN
                 INSERT INTO item (id, title) VALUES (8, 'boom');
             EXCEPTION WHEN raise_exception THEN
                 NULL;
             END;
             DELETE FROM item WHERE id = 3;
         END $$;"
        )
        .await,
        [
            ev("item.created", item(7, "handler", "draft", 0)),
            ev("item.removed", item(3, "released", "draft", 0)),
        ]
    );
}

/// UPDATE … FROM and DELETE … USING change each target row once, however
/// many source rows join it; RETURNING changes nothing; a view that can be
/// written through is its table.
#[tokio::test]
async fn joins_returning_and_views_are_captured_once_per_row() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        &format!(
            "{ITEM}; SELECT thorn.webhook_model('public.item');
             INSERT INTO item (id, title) VALUES (1, 'a'), (2, 'b'), (3, 'c');
             CREATE TABLE src (id int, title text);
             INSERT INTO src VALUES (1, 'A'), (2, 'b'), (3, 'C'), (3, 'C');
             DELETE FROM thorn.event;"
        ),
    )
    .await;

    let returned = db
        .query(
            "UPDATE item SET title = src.title FROM src WHERE src.id = item.id RETURNING item.id",
            &[],
        )
        .await
        .expect("update from");
    // Row 2 is updated to the values it had: no event.
    assert_eq!(returned.len(), 3);
    assert_eq!(
        take_unordered(&db).await,
        [
            ev("item.changed", item(1, "A", "draft", 0)),
            ev("item.changed", item(3, "C", "draft", 0)),
        ]
    );

    let returned = db
        .query(
            "DELETE FROM item USING src WHERE src.id = item.id AND src.title = 'C'
             RETURNING item.id",
            &[],
        )
        .await
        .expect("delete using");
    assert_eq!(returned.len(), 1);
    assert_eq!(
        take(&db).await,
        [ev("item.removed", item(3, "C", "draft", 0))]
    );

    let hits: i32 = db
        .query_one(
            "UPDATE item SET hits = hits + 1 WHERE id = 1 RETURNING hits",
            &[],
        )
        .await
        .expect("update returning")
        .get(0);
    assert_eq!(hits, 1);
    assert_eq!(
        take(&db).await,
        [ev("item.changed", item(1, "A", "draft", 1))]
    );

    assert_eq!(
        written(
            &db,
            "CREATE VIEW live_item AS SELECT * FROM item WHERE state <> 'deleted';
         INSERT INTO live_item (id, title) VALUES (9, 'viewed');
         UPDATE live_item SET state = 'published' WHERE id = 9;
         DELETE FROM live_item WHERE id = 9;"
        )
        .await,
        [
            ev("item.created", item(9, "viewed", "draft", 0)),
            ev("item.changed", item(9, "viewed", "published", 0)),
            ev("item.removed", item(9, "viewed", "published", 0)),
        ]
    );
}

/// Writable CTEs that write the annotated table twice in one statement:
/// each written row once, as stored, whichever part wrote it.
#[tokio::test]
async fn writable_ctes_that_write_the_table_twice() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        &format!(
            "{ITEM}; SELECT thorn.webhook_model('public.item');
             INSERT INTO item (id, title) VALUES (1, 'a'), (2, 'b');
             DELETE FROM thorn.event;"
        ),
    )
    .await;

    assert_eq!(
        written_unordered(
            &db,
            "WITH u AS (UPDATE item SET title = title || '!' RETURNING id, title)
         INSERT INTO item (id, title) SELECT id + 100, title FROM u"
        )
        .await,
        [
            ev("item.changed", item(1, "a!", "draft", 0)),
            ev("item.changed", item(2, "b!", "draft", 0)),
            ev("item.created", item(101, "a!", "draft", 0)),
            ev("item.created", item(102, "b!", "draft", 0)),
        ]
    );

    // Two UPDATEs share one pair of transition tables: one change each.
    assert_eq!(
        written_unordered(
            &db,
            "WITH u AS (UPDATE item SET title = 'u1' WHERE id = 1 RETURNING id)
         UPDATE item SET title = 'u2' WHERE id = 2"
        )
        .await,
        [
            ev("item.changed", item(1, "u1", "draft", 0)),
            ev("item.changed", item(2, "u2", "draft", 0)),
        ]
    );

    // Both aim at one row: PostgreSQL updates it once; the event is the
    // stored row.
    run(
        &db,
        "WITH u AS (UPDATE item SET title = 'first' WHERE id = 1 RETURNING id)
         UPDATE item SET title = 'second' WHERE id = 1",
    )
    .await;
    let stored: Value = db
        .query_one("SELECT to_jsonb(item) FROM item WHERE id = 1", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(take(&db).await, [ev("item.changed", stored)]);

    // A row moved to another key: removed, then created.
    assert_eq!(
        written(
            &db,
            "WITH d AS (DELETE FROM item WHERE id = 101 RETURNING *)
         INSERT INTO item SELECT id + 100, title, state, hits FROM d"
        )
        .await,
        [
            ev("item.removed", item(101, "a!", "draft", 0)),
            ev("item.created", item(201, "a!", "draft", 0)),
        ]
    );

    assert_eq!(
        written_unordered(
            &db,
            "WITH u AS (UPDATE item SET title = 'cte' WHERE id = 1 RETURNING id)
         INSERT INTO item (id, title) VALUES (2, 'upserted'), (3, 'new')
         ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title"
        )
        .await,
        [
            ev("item.changed", item(1, "cte", "draft", 0)),
            ev("item.changed", item(2, "upserted", "draft", 0)),
            ev("item.created", item(3, "new", "draft", 0)),
        ]
    );
}

/// The application's BEFORE triggers: events carry the row as stored, rows
/// a trigger skips (RETURN NULL) have none, and skipped rows in the middle
/// of an UPDATE do not shift the pairing of old and new rows.
#[tokio::test]
async fn before_triggers_shape_the_stored_row_and_skipped_rows_emit_nothing() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        "CREATE TABLE doc (id int PRIMARY KEY, title text NOT NULL,
                           locked bool NOT NULL DEFAULT false, revision int NOT NULL DEFAULT 0);
         CREATE FUNCTION doc_before() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF TG_OP = 'DELETE' THEN
                 RETURN CASE WHEN OLD.locked THEN NULL ELSE OLD END;
             END IF;
             IF (TG_OP = 'UPDATE' AND OLD.locked) OR NEW.title = 'skip' THEN
                 RETURN NULL;
             END IF;
             NEW.title := btrim(NEW.title);
             NEW.revision := CASE TG_OP WHEN 'INSERT' THEN 1 ELSE OLD.revision + 1 END;
             RETURN NEW;
         END $$;
         CREATE TRIGGER doc_before BEFORE INSERT OR UPDATE OR DELETE ON doc
             FOR EACH ROW EXECUTE FUNCTION doc_before();
         SELECT thorn.webhook_model('public.doc', watch => ARRAY['title']);
         -- Holds only when a new row is paired with its own old row.
         SELECT thorn.webhook_event('public.doc', 'doc.exclaimed', fires_on => 'change',
             condition => $$NEW.title = OLD.title || '!'$$);",
    )
    .await;
    let doc = |id: i32, title: &str, locked: bool, revision: i32| json!({"id": id, "title": title, "locked": locked, "revision": revision});

    assert_eq!(
        written(
            &db,
            "INSERT INTO doc (id, title, locked) VALUES
             (1, '  one  ', false), (2, 'skip', false), (3, 'three', true), (4, ' four', false)"
        )
        .await,
        [
            ev("doc.created", doc(1, "one", false, 1)),
            ev("doc.created", doc(3, "three", true, 1)),
            ev("doc.created", doc(4, "four", false, 1)),
        ]
    );

    // Row 3 (between 1 and 4) is skipped by the trigger.
    run(&db, "UPDATE doc SET title = title || '!'").await;
    assert_eq!(
        take_unordered(&db).await,
        [
            ev("doc.changed", doc(1, "one!", false, 2)),
            ev("doc.changed", doc(4, "four!", false, 2)),
            ev("doc.exclaimed", doc(1, "one!", false, 2)),
            ev("doc.exclaimed", doc(4, "four!", false, 2)),
        ]
    );

    // The trigger trims the title back to what it was: only the revision
    // (not watched) changed.
    run(&db, "UPDATE doc SET title = '  one!  ' WHERE id = 1").await;
    assert_eq!(take(&db).await, []);

    // The locked row stays, and has no removed event.
    run(&db, "DELETE FROM doc").await;
    assert_eq!(
        take_unordered(&db).await,
        [
            ev("doc.removed", doc(1, "one!", false, 3)),
            ev("doc.removed", doc(4, "four!", false, 2)),
        ]
    );
    let left: i64 = db
        .query_one("SELECT count(*) FROM doc", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 1);
}

/// Identity and stored generated columns are in the data, with the values
/// PostgreSQL computed; `watch` on a generated column follows its value.
#[tokio::test]
async fn generated_and_identity_columns_are_in_the_data() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        "CREATE TABLE line (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             seq int GENERATED BY DEFAULT AS IDENTITY,
             price int NOT NULL, qty int NOT NULL,
             total int GENERATED ALWAYS AS (price * qty) STORED);
         SELECT thorn.webhook_model('public.line', watch => ARRAY['total']);
         INSERT INTO line (price, qty) VALUES (3, 4), (5, 1);
         INSERT INTO line (seq, price, qty) VALUES (10, 1, 1);",
    )
    .await;
    let line = |id: i64, seq: i32, price: i32, qty: i32| json!({"id": id, "seq": seq, "price": price, "qty": qty, "total": price * qty});
    assert_eq!(
        take(&db).await,
        [
            ev("line.created", line(1, 1, 3, 4)),
            ev("line.created", line(2, 2, 5, 1)),
            ev("line.created", line(3, 10, 1, 1)),
        ]
    );

    assert_eq!(
        written(
            &db,
            "UPDATE line SET price = 6, qty = 2 WHERE id = 1;  -- total stays 12
         UPDATE line SET qty = 3 WHERE id = 2;
         DELETE FROM line WHERE id = 3;"
        )
        .await,
        [
            ev("line.changed", line(2, 2, 5, 3)),
            ev("line.removed", line(3, 10, 1, 1)),
        ]
    );
}

/// MERGE (PostgreSQL 15) on a plain table: its insert, update and delete
/// actions in one statement, custom events included; a matched row updated
/// to the same values and DO NOTHING emit nothing.
#[tokio::test]
async fn merge_emits_created_changed_and_removed_in_one_statement() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        &format!(
            "{ITEM}; SELECT thorn.webhook_model('public.item');
             SELECT thorn.webhook_event('public.item', 'item.published', fires_on => 'change',
                 condition => $$NEW.state = 'published' AND OLD.state IS DISTINCT FROM 'published'$$);
             INSERT INTO item (id, title) VALUES (1, 'a'), (2, 'b'), (3, 'c');
             DELETE FROM thorn.event;"
        ),
    )
    .await;

    assert_eq!(
        written_unordered(
            &db,
            "MERGE INTO item t
         USING (VALUES (1, 'A', 'published'), (2, 'b', 'draft'), (3, NULL, NULL), (5, 'e', 'draft'))
             AS s (id, title, state)
         ON t.id = s.id
         WHEN MATCHED AND s.title IS NULL THEN DELETE
         WHEN MATCHED THEN UPDATE SET title = s.title, state = s.state
         WHEN NOT MATCHED THEN INSERT (id, title, state) VALUES (s.id, s.title, s.state)"
        )
        .await,
        [
            ev("item.changed", item(1, "A", "published", 0)),
            ev("item.created", item(5, "e", "draft", 0)),
            ev("item.published", item(1, "A", "published", 0)),
            ev("item.removed", item(3, "c", "draft", 0)),
        ]
    );

    run(
        &db,
        "MERGE INTO item t USING (VALUES (1), (6)) AS s (id) ON t.id = s.id
         WHEN MATCHED THEN DO NOTHING",
    )
    .await;
    assert_eq!(take(&db).await, []);
}

/// Upsert, COPY and MERGE through a partitioned table are captured by the
/// parent like plain writes; an upsert into a partition itself by the
/// partition, which follows the parent's annotation.
#[tokio::test]
async fn upsert_copy_and_merge_through_a_partitioned_table() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        "CREATE TABLE part (id int PRIMARY KEY, title text NOT NULL) PARTITION BY RANGE (id);
         CREATE TABLE part_low PARTITION OF part FOR VALUES FROM (0) TO (100);
         CREATE TABLE part_high PARTITION OF part FOR VALUES FROM (100) TO (200);
         SELECT thorn.webhook_model('public.part', watch => ARRAY['title']);
         INSERT INTO part VALUES (1, 'a'), (150, 'b');
         DELETE FROM thorn.event;",
    )
    .await;
    let part = |id: i32, title: &str| json!({"id": id, "title": title});

    assert_eq!(
        written_unordered(
            &db,
            "INSERT INTO part VALUES (1, 'a2'), (150, 'b'), (2, 'c'), (151, 'd')
         ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title"
        )
        .await,
        [
            ev("part.changed", part(1, "a2")),
            ev("part.created", part(151, "d")),
            ev("part.created", part(2, "c")),
        ]
    );

    copy_in(&db, "COPY part FROM STDIN", b"3\tcopied\n160\tcopied too\n")
        .await
        .expect("copy");
    assert_eq!(
        take_unordered(&db).await,
        [
            ev("part.created", part(160, "copied too")),
            ev("part.created", part(3, "copied")),
        ]
    );

    assert_eq!(
        written_unordered(
            &db,
            "MERGE INTO part t USING (VALUES (1, 'm'), (160, NULL), (170, 'new')) AS s (id, title)
         ON t.id = s.id
         WHEN MATCHED AND s.title IS NULL THEN DELETE
         WHEN MATCHED THEN UPDATE SET title = s.title
         WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.title)"
        )
        .await,
        [
            ev("part.changed", part(1, "m")),
            ev("part.created", part(170, "new")),
            ev("part.removed", part(160, "copied too")),
        ]
    );

    assert_eq!(
        written(&db, "INSERT INTO part_low VALUES (5, 'direct') ON CONFLICT (id) DO NOTHING;
         INSERT INTO part_low VALUES (5, 'direct!') ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title;").await,
        [
            ev("part.created", part(5, "direct")),
            ev("part.changed", part(5, "direct!")),
        ]
    );
}

/// Two annotated tables in one transaction: the outbox order is statement
/// order. Foreign-key cascades are part of the statement that caused them,
/// captured right after it.
#[tokio::test]
async fn two_tables_follow_statement_order_and_cascades_are_captured() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        "CREATE TABLE author (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE book (id int PRIMARY KEY, title text NOT NULL,
             author_id int NOT NULL REFERENCES author ON UPDATE CASCADE ON DELETE CASCADE);
         SELECT thorn.webhook_model('public.author');
         SELECT thorn.webhook_model('public.book');",
    )
    .await;
    let author = |id: i32, name: &str| json!({"id": id, "name": name});
    let book =
        |id: i32, title: &str, author: i32| json!({"id": id, "title": title, "author_id": author});

    assert_eq!(
        written(
            &db,
            "BEGIN;
         INSERT INTO author VALUES (1, 'ann');
         INSERT INTO book VALUES (10, 'first', 1);
         UPDATE author SET name = 'Ann';
         INSERT INTO book VALUES (11, 'second', 1);
         UPDATE book SET title = 'First' WHERE id = 10;
         DELETE FROM book WHERE id = 11;
         INSERT INTO author VALUES (2, 'bob');
         COMMIT;"
        )
        .await,
        [
            ev("author.created", author(1, "ann")),
            ev("book.created", book(10, "first", 1)),
            ev("author.changed", author(1, "Ann")),
            ev("book.created", book(11, "second", 1)),
            ev("book.changed", book(10, "First", 1)),
            ev("book.removed", book(11, "second", 1)),
            ev("author.created", author(2, "bob")),
        ]
    );

    run(&db, "UPDATE author SET id = 3 WHERE id = 1").await;
    assert_eq!(
        take(&db).await,
        [
            ev("author.changed", author(3, "Ann")),
            ev("book.changed", book(10, "First", 3)),
        ]
    );
    run(&db, "DELETE FROM author WHERE id = 3").await;
    assert_eq!(
        take(&db).await,
        [
            ev("author.removed", author(3, "Ann")),
            ev("book.removed", book(10, "First", 3)),
        ]
    );
}

/// Inheritance is refused, whichever way a table joins a hierarchy with an
/// annotated one (CREATE TABLE … INHERITS is in hostile.rs), and writes go
/// on being captured.
#[tokio::test]
async fn alter_table_inherit_is_refused_both_ways() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        &format!(
            "{ITEM}; SELECT thorn.webhook_model('public.item');
             CREATE TABLE heir (id int NOT NULL, title text NOT NULL, state text NOT NULL,
                                hits int NOT NULL);
             CREATE TABLE ancestor (id int NOT NULL);"
        ),
    )
    .await;
    for ddl in [
        "ALTER TABLE heir INHERIT item",
        "ALTER TABLE item INHERIT ancestor",
    ] {
        let error = db.batch_execute(ddl).await.expect_err(ddl);
        let message = error
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_else(|| error.to_string());
        assert!(
            message.contains("inheritance hierarchy"),
            "{ddl}: {message}"
        );
    }
    let inherits: i64 = db
        .query_one("SELECT count(*) FROM pg_inherits", &[])
        .await
        .expect("pg_inherits")
        .get(0);
    assert_eq!(inherits, 0);
    run(&db, "INSERT INTO item (id, title) VALUES (1, 'a')").await;
    assert_eq!(
        take(&db).await,
        [ev("item.created", item(1, "a", "draft", 0))]
    );
}

/// End to end: an upsert that inserts one row and updates another, written
/// while the daemon sleeps, arrives as two signed deliveries; an upsert
/// that changes nothing sends nothing.
#[tokio::test]
async fn an_upsert_is_delivered_end_to_end() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        &format!(
            "{ITEM}; SELECT thorn.webhook_model('public.item', reference => '/item/{{id}}/');
             INSERT INTO item (id, title) VALUES (1, 'a');
             DELETE FROM thorn.event;"
        ),
    )
    .await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "item.*", &rx.url("/hook"), None, "secret").await;
    let daemon = Daemon::start(t.config());
    wait_asleep(&db).await;

    let upsert = "INSERT INTO item (id, title) VALUES (1, 'a2'), (2, 'b')
                  ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title";
    run(&db, upsert).await;
    let mut got = rx.expect(2, WAIT, QUIET).await;
    got.sort_by(|a, b| a.header("hook-event").cmp(b.header("hook-event")));
    let bodies: Vec<Value> = got.iter().map(|r| r.json()).collect();
    assert_eq!(
        bodies,
        [
            json!({"event": "item.changed", "ref": "/item/1/", "sender": null,
                   "data": item(1, "a2", "draft", 0)}),
            json!({"event": "item.created", "ref": "/item/2/", "sender": null,
                   "data": item(2, "b", "draft", 0)}),
        ]
    );
    for r in &got {
        assert_eq!(r.header("hook-event"), r.json()["event"]);
        assert_eq!(
            r.header("hook-hmac"),
            python_sign(&[("sha256", "secret", &r.body)])[0]
        );
    }

    run(&db, upsert).await;
    assert!(rx.next(QUIET).await.is_none());
    let events: i64 = db
        .query_one("SELECT count(*) FROM thorn.event", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(events, 2);
    daemon.stop().await;
}

/// A client LISTENing on the daemon's wake-up channel, and what it hears.
async fn listening(t: &TestDb) -> (Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(&t.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.channel().to_owned());
            }
        }
    });
    run(&client, "LISTEN thorn").await;
    (client, rx)
}

/// Two-phase commit (PREPARE TRANSACTION, what XA transaction managers
/// issue) refuses a transaction that has executed NOTIFY, and a capture
/// NOTIFYs while the daemon sleeps. A session with `thorn.notify = off`
/// (sql/0021) writes its events without waking the daemon: no NOTIFY, no
/// wake-up lock, and the daemon's poll delivers them. Where the server
/// allows prepared transactions, such a write is PREPAREd and committed.
#[tokio::test]
async fn writers_with_notify_off_never_notify_so_two_phase_commit_works() {
    let t = TestDb::new().await;
    let db = t.client().await;
    run(
        &db,
        &format!("{ITEM}; SELECT thorn.webhook_model('public.item');"),
    )
    .await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "item.*", &rx.url("/hook"), None, "secret").await;
    let (_listener, mut heard) = listening(&t).await;
    let daemon = Daemon::start(t.config());
    wait_asleep(&db).await;

    // The usual writer wakes the sleeping daemon.
    run(&db, "INSERT INTO item (id, title) VALUES (1, 'wakes')").await;
    let woken = tokio::time::timeout(WAIT, heard.recv()).await;
    assert_eq!(woken.ok().flatten().as_deref(), Some("thorn"));
    let got = rx.expect(1, WAIT, QUIET).await;
    assert_eq!(got[0].json()["data"], item(1, "wakes", "draft", 0));
    wait_asleep(&db).await;

    // One with thorn.notify = off neither notifies nor takes the wake-up
    // lock; the daemon's poll (1 s in tests) delivers its event.
    let quiet = t.client().await;
    run(&quiet, "SET thorn.notify = off").await;
    run(
        &quiet,
        "BEGIN; INSERT INTO item (id, title) VALUES (2, 'quiet')",
    )
    .await;
    let locks: i64 = quiet
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_locks")
        .get(0);
    assert_eq!(locks, 0, "the quiet writer took the wake-up lock");
    run(&quiet, "COMMIT").await;
    let got = rx.expect(1, WAIT, QUIET).await;
    assert_eq!(got[0].json()["data"], item(2, "quiet", "draft", 0));
    assert_eq!(heard.try_recv().ok(), None, "the quiet writer notified");

    let (max, database): (String, String) = db
        .query_one(
            "SELECT current_setting('max_prepared_transactions'), current_database()",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("settings");
    if max == "0" {
        eprintln!("two-phase part skipped: the server has max_prepared_transactions = 0");
    } else {
        wait_asleep(&db).await;
        let prepared = quiet
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO item (id, title) VALUES (3, 'two-phase');
                 PREPARE TRANSACTION '{database}'"
            ))
            .await;
        if let Err(error) = &prepared {
            let _ = quiet.batch_execute("ROLLBACK").await;
            panic!("two-phase write refused: {:?}", error.as_db_error());
        }
        // Committed at once (its own statement: COMMIT PREPARED runs outside
        // a transaction block), so that no prepared transaction outlives the
        // test; it would keep its database from being dropped.
        quiet
            .batch_execute(&format!("COMMIT PREPARED '{database}'"))
            .await
            .expect("COMMIT PREPARED");
        let got = rx.expect(1, WAIT, QUIET).await;
        assert_eq!(got[0].json()["data"], item(3, "two-phase", "draft", 0));
    }
    daemon.stop().await;
}
