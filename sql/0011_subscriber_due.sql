-- thorn schema, version 11: due deliveries indexed per subscriber.
--
-- Claims walked `delivery_due`, every pending delivery in due order, past
-- the rows they could not take: those of a subscriber at its concurrency
-- limit, and those of an ordered subscriber behind its oldest. One such
-- subscriber with a backlog made every claim, for every subscriber, read
-- that whole backlog: 42 ms per claim at 100,000 rows of a subscriber at
-- its limit, 700 ms at 100,000 rows of an ordered one.
--
-- Claims now go round the subscribers that have pending deliveries, one
-- index descent each, and read from each only the rows it can take
-- (src/db/queue.rs), so their cost follows the number of subscribers, not
-- the rows waiting. This index serves both, in place of `delivery_due`:
-- the same number of index entries per delivery row as before.
CREATE INDEX delivery_subscriber_due ON thorn.delivery (subscriber_id, next_attempt_at)
    WHERE state = 'pending';
DROP INDEX thorn.delivery_due;
