"""postkeep.milter: postkeep-milter, the capture milter Postfix calls.

`adapter` (pymilter callbacks) → `service` (one message's way to a verdict) →
`capture` (byte-exact rebuild, streaming zstd), `decide` (organisation and
replies, pure), `directory` (cached organisation lookups), `committer` (group
commit of objects + rows, through postkeep.storage).  `daemon` is the process:
configuration, logging, metrics, libmilter's loop.
"""
