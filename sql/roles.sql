-- thorn: grants for a least-privilege deployment (not a migration).
--
-- Run once after `thorn migrate`, as the owner of schema thorn (the role
-- that ran migrate), e.g.
--
--   psql "$ADMIN_URL" -v daemon=thorn_daemon -f sql/roles.sql
--
-- The daemon role (`thorn run`) then needs nothing else: it claims events,
-- writes deliveries, deactivates subscribers (410 Gone, auto-disable) and
-- prunes old rows. It cannot create objects, read application tables, or
-- add or change subscriptions other than switching them off and writing
-- those of its config's [subscribers] tables. It must be
-- able to LOGIN; CONNECT on the database is granted to PUBLIC by default.
-- The grants themselves are thorn.grant_daemon()'s (sql/0020); later
-- migrations extend them to this role as the schema needs.
--
-- Application roles need no grant here at all: the capture triggers are
-- SECURITY DEFINER functions owned by the schema owner.

SELECT thorn.grant_daemon(:'daemon');
