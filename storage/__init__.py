"""postkeep.storage: the shared data layer.

Schema and migrations (`migrations/*.sql`, applied by `migrate`), the object
store interface (`objects`), the metadata writers and readers that own their
tables (`messages`, `directory`), and the connection pool (`db`).  Every daemon
and the CLI reach PostgreSQL and S3 only through these modules.
"""
