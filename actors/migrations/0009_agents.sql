-- Agents that talk to jarvisd on Redis, each as a Redis ACL user of its own
-- that jarvisd manages: allowed only to append to its own inbox and to use
-- the channels an agent may. The sender of an envelope is known from the
-- inbox it arrived on. The password is shown once; Redis is given its SHA-256.
CREATE TABLE agents (
    user_id     bigint PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    secret_hash text NOT NULL CHECK (secret_hash ~ '^[0-9a-f]{64}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
