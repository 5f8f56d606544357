-- The consumer applies a batch in one statement, in an implicit transaction, when every
-- event in it is new (src/read/projection.rs, `apply_at_once`): it records the ids and
-- writes what all the events add. This check, in that statement's main query, fails the
-- statement (undoing both) when some id was processed before; the consumer then applies
-- the batch the long way, which folds only the new events. SQLSTATE CQ001 tells this
-- failure from any other.
CREATE FUNCTION consumer_batch_at_once(all_new boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT all_new THEN
        RAISE EXCEPTION 'not applied at once: an event of the batch was processed before'
            USING ERRCODE = 'CQ001';
    END IF;
    RETURN true;
END
$$;
