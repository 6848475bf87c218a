-- pgtenant: scope=shared
-- pgtenant: transaction=off
-- Every tenant query filters on the tenant column (the policies add it to each one): an index
-- that starts with it keeps one tenant's query from scanning every tenant's rows (the
-- article's "(tenant_id, created_at)" indexes); `pgtenant audit` reports a tenant table
-- without one. CONCURRENTLY, alone in its file, outside a transaction: the table stays
-- writable while the index builds, as it must on a live fleet.
CREATE INDEX CONCURRENTLY brand_guidelines_org_created ON public.brand_guidelines (org_id, created_at);
-- pgtenant: down
DROP INDEX CONCURRENTLY public.brand_guidelines_org_created;
