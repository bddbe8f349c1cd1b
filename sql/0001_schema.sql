-- thorn schema, version 1: subscribers, the outbox, deliveries and wake-ups.
--
-- Applied by `thorn migrate` inside one transaction, under an advisory lock.
-- Annotation functions (webhook_model & co.) live in 0002_annotate.sql.

CREATE SCHEMA IF NOT EXISTS thorn;
REVOKE ALL ON SCHEMA thorn FROM PUBLIC;

-- A secret of `len` characters from PostgreSQL's CSPRNG (gen_random_uuid uses
-- pg_strong_random). Each uuid gives 14 fully random bytes (bytes 6 and 8 carry
-- the version and variant bits); rejection sampling keeps every character
-- equally likely. The alphabet is Thorn's: letters, digits and punctuation
-- without quotes.
CREATE FUNCTION thorn.random_secret(len integer DEFAULT 64) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    alphabet constant text :=
        'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'
        || '!#$%&()*+,-./:;<=>?@[\]^_`{|}~';
    n constant integer := length(alphabet);
    cutoff constant integer := 256 - 256 % n;
    secret text := '';
    bytes bytea;
    b integer;
BEGIN
    WHILE length(secret) < len LOOP
        bytes := uuid_send(gen_random_uuid());
        FOR i IN 0..15 LOOP
            CONTINUE WHEN i IN (6, 8);
            b := get_byte(bytes, i);
            IF b < cutoff THEN
                secret := secret || substr(alphabet, b % n + 1, 1);
                EXIT WHEN length(secret) = len;
            END IF;
        END LOOP;
    END LOOP;
    RETURN secret;
END
$$;

