-- Why a pull's last run failed: 1 when a new run cannot help until something changes
-- upstream or on disk (manifest gone, access denied, a corrupt destination), 0 when a new
-- run with a fresh budget may finish it. `resume` still tries both, one after the other.
ALTER TABLE pulls ADD COLUMN permanent INTEGER NOT NULL DEFAULT 0;
