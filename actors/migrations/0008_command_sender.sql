-- Who sent each command, as the daemon knows it (never as the sender says):
-- 'user:<username>' for a caller of the HTTP API, 'agent:<name>' for an agent
-- on its own Redis inbox, 'inbox' for the shared inbox of trusted writers.
-- A requestId belongs to its sender: unique per sender, not across them.
ALTER TABLE commands ADD COLUMN sender text NOT NULL DEFAULT 'inbox'
    CHECK (length(sender) BETWEEN 1 AND 100);
UPDATE commands c SET sender = 'user:' || u.username FROM users u WHERE u.id = c.created_by;
ALTER TABLE commands DROP CONSTRAINT commands_request_id_key;
CREATE UNIQUE INDEX commands_sender_request ON commands (sender, request_id);
ALTER TABLE commands ALTER COLUMN sender DROP DEFAULT;
