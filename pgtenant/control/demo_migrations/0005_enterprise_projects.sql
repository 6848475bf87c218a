-- pgtenant: scope=tenant
-- Enterprise tenants (schema per tenant: schema t_<slug>, role t_<slug>) each get their own
-- projects table. The runner sets search_path to the tenant's schema alone, so the name is
-- unqualified; the schema's default privileges (set by `tenant create` for the admin) give
-- the tenant's role DML on it. SME and agency tenants have no schema: this never runs for them.
CREATE TABLE projects (
    id   serial PRIMARY KEY,
    name text
);
-- pgtenant: down
DROP TABLE projects;
