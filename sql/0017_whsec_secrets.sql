-- thorn schema, version 17: a `whsec_` secret must hold base64.
--
-- A secret that starts with `whsec_` is a Standard Webhooks secret: the
-- `webhook-signature` key is the base64 after the prefix (DESIGN.md §5),
-- as receivers' libraries decode it. One whose rest was not base64 was
-- accepted and then used as plain text, so every such receiver refused
-- every delivery. Now it is refused when it is written, with the other
-- problems of the row; the daemon decodes exactly what is accepted here
-- (padded base64 whose unused bits are zero, at least one byte).
--
-- Rows written before keep working as they did: the trigger judges a
-- secret only when it is set or changed, so a daemon switching such a
-- subscriber off, or marking it failing, is not refused.

CREATE OR REPLACE FUNCTION thorn.subscriber_problems(
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
            'must be at least 6 characters (leave it out to get 64 random ones)'
            WHEN hmac_secret LIKE 'whsec\_%'
                 AND substr(hmac_secret, 7) !~ ('^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{4}'
                     '|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$') THEN
            'a secret starting with whsec_ must go on with the base64 of its key '
            || '(Standard Webhooks), such as whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw' END),
        (6, 'hmac_signer', CASE WHEN hmac_signer IS NULL
                OR lower(hmac_signer) NOT IN ('sign', 'compat') THEN
            'must be sign (the default) or compat (Thorn''s itsdangerous-style compat_sign)' END)
    ) AS checks(n, c, p)
    WHERE p IS NOT NULL
    ORDER BY n
$$;

-- The trigger: a secret that did not change is not judged again. Swap in
-- the one statement rather than restate the function (schema 14 swapped
-- another line of it).
DO $$
DECLARE
    old_call CONSTANT text := 'SELECT * INTO bad FROM thorn.subscriber_problems(
        NEW.event, NEW.url, NEW.hmac_digest, NEW.content_type,
        NEW.hmac_secret, NEW.hmac_signer) LIMIT 1;';
    new_call CONSTANT text := 'SELECT * INTO bad FROM thorn.subscriber_problems(
        NEW.event, NEW.url, NEW.hmac_digest, NEW.content_type,
        NEW.hmac_secret, NEW.hmac_signer) AS p
    WHERE NOT (TG_OP = ''UPDATE'' AND p.column_name = ''hmac_secret''
               AND NEW.hmac_secret IS NOT DISTINCT FROM OLD.hmac_secret)
    LIMIT 1;';
    def text := pg_get_functiondef('thorn.subscriber_validate()'::regprocedure);
BEGIN
    IF strpos(def, old_call) = 0 THEN
        RAISE EXCEPTION 'thorn: subscriber_validate() is not the one schema 14 left';
    END IF;
    EXECUTE replace(def, old_call, new_call);
END
$$;
