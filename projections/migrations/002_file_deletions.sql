-- File deletions, remembered independently of the file row: on a replay the FileDeleted of a
-- batch's input or output file may be projected before the BatchCreated that references it
-- (they travel on different topics), and the later insert must still see the deletion.
CREATE TABLE file_deletions (
    file_id     uuid PRIMARY KEY,
    deleted_at  timestamptz NOT NULL
);
CREATE INDEX batches_output_file ON batches (output_file_id);
CREATE INDEX batches_error_file ON batches (error_file_id);
