-- pgtenant: scope=shared
-- pgtenant: transaction=off
-- Every tenant query filters on the tenant column (the policies add it to each one): an index
-- that starts with it keeps one tenant's query from scanning every tenant's rows (the
-- article's "(tenant_id, created_at)" indexes); `pgtenant audit` reports a tenant table
-- without one. CONCURRENTLY, alone in its file, outside a transaction: the table stays
-- writable while the index builds, as it must on a live fleet.
CREATE INDEX CONCURRENTLY entity_data_org_entity ON tenant_b.entity_data (organization_id, entity_id);
-- pgtenant: down
DROP INDEX CONCURRENTLY tenant_b.entity_data_org_entity;
