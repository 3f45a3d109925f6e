-- What a person decides on, and how many must decide.
-- parameters: a standalone request's own (a command's request reads its
-- command's); score_rule: what gave the score (a policy rule, the default,
-- or the requester's own higher score); approvals_required / admins_required:
-- the quorum fixed when the request was made; escalated_at: when a request
-- left unanswered was announced to a wider group (once).
ALTER TABLE approval_requests
    ADD COLUMN parameters jsonb,
    ADD COLUMN score_rule text CHECK (score_rule IS NULL OR length(score_rule) <= 300),
    ADD COLUMN approvals_required smallint NOT NULL DEFAULT 1 CHECK (approvals_required BETWEEN 1 AND 10),
    ADD COLUMN admins_required smallint NOT NULL DEFAULT 0,
    ADD COLUMN escalated_at timestamptz,
    ADD CONSTRAINT approval_requests_admins_required
        CHECK (admins_required BETWEEN 0 AND approvals_required);
-- Before quorums, a CRITICAL request needed one approval: an admin's.
UPDATE approval_requests SET admins_required = 1 WHERE risk_category = 'CRITICAL';
CREATE INDEX approvals_pending_escalate ON approval_requests (created_at)
    WHERE status = 'pending' AND escalated_at IS NULL;

-- The approvals of a request that needs more than one person's, one per
-- user (the local admin, who is no user, takes no part in such a quorum);
-- the approval that completes the quorum is also the request's decision. A
-- user deleted while the request waits takes their approval with them (the
-- audit rows in approval_events keep it): a name made again is not them.
CREATE TABLE approval_votes (
    approval_id bigint NOT NULL REFERENCES approval_requests (id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    decider     text NOT NULL CHECK (length(decider) BETWEEN 1 AND 100),
    admin       boolean NOT NULL,
    reason      text CHECK (reason IS NULL OR length(reason) <= 2000),
    -- When the vote was counted (after the request's lock was won): their order.
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (approval_id, user_id)
);
CREATE INDEX approval_votes_user ON approval_votes (user_id);
