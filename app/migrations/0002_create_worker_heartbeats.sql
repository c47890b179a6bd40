CREATE TABLE worker_heartbeats (
    id      bigserial PRIMARY KEY,
    worker  text        NOT NULL,
    beat_at timestamptz NOT NULL DEFAULT now()
);
