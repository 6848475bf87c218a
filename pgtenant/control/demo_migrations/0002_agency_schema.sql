-- pgtenant: scope=shared
-- Agency tenants (type agency, search_path tenant_b, public) get a data model of their own in
-- schema tenant_b (the seed story's "Pattern 1: schema-specific tables"): one row per client
-- entity, and that entity's data. SMEs never write here.
CREATE SCHEMA tenant_b AUTHORIZATION CURRENT_USER;
REVOKE ALL ON SCHEMA tenant_b FROM PUBLIC;
-- UNIQUE (organization_id, id) lets entity_data reference the entity *and* its org:
-- foreign-key checks bypass RLS, so a plain FK would accept another agency's entity id.
CREATE TABLE tenant_b.workspace_entities (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL,
    name            text,
    metadata        jsonb,
    UNIQUE (organization_id, id)
);
CREATE TABLE tenant_b.entity_data (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL,
    entity_id       uuid NOT NULL REFERENCES tenant_b.workspace_entities (id),
    data_type       text NOT NULL,
    content         jsonb,
    FOREIGN KEY (organization_id, entity_id)
        REFERENCES tenant_b.workspace_entities (organization_id, id)
);
ALTER TABLE tenant_b.workspace_entities
    ALTER COLUMN organization_id SET DEFAULT pgtenant.current_tenant();
ALTER TABLE tenant_b.workspace_entities ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_b.workspace_entities FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_b.workspace_entities
    USING      (organization_id = (SELECT pgtenant.current_tenant()))
    WITH CHECK (organization_id = (SELECT pgtenant.current_tenant()));
ALTER TABLE tenant_b.entity_data
    ALTER COLUMN organization_id SET DEFAULT pgtenant.current_tenant();
ALTER TABLE tenant_b.entity_data ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_b.entity_data FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_b.entity_data
    USING      (organization_id = (SELECT pgtenant.current_tenant()))
    WITH CHECK (organization_id = (SELECT pgtenant.current_tenant()));
-- SME writes only public tables, agency writes only tenant_b tables; each may read the
-- other side only as far as the unified view (0004) needs, and RLS hides the rows.
GRANT USAGE ON SCHEMA tenant_b TO tenant_sme, tenant_agency;
GRANT SELECT ON tenant_b.entity_data TO tenant_sme;
GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_b.workspace_entities, tenant_b.entity_data
    TO tenant_agency;
GRANT SELECT ON public.brand_guidelines TO tenant_agency;
-- pgtenant: down
REVOKE SELECT ON public.brand_guidelines FROM tenant_agency;
DROP SCHEMA tenant_b CASCADE;
