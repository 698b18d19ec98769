-- 0024: no JIT compilation for postkeep's database.
--
-- postkeep's queries are short lookups, but over partitioned tables: with a
-- retention of years a search's plan spans hundreds of partitions, and
-- PostgreSQL's JIT (on by default, triggered by the summed cost estimate)
-- spent 25 s compiling a plan that runs in 3 ms.  The daemons and the CLI
-- also ask for jit=off on connecting (postkeep/config.py); this covers the
-- dashboards' tenant logins, which connect by themselves.  New sessions only.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET jit = off', current_database());
END $$;
