-- Webhook endpoints ([[webhooks]] in the config): how far each got in the
-- event outbox. One daemon at a time delivers (leader by advisory lock).
-- An endpoint gets its matching events in id order, each until it answers
-- 2xx; after max_attempts failures at one event it is marked dead and holds
-- its place until `jarvisd webhooks retry` (nothing is skipped).
CREATE TABLE webhook_endpoints (
    name        text PRIMARY KEY,
    last_id     bigint NOT NULL,             -- every event up to this id is done
    delivered   bigint NOT NULL DEFAULT 0,
    failures    bigint NOT NULL DEFAULT 0,   -- failed attempts, all told
    attempts    integer NOT NULL DEFAULT 0,  -- failed attempts at the next event
    dead        boolean NOT NULL DEFAULT false,
    last_status integer,                     -- the last answer's HTTP status
    last_error  text,
    gaps        bigint NOT NULL DEFAULT 0,   -- times events were pruned before delivery
    updated_at  timestamptz NOT NULL DEFAULT now()
);
