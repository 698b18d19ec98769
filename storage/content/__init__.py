"""Object storage: where a message's bytes go and how they come back.

`objects` (the S3 interface), `layout` (key names by retention class),
`container` (the stored object's format), `restore` (decompression back to
the exact bytes), `parts` (large MIME parts stored once), `dictionaries`
(per-organisation zstd dictionaries), `spool` (the outage spool on local
disk).  May import the ground floor and storage.metadata.
"""
