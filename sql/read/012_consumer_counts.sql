-- How many consumers (threads subscribed to the event queues) each process has attached.
-- sync-status compares their sum over the rows written in the last few seconds with the
-- consumers the broker counts on the queues: a consumer the broker still feeds but whose
-- process has stopped writing (frozen, or cut off from this database) holds deliveries no
-- row shows, and sync-status then says it cannot count them.
ALTER TABLE consumer_progress ADD COLUMN consumers INTEGER NOT NULL DEFAULT 0 CHECK (consumers >= 0);
