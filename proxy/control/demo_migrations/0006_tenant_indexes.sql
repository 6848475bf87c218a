-- pgtenant: scope=shared
-- Every tenant query filters on the tenant column (the policies add it to each one): an index
-- that starts with it keeps a tenant's query from scanning every tenant's rows (the article's
-- "(tenant_id, created_at)" indexes). `pgtenant audit` reports a tenant table without one.
-- tenant_b.workspace_entities has one already: its UNIQUE (organization_id, id).
CREATE INDEX brand_guidelines_org_created ON public.brand_guidelines (org_id, created_at);
CREATE INDEX campaigns_org_created ON public.campaigns (org_id, created_at);
CREATE INDEX entity_data_org_entity ON tenant_b.entity_data (organization_id, entity_id);
-- pgtenant: down
DROP INDEX tenant_b.entity_data_org_entity;
DROP INDEX public.campaigns_org_created;
DROP INDEX public.brand_guidelines_org_created;
