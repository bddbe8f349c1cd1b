-- thorn schema, version 22: a custom secret may be as short as its owner
-- wants, though not empty.
--
-- Custom secrets had to be at least 6 characters. Thorn set no minimum,
-- and its own known answers sign with the key `KEY`: `thorn import-thorn`
-- skipped every Thorn subscriber whose secret was shorter, and its
-- consumers, verifying with that secret, could not be carried over; an
-- INSERT with such a secret, which DESIGN.md's table allows, was refused.
-- A custom secret is the subscriber's choice about its own endpoint (the
-- default stays 64 random characters), so only NULL and the empty string
-- are refused now, each with its own message.
--
-- Swap the rule in subscriber_problems (sql/0017) rather than restate it.

DO $$
DECLARE
    old_rule CONSTANT text := $old$CASE WHEN hmac_secret IS NULL OR length(hmac_secret) < 6 THEN
            'must be at least 6 characters (leave it out to get 64 random ones)'$old$;
    new_rule CONSTANT text := $new$CASE WHEN hmac_secret IS NULL THEN
            'must not be null (leave it out to get 64 random ones)'
            WHEN hmac_secret = '' THEN
            'must not be empty (leave it out to get 64 random ones)'$new$;
    def text := pg_get_functiondef(
        'thorn.subscriber_problems(text, text, text, text, text, text)'::regprocedure);
BEGIN
    IF strpos(def, old_rule) = 0 THEN
        RAISE EXCEPTION 'thorn: subscriber_problems() is not the one schema 17 left';
    END IF;
    EXECUTE replace(def, old_rule, new_rule);
END
$$;
