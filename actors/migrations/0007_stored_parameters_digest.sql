-- The digest an approval is bound to is taken over the parameters as
-- PostgreSQL stores them (1e300 and -0.0 are rewritten there): a request made
-- before this version is bound again to its command's stored form.
UPDATE approval_requests a
SET parameters_digest = encode(sha256(convert_to(c.parameters::text, 'UTF8')), 'hex')
FROM commands c
WHERE a.command_id = c.id;
