CREATE INDEX items_created_at_idx ON items (created_at DESC);
CREATE INDEX worker_heartbeats_beat_at_idx ON worker_heartbeats (beat_at DESC);
