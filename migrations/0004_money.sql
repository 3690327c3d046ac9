-- Money: what each client's requests cost (nano-dollars, per model and
-- day, beside its tokens), and a client's budget per period.
ALTER TABLE client_usage ADD COLUMN cost_nanousd BIGINT NOT NULL DEFAULT 0;
ALTER TABLE clients ADD COLUMN budget_usd DOUBLE PRECISION;
ALTER TABLE clients ADD COLUMN budget_period TEXT;
