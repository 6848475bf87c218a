"""``pgtenant audit``: the isolation holes of a live database, found from its catalogs.

findings (the checks and one finding), catalog (one bulk read of the catalogs), model (who
is a tenant role and who owns which schema), the checks, baseline, report formats, probe
(the same questions asked live through a running pgtenant) and commands (the CLI).
"""
