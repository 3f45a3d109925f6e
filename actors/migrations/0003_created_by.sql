-- Who created a command or an approval request, beside on whose behalf it is
-- (user_id / requester_id): nobody decides a request they created, whoever
-- it was made for. NULL for rows made by the daemon itself (the agent bus).
ALTER TABLE commands ADD COLUMN created_by bigint REFERENCES users (id) ON DELETE SET NULL;
ALTER TABLE approval_requests ADD COLUMN created_by bigint REFERENCES users (id) ON DELETE SET NULL;
UPDATE commands SET created_by = user_id;
UPDATE approval_requests SET created_by = requester_id;
