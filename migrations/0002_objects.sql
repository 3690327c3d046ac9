-- Which node holds each stored object a client created through the
-- gateway (a file, a batch, a stored response...), and whose it is: the
-- gateway routes every later request that names the object there, and
-- only for its owner. `client_id` is '' for the shared group (the open
-- gateway, and keys from auth.client_keys_env).
CREATE TABLE IF NOT EXISTS objects (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    node TEXT NOT NULL,
    client_id TEXT NOT NULL,
    -- Unix seconds, as the object says (for lists in the API's order).
    created_at BIGINT NOT NULL,
    -- Unix seconds; NULL keeps the record until the object is deleted.
    expires_at BIGINT
);

CREATE INDEX IF NOT EXISTS objects_by_owner ON objects (client_id, kind, created_at);
