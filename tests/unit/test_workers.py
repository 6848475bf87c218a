"""Summing the workers' metrics (workers.merge_expositions)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pgtenant.workers import merge_expositions

A = """# HELP pgtenant_transactions Transactions
# TYPE pgtenant_transactions counter
pgtenant_transactions_total{database="app",tenant_type="sme"} 3.0
# HELP pgtenant_pool_wait_seconds Wait
# TYPE pgtenant_pool_wait_seconds histogram
pgtenant_pool_wait_seconds_bucket{database="app",le="0.1",tenant_type="sme"} 2.0
pgtenant_pool_wait_seconds_bucket{database="app",le="+Inf",tenant_type="sme"} 3.0
pgtenant_pool_wait_seconds_sum{database="app",tenant_type="sme"} 0.5
pgtenant_pool_wait_seconds_count{database="app",tenant_type="sme"} 3.0
# HELP process_start_time_seconds Start
# TYPE process_start_time_seconds gauge
process_start_time_seconds 100.0
# HELP process_max_fds Max
# TYPE process_max_fds gauge
process_max_fds 1024.0
"""
B = A.replace(" 3.0\n", " 4.0\n").replace("100.0", "90.0").replace("1024.0", "4096.0") + (
    '# HELP pgtenant_errors Errors\n# TYPE pgtenant_errors counter\n'
    'pgtenant_errors_total{sqlstate_class="42",tenant="a\\"b"} 1.0\n')


def test_series_are_summed_start_time_is_the_earliest_and_limits_the_largest() -> None:
    merged = merge_expositions([A, B]).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(merged) for s in f.samples}
    sme = (("database", "app"), ("tenant_type", "sme"))
    assert samples[("pgtenant_transactions_total", sme)] == 7.0
    assert samples[("pgtenant_pool_wait_seconds_count", sme)] == 7.0
    assert samples[("pgtenant_pool_wait_seconds_bucket", (*sme[:1], ("le", "+Inf"), sme[1]))
                   ] == 7.0
    assert samples[("process_start_time_seconds", ())] == 90.0
    assert samples[("process_max_fds", ())] == 4096.0
    assert samples[("pgtenant_errors_total", (("sqlstate_class", "42"), ("tenant", 'a"b')))
                   ] == 1.0  # label values are escaped and read back
