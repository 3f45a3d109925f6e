-- Login sessions live in Redis, which agents can write: each record carries a
-- MAC under this key, kept here where no agent reaches. Replacing the value
-- (jarvisd logins rotate-key) ends every login session.
INSERT INTO jarvisd_info (key, value)
VALUES ('login_session_key', replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''))
ON CONFLICT (key) DO NOTHING;

-- Raised by every password change, disable and enable: a login session is
-- valid only under the version it was made with, however it was changed
-- (HTTP or the command line) and whether or not Redis heard of it.
ALTER TABLE users ADD COLUMN credentials_version bigint NOT NULL DEFAULT 1;
