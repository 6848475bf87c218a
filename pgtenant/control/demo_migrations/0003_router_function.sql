-- pgtenant: scope=shared
-- Writes go through one router function (the seed story's "Pattern 2"): the database, not the
-- application, picks public or tenant_b from the organization's type.
CREATE FUNCTION public.save_resource_routed(
    p_name text, p_data jsonb, p_entity_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, tenant_b, pg_temp
AS $fn$
DECLARE
    -- The org comes only from the injected context, never from a parameter: a caller
    -- cannot name another tenant.
    v_org    uuid := (SELECT pgtenant.current_tenant());
    v_bound  uuid := nullif(current_setting('app.entity_id', true), '')::uuid;
    v_entity uuid := coalesce(p_entity_id, v_bound);
    v_type   text;
    v_id     uuid;
BEGIN
    IF v_org IS NULL THEN
        RAISE EXCEPTION 'save_resource_routed: no tenant context' USING ERRCODE = '42501';
    END IF;
    SELECT o.tenant_type INTO v_type FROM pgtenant.organizations o WHERE o.id = v_org;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'save_resource_routed: unknown organization' USING ERRCODE = '42501';
    END IF;
    IF v_type = 'sme' THEN
        INSERT INTO public.brand_guidelines (org_id, name, guidelines)
        VALUES (v_org, p_name, p_data) RETURNING id INTO v_id;
        RETURN jsonb_build_object('schema', 'public', 'id', v_id);
    ELSIF v_type = 'agency' THEN
        IF v_entity IS NULL THEN
            RAISE EXCEPTION 'save_resource_routed: agency tenants must name an entity'
                USING ERRCODE = '22023';
        END IF;
        IF v_bound IS NOT NULL AND v_entity <> v_bound THEN
            RAISE EXCEPTION 'save_resource_routed: token is bound to another entity'
                USING ERRCODE = '42501';
        END IF;
        -- This function runs as the admin, which bypasses RLS: check ownership by hand.
        PERFORM 1 FROM tenant_b.workspace_entities e
          WHERE e.id = v_entity AND e.organization_id = v_org;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'save_resource_routed: entity % not found', v_entity
                USING ERRCODE = '42501';
        END IF;
        INSERT INTO tenant_b.entity_data (organization_id, entity_id, data_type, content)
        VALUES (v_org, v_entity, 'brand_guidelines',
                jsonb_build_object('name', p_name) || coalesce(p_data, '{}'::jsonb))
        RETURNING id INTO v_id;
        RETURN jsonb_build_object('schema', 'tenant_b', 'id', v_id);
    END IF;
    RAISE EXCEPTION 'save_resource_routed: tenant type % has no resource routing', v_type
        USING ERRCODE = '0A000';
END
$fn$;
-- The seed story lost 6 hours to a missing EXECUTE grant: grant it with the function.
REVOKE EXECUTE ON FUNCTION public.save_resource_routed(text, jsonb, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.save_resource_routed(text, jsonb, uuid)
    TO tenant_sme, tenant_agency;
-- pgtenant: down
DROP FUNCTION public.save_resource_routed(text, jsonb, uuid);
