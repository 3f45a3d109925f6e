-- The database's identity: lets operators (and several daemons sharing one
-- database) tell which jarvisd database they are looking at.
CREATE TABLE jarvisd_info (
    key        text PRIMARY KEY,
    value      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO jarvisd_info (key, value) VALUES ('database_id', gen_random_uuid()::text);
