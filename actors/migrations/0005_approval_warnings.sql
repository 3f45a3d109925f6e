-- When the warning that a pending request is about to expire was announced
-- (approval.warning), so that it is announced once.
ALTER TABLE approval_requests ADD COLUMN warned_at timestamptz;
CREATE INDEX approvals_pending_warn ON approval_requests (expires_at) WHERE status = 'pending' AND warned_at IS NULL;
