"""Identity: tokens, the tenant registry, and identity -> tenant context."""
