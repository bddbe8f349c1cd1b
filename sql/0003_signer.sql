-- thorn schema, version 3: the per-subscriber Hook-HMAC scheme, and one
-- function that lists every problem of a subscriber row.
--
-- `hmac_signer` = 'sign' (Thorn's `sign`, the default) or 'compat' (Thorn's
-- itsdangerous-style `compat_sign`, for consumers that still verify Thorn's
-- old default during a migration).
--
-- `thorn.subscriber_problems` is the one source of truth for what a valid
-- subscriber is: the validating trigger raises its first problem (naming the
-- column), and the REST API asks it for all of them to answer one 400 that
-- names each bad field.

ALTER TABLE thorn.subscriber
    ADD COLUMN hmac_signer text NOT NULL DEFAULT 'sign',
    ADD CONSTRAINT subscriber_hmac_signer_check CHECK (hmac_signer IN ('sign', 'compat'));

CREATE FUNCTION thorn.subscriber_problems(
    event text, url text, hmac_digest text, content_type text,
    hmac_secret text, hmac_signer text
) RETURNS TABLE (column_name text, problem text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c, p FROM (VALUES
        (1, 'event', CASE WHEN event IS NULL OR NOT thorn.is_pattern(event) THEN
            'must be a pattern of dot-separated segments, each a name or *, '
            || 'without whitespace or empty segments, at most 255 characters' END),
        (2, 'url', CASE WHEN url IS NULL OR NOT thorn.is_webhook_url(url) THEN
            'must be an http:// or https:// URL with a host and no whitespace' END),
        (3, 'hmac_digest', CASE WHEN hmac_digest IS NULL
                OR lower(hmac_digest) NOT IN ('sha1', 'sha224', 'sha256', 'sha384', 'sha512') THEN
            'must be one of sha1, sha224, sha256, sha384, sha512' END),
        (4, 'content_type', CASE WHEN content_type IS NULL
                OR lower(content_type) NOT IN ('application/json', 'application/x-www-form-urlencoded') THEN
            'must be application/json or application/x-www-form-urlencoded' END),
        (5, 'hmac_secret', CASE WHEN hmac_secret IS NULL OR length(hmac_secret) < 6 THEN
            'must be at least 6 characters (leave it out to get 64 random ones)' END),
        (6, 'hmac_signer', CASE WHEN hmac_signer IS NULL
                OR lower(hmac_signer) NOT IN ('sign', 'compat') THEN
            'must be sign (the default) or compat (Thorn''s itsdangerous-style compat_sign)' END)
    ) AS checks(n, c, p)
    WHERE p IS NOT NULL
    ORDER BY n
$$;

CREATE OR REPLACE FUNCTION thorn.subscriber_validate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad record;
BEGIN
    NEW.hmac_digest := lower(NEW.hmac_digest);
    NEW.content_type := lower(NEW.content_type);
    NEW.hmac_signer := lower(NEW.hmac_signer);
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
        NEW.created_at := OLD.created_at;
        IF NEW.active AND NOT OLD.active THEN
            NEW.deactivated_reason := NULL;
        END IF;
    END IF;

    SELECT * INTO bad FROM thorn.subscriber_problems(
        NEW.event, NEW.url, NEW.hmac_digest, NEW.content_type,
        NEW.hmac_secret, NEW.hmac_signer) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'thorn.subscriber.%: %', bad.column_name, bad.problem
            USING ERRCODE = 'check_violation', SCHEMA = 'thorn',
                  TABLE = 'subscriber', COLUMN = bad.column_name;
    END IF;
    RETURN NEW;
END
$$;
