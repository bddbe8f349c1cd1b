//! `thorn subscriber …` through the real binary, against a real database.

use serde_json::Value;

use crate::support::{thorn_cli, TestDb};

#[tokio::test]
async fn subscriber_commands_manage_the_table() {
    let t = TestDb::new().await;
    let url = &t.url;

    let (code, out, err) = thorn_cli(
        url,
        &[
            "subscriber",
            "add",
            "--json",
            "--event",
            "article.*",
            "--url",
            "https://example.com/hook?token=SECRETTOKEN",
            "--owner",
            "alice",
            "--digest",
            "SHA512",
            "--signer",
            "compat",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let added: Value = serde_json::from_str(&out).expect("json");
    let id = added["id"].as_str().expect("id").to_owned();
    assert_eq!(added["owner"], "alice");
    assert_eq!(added["hmac_digest"], "sha512");
    assert_eq!(added["hmac_signer"], "compat");
    assert_eq!(added["hmac_secret"].as_str().map(str::len), Some(64));

    let (code, out, _) = thorn_cli(url, &["subscriber", "list", "--json"]).await;
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert!(
        list[0].get("hmac_secret").is_none(),
        "list never prints secrets"
    );
    assert_eq!(
        list[0]["url"], "https://example.com/hook",
        "nor query strings"
    );
    let (_, out, _) = thorn_cli(url, &["subscriber", "list", "--owner", "bob", "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("json"),
        serde_json::json!([])
    );
    let (_, out, _) = thorn_cli(url, &["subscriber", "list"]).await;
    assert!(
        out.contains(&id)
            && out.contains("article.*")
            && !out.contains(added["hmac_secret"].as_str().expect("s"))
            && !out.contains("SECRETTOKEN"),
        "{out}"
    );

    let (code, out, _) = thorn_cli(
        url,
        &[
            "subscriber",
            "disable",
            &id,
            "--reason",
            "maintenance",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0);
    let disabled: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(disabled["active"], false);
    assert_eq!(disabled["deactivated_reason"], "maintenance");
    let (_, out, _) = thorn_cli(url, &["subscriber", "show", &id]).await;
    assert!(out.contains("inactive (maintenance)"), "{out}");
    // As if switched off for failing for days: switched on again, it starts
    // healthy, or its first failure would switch it off again at once.
    let db = t.client().await;
    db.execute(
        "UPDATE thorn.subscriber SET failing_since = now() - interval '6 days'",
        &[],
    )
    .await
    .expect("failing");
    let (_, out, _) = thorn_cli(url, &["subscriber", "enable", &id, "--json"]).await;
    let enabled: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(enabled["active"], true);
    assert_eq!(enabled["deactivated_reason"], Value::Null);
    let failing: bool = db
        .query_one(
            "SELECT failing_since IS NOT NULL FROM thorn.subscriber",
            &[],
        )
        .await
        .expect("subscriber")
        .get(0);
    assert!(!failing, "switched on with its old failing_since");

    let (code, out, _) = thorn_cli(url, &["subscriber", "remove", &id]).await;
    assert_eq!((code, out.trim()), (0, format!("removed {id}").as_str()));
    let (code, _, err) = thorn_cli(url, &["subscriber", "show", &id]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no subscriber"), "{err}");
    let (code, _, err) = thorn_cli(url, &["subscriber", "remove", "nope"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("is not a subscriber id"), "{err}");

    // Every bad field is named at once.
    let (code, _, err) = thorn_cli(
        url,
        &[
            "subscriber",
            "add",
            "--event",
            "a..b",
            "--url",
            "ftp://x",
            "--digest",
            "md5",
        ],
    )
    .await;
    assert_ne!(code, 0);
    for field in ["event:", "url:", "hmac_digest:"] {
        assert!(err.contains(field), "{field} in {err}");
    }
}

/// Runs the binary with `env` added to a config of the database URL alone.
async fn thorn_with(url: &str, env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_thorn"))
        .args(args)
        .env("THORN_CONFIG", "/dev/null")
        .env("THORN_DATABASE_URL", url)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run thorn");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Runs the binary as [`thorn_with`] does, with standard error on a file
/// that `JOURNAL_STREAM` names, as systemd's journal stream would be;
/// returns the exit code and what went to standard error.
async fn under_journald(url: &str, env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    use std::os::unix::fs::MetadataExt;
    let path = std::env::temp_dir().join(format!(
        "thorn-journal-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    let file = std::fs::File::create(&path).expect("stderr file");
    let meta = file.metadata().expect("stat");
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_thorn"))
        .args(args)
        .env("THORN_CONFIG", "/dev/null")
        .env("THORN_DATABASE_URL", url)
        .env("JOURNAL_STREAM", stream)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .status()
        .await
        .expect("run thorn");
    let err = std::fs::read_to_string(&path).expect("stderr");
    let _ = std::fs::remove_file(&path);
    (status.code().unwrap_or(-1), err)
}

/// What systemd must not restart exits with its own status and says why:
/// a bad config (64, every problem listed, by `run` too), a schema newer
/// than the binary (65, which `check-config --database` finds beforehand);
/// a server thorn cannot use is named. `sign` needs no config.
#[tokio::test]
async fn failures_a_restart_cannot_fix_are_named_and_exit_apart() {
    let bad = [
        ("THORN_DELIVERY__TIMEOUT", "soon"),
        ("THORN_DISPATCH__BATCH_SIZE", "-1"),
    ];
    let t = TestDb::new().await;
    let (code, out) = thorn_with(&t.url, &bad, &["run"]).await;
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("delivery.timeout") && out.contains("dispatch.batch_size"),
        "{out}"
    );
    // Under journald each of those lines carries its priority, so
    // `journalctl -p err` says why a start failed.
    let (code, err) = under_journald(&t.url, &bad, &["check-config"]).await;
    assert_eq!(code, 64, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines.iter().all(|l| l.starts_with("<3>thorn: ")), "{err}");
    let (code, out) = thorn_with(
        &t.url,
        &bad,
        &[
            "sign",
            "--secret",
            "secret",
            "--timestamp",
            "1",
            "/dev/null",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Hook-HMAC"), "{out}");

    let db = t.client().await;
    db.execute(
        "INSERT INTO thorn.migration (version, name) VALUES ($1, 'from a newer thorn')",
        &[&(thorn::db::migrate::latest() + 1)],
    )
    .await
    .expect("a newer schema");
    for args in [
        &["check-config", "--database", "require"][..],
        &["migrate"],
        &["run"],
    ] {
        let (code, out) = thorn_with(&t.url, &[], args).await;
        assert_eq!(code, 65, "{args:?}: {out}");
        assert!(
            out.contains("newer than this thorn knows"),
            "{args:?}: {out}"
        );
    }
    let (code, err) = under_journald(&t.url, &[], &["run"]).await;
    assert_eq!(code, 65, "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("<3>thorn: ") && l.contains("newer than this thorn knows")),
        "{err}"
    );

    let latin1 =
        TestDb::empty_with("ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
            .await;
    let (code, out) = thorn_with(&latin1.url, &[], &["migrate"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("thorn needs a database in UTF8; this one is in LATIN1"),
        "{out}"
    );
}

/// `thorn subscriber add` refuses a URL the delivery client cannot parse,
/// as the API does (the database's looser pattern let it in, and every
/// delivery was then refused).
#[tokio::test]
async fn subscriber_add_refuses_what_no_delivery_could_use() {
    let t = TestDb::new().await;
    for url in ["http://ex<ample.com/", "http://999.1.1.1/"] {
        let (code, out, err) = thorn_cli(
            &t.url,
            &["subscriber", "add", "--event", "a.*", "--url", url],
        )
        .await;
        assert_ne!(code, 0, "{url}: {out}");
        assert!(err.contains("url: not a URL"), "{url}: {err}");
    }
    let (_, out, _) = thorn_cli(&t.url, &["subscriber", "list", "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("json"),
        Value::Array(vec![])
    );
}

/// Mistakes are named, not reported as nothing to do: an id that names
/// nothing, a database not migrated yet.
#[tokio::test]
async fn commands_name_what_they_cannot_find() {
    let t = TestDb::new().await;
    let nobody = uuid::Uuid::new_v4().to_string();
    for args in [
        &["retry", "--subscriber", &nobody][..],
        &["retry", "--delivery", &nobody],
    ] {
        let (code, out, err) = thorn_cli(&t.url, args).await;
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(err.contains(&nobody), "{args:?}: {err}");
    }
    let empty = TestDb::empty().await;
    let (code, _, err) = thorn_cli(&empty.url, &["status"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("run `thorn migrate`"), "{err}");
}

/// Operator commands say what is wrong in their own words, with a hint
/// only where it helps, and fail where doing nothing would mislead.
#[tokio::test]
async fn operator_commands_name_what_is_wrong() {
    let t = TestDb::new().await;
    let url = &t.url;
    let db = t.client().await;
    db.batch_execute(
        "CREATE TABLE item (id int PRIMARY KEY);
         SELECT thorn.webhook_model('public.item');
         INSERT INTO item VALUES (1);",
    )
    .await
    .expect("an event");
    let sub = crate::support::subscribe(&db, "item.*", "https://example.com/", None, "s").await;
    let delivery: uuid::Uuid = db
        .query_one(
            "INSERT INTO thorn.delivery (id, event_id, subscriber_id)
             SELECT gen_random_uuid(), id, $1 FROM thorn.event RETURNING id",
            &[&sub],
        )
        .await
        .expect("a pending delivery")
        .get(0);

    // Retrying a delivery that is not dead re-queues nothing, and says so.
    let id = delivery.to_string();
    let (code, out, err) = thorn_cli(url, &["retry", "--delivery", &id]).await;
    assert_ne!(code, 0, "{out}");
    assert!(err.contains(&format!("{id} is pending, not dead")), "{err}");
    // Ages count back: --from 2h --to 3h is an empty range.
    let sub_id = sub.to_string();
    let (code, _, err) = thorn_cli(
        url,
        &[
            "replay",
            "--subscriber",
            &sub_id,
            "--from",
            "2h",
            "--to",
            "3h",
        ],
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("--from must be before --to"), "{err}");

    // A config subscriber removed from the config: the database's reason,
    // not its raw error.
    db.batch_execute(
        "SELECT thorn.sync_config_subscribers('{\"c\": {\"event\": \"a\", \"url\": \"https://example.com/\"}}');
         SELECT thorn.sync_config_subscribers('{}');",
    )
    .await
    .expect("a config subscriber, then removed");
    let removed: uuid::Uuid = db
        .query_one(
            "SELECT id FROM thorn.subscriber WHERE config_name = 'c'",
            &[],
        )
        .await
        .expect("removed row")
        .get(0);
    let (code, _, err) = thorn_cli(url, &["subscriber", "enable", &removed.to_string()]).await;
    assert_ne!(code, 0);
    assert!(err.contains("config") && !err.contains("db error"), "{err}");

    // More switched off than the status lists: it says how many.
    db.batch_execute(
        "INSERT INTO thorn.subscriber (event, url, active)
         SELECT 'a', 'https://example.com/' || i, false FROM generate_series(1, 104) AS i",
    )
    .await
    .expect("switched-off subscribers");
    let (code, out, err) = thorn_cli(url, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("deactivated subscribers (100 of 105, changed last):"),
        "{out}"
    );
    let (_, out, _) = thorn_cli(url, &["status", "--json"]).await;
    let status: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(status["deactivated_count"], 105);

    // A table locked for good (a migration gone wrong): the command says
    // so within its lock timeout (10 s) instead of waiting for ever.
    let mut locker = t.client().await;
    let lock = locker.transaction().await.expect("transaction");
    lock.batch_execute("LOCK TABLE thorn.delivery IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let (code, _, err) = thorn_cli(url, &["status"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("lock timeout"), "{err}");
    lock.rollback().await.expect("unlock");

    // Thorn's tables are Django's: no `thorn migrate` hint for them, and
    // the database's error once.
    let (code, _, err) = thorn_cli(url, &["import-thorn"]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("Django") && !err.contains("thorn migrate"),
        "{err}"
    );
    assert_eq!(err.matches("db error").count(), 1, "{err}");
    // Before `thorn migrate`, every command gets the hint, replay too.
    let empty = TestDb::empty().await;
    let (code, _, err) = thorn_cli(
        &empty.url,
        &["replay", "--subscriber", &sub_id, "--event", "1"],
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("run `thorn migrate`"), "{err}");
}
