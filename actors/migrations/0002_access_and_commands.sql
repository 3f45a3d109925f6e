-- Users, API tokens, commands, approval requests and their audit trails.
-- Deleting a user keeps the audit: references to them become NULL.

CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      text NOT NULL CHECK (username ~ '^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$'),
    email         text CHECK (email IS NULL OR length(email) <= 254),
    password_hash text,
    role          text NOT NULL CHECK (role IN ('admin', 'approver', 'user', 'agent')),
    preferences   jsonb NOT NULL DEFAULT '{}'::jsonb,
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz
);
CREATE UNIQUE INDEX users_username_ci ON users (lower(username));
CREATE INDEX users_role_id ON users (role, id);

CREATE TABLE api_tokens (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    token_hash   bytea NOT NULL UNIQUE,
    prefix       text NOT NULL,
    scopes       text[] NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    expires_at   timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_tokens_user ON api_tokens (user_id, id);

CREATE TABLE commands (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id    text NOT NULL UNIQUE CHECK (length(request_id) BETWEEN 1 AND 200),
    user_id       bigint REFERENCES users (id) ON DELETE SET NULL,
    source        text NOT NULL DEFAULT '' CHECK (length(source) <= 100),
    type          text NOT NULL CHECK (type IN ('voice', 'text', 'api', 'scheduled', 'agent')),
    action        text NOT NULL CHECK (length(action) BETWEEN 1 AND 200),
    parameters    jsonb NOT NULL DEFAULT '{}'::jsonb,
    description   text NOT NULL DEFAULT '' CHECK (length(description) <= 2000),
    status        text NOT NULL CHECK (status IN ('pending', 'awaiting_approval', 'approved', 'rejected',
                                                  'expired', 'cancelled', 'running', 'succeeded', 'failed')),
    risk_score    smallint NOT NULL DEFAULT 0 CHECK (risk_score BETWEEN 0 AND 100),
    risk_category text NOT NULL CHECK (risk_category IN ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL')),
    result        jsonb,
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    duration_ms   bigint,
    search        tsvector GENERATED ALWAYS AS (to_tsvector('simple', action || ' ' || description)) STORED
);
-- Keyset pagination: every list order is (column, id), with and without the common filters.
CREATE INDEX commands_created ON commands (created_at, id);
CREATE INDEX commands_user_created ON commands (user_id, created_at, id);
CREATE INDEX commands_status_created ON commands (status, created_at, id);
CREATE INDEX commands_risk ON commands (risk_score, id);
CREATE INDEX commands_search ON commands USING gin (search);

CREATE TABLE approval_requests (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id        bigint REFERENCES commands (id) ON DELETE SET NULL,
    requester_id      bigint REFERENCES users (id) ON DELETE SET NULL,
    action            text NOT NULL CHECK (length(action) BETWEEN 1 AND 200),
    description       text NOT NULL DEFAULT '' CHECK (length(description) <= 2000),
    parameters_digest text NOT NULL,
    risk_score        smallint NOT NULL CHECK (risk_score BETWEEN 0 AND 100),
    risk_category     text NOT NULL CHECK (risk_category IN ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL')),
    status            text NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'expired', 'cancelled')),
    expires_at        timestamptz NOT NULL,
    decided_by        bigint REFERENCES users (id) ON DELETE SET NULL,
    decided_at        timestamptz,
    reason            text CHECK (reason IS NULL OR length(reason) <= 2000),
    created_at        timestamptz NOT NULL DEFAULT now(),
    search            tsvector GENERATED ALWAYS AS (to_tsvector('simple', action || ' ' || description)) STORED
);
CREATE INDEX approvals_created ON approval_requests (created_at, id);
CREATE INDEX approvals_status_created ON approval_requests (status, created_at, id);
CREATE INDEX approvals_requester_created ON approval_requests (requester_id, created_at, id);
CREATE INDEX approvals_pending_expiry ON approval_requests (expires_at) WHERE status = 'pending';
CREATE INDEX approvals_command ON approval_requests (command_id);
CREATE INDEX approvals_search ON approval_requests USING gin (search);

CREATE TABLE command_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id  bigint REFERENCES commands (id) ON DELETE SET NULL,
    from_status text,
    to_status   text NOT NULL,
    actor_id    bigint REFERENCES users (id) ON DELETE SET NULL,
    reason      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX command_events_command ON command_events (command_id, id);

CREATE TABLE approval_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    approval_id bigint REFERENCES approval_requests (id) ON DELETE SET NULL,
    from_status text,
    to_status   text NOT NULL,
    actor_id    bigint REFERENCES users (id) ON DELETE SET NULL,
    reason      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX approval_events_approval ON approval_events (approval_id, id);
