-- Who decided, by name, beside decided_by (a user id): the local admin on the
-- daemon's Unix socket has no user row, and a decision must still say who made it.
ALTER TABLE approval_requests ADD COLUMN decider text CHECK (decider IS NULL OR length(decider) <= 100);
UPDATE approval_requests a SET decider = u.username FROM users u WHERE u.id = a.decided_by;