-- Event patterns: dot-separated segments, each `*` or a name without dots,
-- stars or whitespace. Event names are the same without `*`.
CREATE FUNCTION thorn.is_pattern(p text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT length(p) <= 255 AND p !~ '[[:cntrl:]]'
       AND p ~ '^(\*|[^.*[:space:]]+)(\.(\*|[^.*[:space:]]+))*$'
$$;

CREATE FUNCTION thorn.is_event_name(e text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT length(e) <= 255 AND e !~ '[[:cntrl:]]'
       AND e ~ '^[^.*[:space:]]+(\.[^.*[:space:]]+)*$'
$$;

-- http(s)://[userinfo@]host[:port][/path?query#fragment], no whitespace
-- or control characters, a port (when given) from 1 to 65535. Whether the
-- host is an address deliveries may reach is the daemon's decision (after
-- DNS), not this check's.
CREATE FUNCTION thorn.is_webhook_url(u text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT length(u) <= 2048
       AND u !~ '[[:cntrl:]]'
       AND u ~* '^https?://([^/?#@[:space:]]*@)?(\[[0-9a-f:.]+\]|[^/?#@:[:space:][\]]+)(:[0-9]{1,5})?([/?#][^[:space:]]*)?$'
       AND coalesce((substring(u from '^[^:]+://(?:[^/?#@]*@)?(?:\[[^]]*\]|[^/?#:]*):([0-9]+)'))::integer
                    BETWEEN 1 AND 65535, true)
$$;

CREATE TABLE thorn.subscriber (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event              text NOT NULL,
    url                text NOT NULL,
    owner              text,
    hmac_secret        text NOT NULL DEFAULT thorn.random_secret(),
    hmac_digest        text NOT NULL DEFAULT 'sha256',
    content_type       text NOT NULL DEFAULT 'application/json',
    active             boolean NOT NULL DEFAULT true,
    ordered            boolean NOT NULL DEFAULT false,
    deactivated_reason text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- Backstops for writers that bypass the validating trigger below
    -- (session_replication_role = replica disables triggers).
    CONSTRAINT subscriber_event_check CHECK (thorn.is_pattern(event)),
    CONSTRAINT subscriber_url_check CHECK (thorn.is_webhook_url(url)),
    CONSTRAINT subscriber_hmac_digest_check
        CHECK (hmac_digest IN ('sha1', 'sha224', 'sha256', 'sha384', 'sha512')),
    CONSTRAINT subscriber_content_type_check
        CHECK (content_type IN ('application/json', 'application/x-www-form-urlencoded'))
);
CREATE INDEX subscriber_owner ON thorn.subscriber (owner);

-- Normalises and validates a subscriber row, raising an error that names the
-- column, so that `INSERT INTO thorn.subscriber` tells a person what to fix.
CREATE FUNCTION thorn.subscriber_validate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad_column text;
    problem text;
BEGIN
    NEW.hmac_digest := lower(NEW.hmac_digest);
    NEW.content_type := lower(NEW.content_type);
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
        NEW.created_at := OLD.created_at;
        IF NEW.active AND NOT OLD.active THEN
            NEW.deactivated_reason := NULL;
        END IF;
    END IF;

    IF NEW.event IS NULL OR NOT thorn.is_pattern(NEW.event) THEN
        bad_column := 'event';
        problem := 'must be a pattern of dot-separated segments, each a name or *, '
                || 'without whitespace or empty segments, at most 255 characters';
    ELSIF NEW.url IS NULL OR NOT thorn.is_webhook_url(NEW.url) THEN
        bad_column := 'url';
        problem := 'must be an http:// or https:// URL with a host and no whitespace';
    ELSIF NEW.hmac_digest IS NULL
          OR NEW.hmac_digest NOT IN ('sha1', 'sha224', 'sha256', 'sha384', 'sha512') THEN
        bad_column := 'hmac_digest';
        problem := 'must be one of sha1, sha224, sha256, sha384, sha512';
    ELSIF NEW.content_type IS NULL
          OR NEW.content_type NOT IN ('application/json', 'application/x-www-form-urlencoded') THEN
        bad_column := 'content_type';
        problem := 'must be application/json or application/x-www-form-urlencoded';
    ELSIF NEW.hmac_secret IS NULL OR length(NEW.hmac_secret) < 6 THEN
        bad_column := 'hmac_secret';
        problem := 'must be at least 6 characters (leave it out to get 64 random ones)';
    END IF;

    IF bad_column IS NOT NULL THEN
        RAISE EXCEPTION 'thorn.subscriber.%: %', bad_column, problem
            USING ERRCODE = 'check_violation', SCHEMA = 'thorn',
                  TABLE = 'subscriber', COLUMN = bad_column;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER subscriber_validate
    BEFORE INSERT OR UPDATE ON thorn.subscriber
    FOR EACH ROW EXECUTE FUNCTION thorn.subscriber_validate();

-- Bumped by every statement that changes subscribers, in the same
-- transaction: daemons cache the active subscribers and reload them when the
-- version they read before dispatching differs from their cache's.
CREATE TABLE thorn.subscriber_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL
);
INSERT INTO thorn.subscriber_version VALUES (true, 1);

CREATE FUNCTION thorn.subscriber_bump_version() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE thorn.subscriber_version SET version = version + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER subscriber_bump_version
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON thorn.subscriber
    FOR EACH STATEMENT EXECUTE FUNCTION thorn.subscriber_bump_version();

-- The outbox. Rows are written by the capture triggers in the application's
-- transaction; `dispatched_at` is set once deliveries have been created.
CREATE TABLE thorn.event (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text NOT NULL,
    ref           text,
    sender        text,
    data          jsonb NOT NULL,
    source        regclass,
    created_at    timestamptz NOT NULL DEFAULT now(),
    dispatched_at timestamptz
);
CREATE INDEX event_pending ON thorn.event (id) WHERE dispatched_at IS NULL;
CREATE INDEX event_created_at ON thorn.event (created_at);

-- One row per (event, matching subscriber). A claim pushes next_attempt_at
-- one lease into the future, so a daemon that dies mid-delivery simply lets
-- the lease run out and another claim picks the row up again.
CREATE TABLE thorn.delivery (
    id              uuid PRIMARY KEY,
    event_id        bigint NOT NULL REFERENCES thorn.event (id) ON DELETE CASCADE,
    subscriber_id   uuid NOT NULL REFERENCES thorn.subscriber (id) ON DELETE CASCADE,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    status_code     integer,
    error_class     text,
    error           text,
    duration_ms     integer,
    response        text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX delivery_due ON thorn.delivery (next_attempt_at) WHERE state = 'pending';
CREATE INDEX delivery_event ON thorn.delivery (event_id);
CREATE INDEX delivery_subscriber_pending ON thorn.delivery (subscriber_id, event_id)
    WHERE state = 'pending';

-- Daemons that are asleep and want a NOTIFY. Capture triggers only notify
-- while this table has a row, because a notifying transaction takes a
-- cluster-wide lock at commit and would serialise every writer (DESIGN §4).
-- Unlogged: after a crash it is simply empty, and daemons re-arm.
CREATE UNLOGGED TABLE thorn.waiter (
    pid   integer PRIMARY KEY,
    since timestamptz NOT NULL DEFAULT now()
);
