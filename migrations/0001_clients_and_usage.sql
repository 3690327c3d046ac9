-- Portable across SQLite and PostgreSQL: both run this file as it is.
-- A client's key is never stored: only its SHA-256 (hex) and a short prefix
-- for people to recognise it by.
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    rpm BIGINT,
    tpm BIGINT,
    burst BIGINT,
    rate_per_second DOUBLE PRECISION,
    -- A JSON array of model names; NULL allows every model.
    models TEXT,
    enabled BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- What each client used, per model and UTC day. Rows are added to in
-- batches; a client's rows go with it.
CREATE TABLE IF NOT EXISTS client_usage (
    client_id TEXT NOT NULL,
    model TEXT NOT NULL,
    day TEXT NOT NULL,
    requests BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    request_bytes BIGINT NOT NULL,
    response_bytes BIGINT NOT NULL,
    PRIMARY KEY (client_id, model, day)
);
