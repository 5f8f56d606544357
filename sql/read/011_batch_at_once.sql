-- The consumer applies a batch in one statement, in an implicit transaction, when every
-- event in it is new and no pending sums wait for it to fold (src/read/projection.rs,
-- `apply_at_once`): it records the ids and writes what all the events add. This check, in
-- that statement's main query, fails the statement (undoing both) when some id was
-- processed before or the batch took the fold lock with pending rows; the consumer then
-- applies the batch the long way, which folds only the new events and the pending rows.
-- SQLSTATE CQ001 tells this failure from any other.
CREATE FUNCTION consumer_batch_at_once(ok boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION 'not applied at once: an event was processed before, or pending sums wait'
            USING ERRCODE = 'CQ001';
    END IF;
    RETURN true;
END
$$;
