-- 0023: erasing an address keeps it suppressed, under a pseudonym.
--
-- `postkeep erase` removes an address from an organisation's mail.  Taking
-- it off the suppression list as well would mail again the person who
-- complained, unsubscribed or whose mailbox bounced: an erasure request is
-- no consent to be mailed.  So the entry stays, with the address replaced by
-- suppression_erased_key(): 'sha256:' and the hex SHA-256 of the
-- organisation's id, ':' and the lower-cased address.  postkeep-policyd
-- looks up both forms (two probes of the primary key), so the address is
-- still refused while no table holds it in the clear.  What this does not
-- promise: anyone who can read the table and guesses the address can
-- confirm the guess (the hash is unkeyed, salted per organisation only).
-- Its soft-bounce history is deleted (it names the address).

CREATE FUNCTION suppression_erased_key(p_org uuid, p_address text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT 'sha256:' || encode(sha256(convert_to(
        p_org::text || ':' || lower(suppression_address(p_address)), 'UTF8')), 'hex')
$$;
