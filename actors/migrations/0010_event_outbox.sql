-- The event outbox. Every event is written in the same transaction as the
-- change it announces, with an id that only grows: one identity for every
-- daemon on the database, and writers take a transaction-level advisory
-- lock before taking ids, so ids become visible in order. One daemon at a
-- time relays them to Redis in id order, at least once, and records how far
-- it got in event_relay. Clients resume from an id; events are pruned after
-- events.retention. `body` is the event's JSON after its id ('"type":…}'):
-- the id is written in when the event is sent.
CREATE TABLE events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    kind       text NOT NULL,  -- commands, approvals: the channel beside {prefix}events
    type       text NOT NULL,
    user_id    bigint,
    body       text NOT NULL
);
CREATE INDEX events_created_at ON events (created_at);

CREATE TABLE event_relay (
    name    text PRIMARY KEY,
    last_id bigint NOT NULL
);
INSERT INTO event_relay (name, last_id) VALUES ('redis', 0);
-- Events up to this id may have been pruned: a client resuming from an
-- older id is told it has a gap.
INSERT INTO event_relay (name, last_id) VALUES ('pruned', 0);
