-- pgtenant: scope=shared
-- SME tenants (type sme) share public; RLS on org_id is the boundary (the seed story's
-- "Tenant Type A"). The policy reads pgtenant.current_tenant(): the tenant only when the
-- proxy's signature on the injected context verifies, so a forged app.tenant_id sees nothing.
CREATE TABLE public.brand_guidelines (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id     uuid NOT NULL,
    name       text,
    guidelines jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE public.campaigns (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id     uuid NOT NULL,
    name       text,
    budget     numeric,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- A tenant's INSERT may leave org_id out: it defaults to the signed context (no sub-select
-- is allowed in a DEFAULT, hence the bare call); WITH CHECK refuses any other value.
-- FORCE: the table owner is filtered too (superusers still bypass: admin tooling only).
ALTER TABLE public.brand_guidelines ALTER COLUMN org_id SET DEFAULT pgtenant.current_tenant();
ALTER TABLE public.brand_guidelines ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.brand_guidelines FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON public.brand_guidelines
    USING      (org_id = (SELECT pgtenant.current_tenant()))
    WITH CHECK (org_id = (SELECT pgtenant.current_tenant()));
ALTER TABLE public.campaigns ALTER COLUMN org_id SET DEFAULT pgtenant.current_tenant();
ALTER TABLE public.campaigns ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.campaigns FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON public.campaigns
    USING      (org_id = (SELECT pgtenant.current_tenant()))
    WITH CHECK (org_id = (SELECT pgtenant.current_tenant()));
GRANT SELECT, INSERT, UPDATE, DELETE ON public.brand_guidelines, public.campaigns TO tenant_sme;
-- pgtenant: down
DROP TABLE public.campaigns;
DROP TABLE public.brand_guidelines;
