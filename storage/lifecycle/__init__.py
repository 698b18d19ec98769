"""What ends: retention runs, lifecycle rules, erasure, holds, statistics.

`retention` (one pass: partitions, content expiry, partition drops), `rules`
(the S3 lifecycle rules per retention class), `erasure` (one address's mail
on request), `holds` (keeping what a legal hold covers out of reach),
`stats` (daily statistics that outlive the rows).  May import the ground
floor, storage.metadata and storage.content.
"""
