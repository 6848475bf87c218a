-- pgtenant: scope=shared
-- Reads across both shapes through one view (the seed story's "Pattern 3"). security_invoker:
-- the caller's privileges and RLS apply; without it the view would read as its owner and
-- bypass RLS.
CREATE VIEW public.resources_unified WITH (security_invoker = on) AS
    SELECT id, org_id AS organization_id, NULL::uuid AS entity_id, guidelines AS data,
           'public'::text AS source
      FROM public.brand_guidelines
    UNION ALL
    SELECT id, organization_id, entity_id, content AS data, 'tenant_b'::text AS source
      FROM tenant_b.entity_data
     WHERE data_type = 'brand_guidelines';
GRANT SELECT ON public.resources_unified TO tenant_sme, tenant_agency;
-- pgtenant: down
DROP VIEW public.resources_unified;
