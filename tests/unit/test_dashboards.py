"""The dashboard and alert rules query exactly the metrics issues 12 and 14 name."""

from __future__ import annotations

from tests.support.dashboards import (
    alert_expressions,
    dashboard_expressions,
    metric_names,
    queried_metrics,
)

# The issue's list: the gateway's, then the worker's.
ISSUE_METRICS = {
    "botline_requests_total",
    "botline_request_duration_seconds",
    "botline_time_to_first_token_seconds",
    "botline_queue_wait_seconds",
    "botline_streams_open",
    "botline_jobs_in_flight",
    "botline_key_cache_lookups_total",
    "botline_limit_refusals_total",
    "botline_backend_up",
    "botline_worker_jobs_total",
    "botline_worker_jobs_in_flight",
    "botline_upstream_duration_seconds",
    "botline_upstream_time_to_first_token_seconds",
    "botline_upstream_errors_total",
    "botline_tokens_total",
    "botline_worker_redeliveries_total",
    "botline_worker_dead_letters_total",
    "botline_event_loop_lag_seconds",
    # Issue 14's scheduler series.
    "botline_endpoint_state",
    "botline_queue_wait_by_priority_seconds",
}


def test_metric_names_strips_histogram_suffixes_and_ignores_label_values() -> None:
    exprs = [
        "histogram_quantile(0.9, sum by (le) (rate(botline_queue_wait_seconds_bucket[5m])))",
        "botline_request_duration_seconds_sum / botline_request_duration_seconds_count",
        'sum(rate(botline_requests_total{code="botline_not_a_metric"}[1m]))',
        "rabbitmq_queue_messages_ready + my_botline_thing",
        "botline_tokens_total",
    ]
    assert metric_names(exprs) == {
        "botline_queue_wait_seconds",
        "botline_request_duration_seconds",
        "botline_requests_total",
        "botline_tokens_total",
    }


def test_the_dashboard_and_alerts_query_only_and_all_the_issues_metrics() -> None:
    assert dashboard_expressions()
    assert alert_expressions()
    assert queried_metrics() == ISSUE_METRICS


def test_queue_depth_is_rabbitmqs_own_metric() -> None:
    assert any("rabbitmq_queue_messages_ready" in e for e in dashboard_expressions())
