"""postkeep.milter: postkeep-milter, the capture milter Postfix calls.

`adapter` (pymilter callbacks) → `service` (one message's way to a verdict) →
`capture` (byte-exact rebuild, streaming zstd), `decide` (organisation and
replies, pure), `store` (object + rows, through postkeep.storage).  `daemon`
is the process: configuration, logging, metrics, libmilter's loop.
"""
