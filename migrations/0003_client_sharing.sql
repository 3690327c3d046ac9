-- How a client shares a saturated pool: its class and weight, and its own
-- cap on requests in flight. Existing clients are "normal", weight 1.
ALTER TABLE clients ADD COLUMN max_concurrency BIGINT;
ALTER TABLE clients ADD COLUMN priority TEXT NOT NULL DEFAULT 'normal';
ALTER TABLE clients ADD COLUMN weight DOUBLE PRECISION NOT NULL DEFAULT 1;
