"""Grafana dashboards and provisioning: every query uses only metrics (and labels) that a run exports.

The metric names of a PromQL expression are found by a small tokenizer (`promql_selectors`) rather
than a regular expression over the text, so that function names, aggregation keywords, grouping
label lists, range selectors, durations, strings and Grafana variables are never taken for metrics.
The end-to-end test (`tests/e2e/test_prometheus.py`) uses the same helpers against a running run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchard.services.control.service import RunLabelled
from orchard.services.metrics import RunMetrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
#: Labels Prometheus attaches to every scraped series (the target's), not part of the exposition.
TARGET_LABELS = frozenset({"instance", "job"})

# ------------------------------------------------------------------------------------------ PromQL

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
  | (?P<number>(?:0[xX][0-9a-fA-F]+|\d[\w.]*|\.\d[\w]*))
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@])
    """,
    re.VERBOSE,
)
#: Keywords and modifiers that look like identifiers (PromQL keywords are case-insensitive).
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
#: Keywords followed by a parenthesised list of label names.
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


@dataclass(frozen=True)
class Selector:
    """One vector selector: a metric name and the label names its matchers use."""

    metric: str
    labels: frozenset[str] = field(default_factory=frozenset)


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot tokenize PromQL at {position}: {expr[position : position + 30]!r}")
        position = match.end()
        kind = match.lastgroup
        if kind != "space":
            tokens.append((kind, match.group()))
    return tokens


def _matchers(tokens: list[tuple[str, str]], start: int) -> tuple[dict[str, str], int]:
    """The `label op "value"` matchers of the block opening at `tokens[start]` ("{"), and the index after it."""
    matchers: dict[str, str] = {}
    index = start + 1
    while index < len(tokens) and tokens[index] != ("op", "}"):
        kind, text = tokens[index]
        if kind == "ident" and index + 2 < len(tokens) and tokens[index + 1][1] in ("=", "!=", "=~", "!~"):
            value_kind, value = tokens[index + 2]
            matchers[text] = value[1:-1] if value_kind == "string" else value
            index += 3
        elif kind == "string":  # {"metric_name"} form of newer Prometheus
            matchers["__name__"] = text[1:-1]
            index += 1
        else:
            index += 1
    if index >= len(tokens):
        raise ValueError("unclosed label matcher block")
    return matchers, index + 1


def _is_grouping_keyword(token: tuple[str | None, str | None]) -> bool:
    return token[0] == "ident" and token[1].lower() in ("by", "without")


def promql_analyse(expr: str) -> tuple[list[Selector], set[str]]:
    """The vector selectors of a PromQL expression and the label names of its by/without/on/... lists."""
    tokens = _tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else (None, None)
        if kind == "op" and text == "[":  # range or subquery selector: durations, variables, ':'
            depth = 1
            while depth and index + 1 < len(tokens):
                index += 1
                depth += {"[": 1, "]": -1}.get(tokens[index][1], 0) if tokens[index][0] == "op" else 0
            index += 1
        elif kind == "op" and text == "{":  # selector without a name: {__name__="..."}
            matchers, index = _matchers(tokens, index)
            if "__name__" in matchers:
                selectors.append(Selector(matchers.pop("__name__"), frozenset(matchers)))
        elif kind == "ident" and text.lower() in _LABEL_LIST_KEYWORDS:
            index += 1
            if index < len(tokens) and tokens[index] == ("op", "("):
                index += 1
                while index < len(tokens) and tokens[index] != ("op", ")"):
                    if tokens[index][0] == "ident":
                        grouping.add(tokens[index][1])
                    index += 1
                index += 1
        elif kind == "ident" and (following == ("op", "(") or _is_grouping_keyword(following)):
            index += 1  # a function, or an aggregation (`sum by (le) (...)` puts the clause first)
        elif kind == "ident" and text.lower() in _KEYWORDS:
            index += 1
        elif kind == "ident":
            index += 1
            labels: dict[str, str] = {}
            if index < len(tokens) and tokens[index] == ("op", "{"):
                labels, index = _matchers(tokens, index)
            selectors.append(Selector(text, frozenset(labels)))
        else:
            index += 1
    return selectors, grouping


def promql_metric_names(expr: str) -> set[str]:
    return {selector.metric for selector in promql_analyse(expr)[0]}


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<expr>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.DOTALL)
_METRICS_QUERY = re.compile(r"^\s*metrics\((?P<regex>.*)\)\s*$")


def variable_expression(query: str) -> str | None:
    """The PromQL inside a Grafana Prometheus variable query (`label_values(EXPR, label)`, `query_result(EXPR)`)."""
    match = _LABEL_VALUES.match(query)
    if match:
        return match.group("expr")
    match = re.match(r"^\s*query_result\((?P<expr>.*)\)\s*$", query, re.DOTALL)
    if match:
        return match.group("expr")
    if _METRICS_QUERY.match(query):
        return None
    return query


# --------------------------------------------------------------------------------- dashboards


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def iter_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))  # rows, collapsed or not


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of a dashboard."""
    queries = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or variable.get("definition", "")
        expr = variable_expression(query)
        if expr:
            queries.append((f"variable {variable['name']!r}", expr))
    return queries


def all_dashboard_queries() -> list[tuple[str, str]]:
    return [
        (f"{path.name}: {where}", expr)
        for path in dashboard_files()
        for where, expr in dashboard_queries(json.loads(path.read_text()))
    ]


def dashboard_metric_names() -> set[str]:
    return {name for _, expr in all_dashboard_queries() for name in promql_metric_names(expr)}


# --------------------------------------------------------------------------------- exposition


def exposed_labels(exposition: str) -> dict[str, set[str]]:
    """Each sample name of a Prometheus text exposition (`_bucket`, `_sum`, `_count`, `_total` included)
    with the label names its samples carry."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def missing_from_exposition(exposition: str) -> list[str]:
    """Every dashboard reference that the exposition cannot answer: an unknown metric, or a matcher or
    grouping label that none of the query's metrics carries. Empty when the dashboards are sound."""
    exposed = exposed_labels(exposition)
    problems = []
    for where, expr in all_dashboard_queries():
        selectors, grouping = promql_analyse(expr)
        available = set(TARGET_LABELS)
        for selector in selectors:
            if selector.metric not in exposed:
                problems.append(f"{where}: metric {selector.metric} is not exported")
                continue
            available |= exposed[selector.metric]
            unknown = selector.labels - exposed[selector.metric] - TARGET_LABELS
            if unknown:
                problems.append(f"{where}: {selector.metric} has no label {sorted(unknown)}")
        unknown_grouping = grouping - available
        if unknown_grouping and all(s.metric in exposed for s in selectors):
            problems.append(f"{where}: grouping by {sorted(unknown_grouping)}, which no metric of it carries")
    return problems


def populated_metrics() -> RunMetrics:
    """A `RunMetrics` given a value by each of its update methods, as the driver does during a run."""
    metrics = RunMetrics()
    metrics.set_state("running")
    metrics.set_distributions({"addition/easy": 0.5, "sorting/easy": 0.5})
    metrics.declare_filter_reasons(["all_correct", "all_wrong"])
    metrics.declare_workers(["0", "1"])
    metrics.observe_rollout("0", tokens=120, groups=4)
    metrics.observe_filtered("all_wrong", 2)
    metrics.observe_tool_calls({("python", "ok"): 3, ("python", "limit"): 1})
    metrics.observe_buffer(ready=3, pending=1)
    metrics.observe_weight_sync(0.02)
    metrics.observe_worker_version("0", 1)
    metrics.observe_step(
        step=1,
        policy_version=1,
        seconds=0.4,
        loss=0.1,
        kl=0.0,
        entropy=1.2,
        reward_by_distribution={"addition/easy": 0.0, "sorting/easy": 0.5},
        staleness=[0, 1],
        learner_idle_fraction=0.3,
        mismatch=(1.6e-13, 3.8e-7),
        critic=(0.02, 0.45),
    )
    metrics.observe_eval(0.25)
    metrics.set_workers(2)
    metrics.observe_scale("up", "request")
    return metrics


# ------------------------------------------------------------------------------------- tests


def test_promql_names_skip_functions_keywords_labels_ranges_and_variables():
    expr = (
        'histogram_quantile(0.95, sum by (le, worker) (rate(orchard_x_bucket{instance="$instance",'
        ' state=~"a|b}"}[$__rate_interval] offset 5m)))'
    )
    selectors, grouping = promql_analyse(expr)
    assert selectors == [Selector("orchard_x_bucket", frozenset({"instance", "state"}))]
    assert grouping == {"le", "worker"}


def test_promql_binary_operators_vector_matching_and_aggregation_clause_after():
    expr = (
        'orchard_a - on (instance, job) group_right orchard_b{worker!="0"} '
        "and sum(rate(orchard_c_total[1m:10s])) without (reason) > bool 1e-3 "
        "or avg(orchard_d) by (distribution) unless orchard_e @ start() or 60 * -Inf"
    )
    selectors, grouping = promql_analyse(expr)
    assert [s.metric for s in selectors] == ["orchard_a", "orchard_b", "orchard_c_total", "orchard_d", "orchard_e"]
    assert selectors[1].labels == {"worker"}
    assert grouping == {"instance", "job", "reason", "distribution"}


def test_promql_name_matcher_and_grafana_variables():
    assert promql_metric_names('{__name__="orchard_kl", instance="${instance}"} * $scale') == {"orchard_kl"}
    assert promql_metric_names("rate(orchard_y[${interval}]) / [[old_style]]") == {"orchard_y"}
    assert variable_expression("label_values(orchard_learner_step, instance)") == "orchard_learner_step"
    assert variable_expression("label_values(instance)") is None
    assert variable_expression("query_result(topk(3, orchard_z))") == "topk(3, orchard_z)"


def test_there_is_a_dashboard_and_every_file_is_a_grafana_dashboard():
    assert [path.name for path in dashboard_files()] == ["orchard-run.json"]
    for path in dashboard_files():
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"], path.name
        assert dashboard["schemaVersion"] >= 36, path.name
        ids = [panel["id"] for panel in iter_panels(dashboard["panels"])]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"


def test_every_panel_queries_prometheus_through_the_datasource_variable():
    for path in dashboard_files():
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for panel in iter_panels(dashboard["panels"]):
            if panel["type"] == "row":
                continue
            where = f"{path.name}: panel {panel.get('title')!r}"
            assert panel.get("targets"), f"{where} has no query"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            for target in panel["targets"]:
                assert target.get("expr", "").strip(), f"{where} target {target.get('refId')} has no expression"
                assert target["datasource"]["uid"] == "${datasource}", where
                assert promql_metric_names(target["expr"]), f"{where}: {target['expr']!r} names no metric"


def test_dashboard_covers_a_runs_health():
    used = dashboard_metric_names()
    wanted = {
        "orchard_run_state",
        "orchard_learner_step",
        "orchard_policy_version",
        "orchard_worker_policy_version",
        "orchard_reward_mean",
        "orchard_eval_accuracy",
        "orchard_learner_loss",
        "orchard_kl",
        "orchard_entropy",
        "orchard_learner_step_seconds_bucket",
        "orchard_sample_staleness_bucket",
        "orchard_weight_sync_seconds_bucket",
        "orchard_rollout_tokens_total",
        "orchard_rollout_groups_total",
        "orchard_buffer_groups",
        "orchard_scheduler_probability",
        "orchard_filtered_groups_total",
        "orchard_learner_idle_fraction",
        "orchard_value_model_error",
        "orchard_mcts_nodes_expanded_total",
        "orchard_rollout_workers",
        "orchard_rollout_scale_changes_total",
    }
    assert wanted <= used, sorted(wanted - used)


def served(metrics: RunMetrics, run_id: str = "demo-1") -> str:
    """`metrics` as the control plane serves them: every series labelled with its run."""
    registry = CollectorRegistry()
    registry.register(RunLabelled(lambda: [SimpleNamespace(id=run_id, metrics=metrics)]))
    return generate_latest(registry).decode()


def test_every_dashboard_metric_and_label_is_exported_by_run_metrics():
    assert missing_from_exposition(served(populated_metrics())) == []


def test_every_query_selects_one_run_of_one_control_plane():
    panels = [(where, expr) for where, expr in all_dashboard_queries() if ": variable " not in where]
    assert len(panels) > 40
    for where, expr in panels:
        selectors, _ = promql_analyse(expr)
        for selector in selectors:
            assert {"instance", "run"} <= selector.labels, f"{where}: {selector.metric} is not narrowed to $run"
    variables = {v["name"]: v for v in json.loads((DASHBOARDS / "orchard-run.json").read_text())["templating"]["list"]}
    assert variables["run"]["query"]["query"] == 'label_values(orchard_learner_step{instance="$instance"}, run)'


def test_the_check_catches_a_metric_or_label_that_is_not_exported():
    exposition = served(populated_metrics())
    exposed = exposed_labels(exposition)
    assert "orchard_learner_step_seconds_bucket" in exposed and "orchard_learner_step_seconds" not in exposed
    assert "orchard_rollout_tokens_total" in exposed and "le" in exposed["orchard_sample_staleness_bucket"]
    # Without the labelled series (no distribution yet), the per-distribution panels are reported.
    bare = served(RunMetrics())
    assert any("orchard_reward_mean is not exported" in problem for problem in missing_from_exposition(bare))


@pytest.fixture
def provisioning() -> tuple[dict, dict]:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "orchard.yaml").read_text())
    return datasources, providers


def test_provisioned_datasource_is_the_dashboards_default(provisioning):
    datasources, _ = provisioning
    assert datasources["apiVersion"] == 1
    (source,) = [s for s in datasources["datasources"] if s["type"] == "prometheus"]
    assert source["isDefault"] is True
    for path in dashboard_files():
        variable = next(v for v in json.loads(path.read_text())["templating"]["list"] if v["name"] == "datasource")
        assert variable["current"]["value"] == source["uid"], path.name
        assert variable["current"]["text"] == source["name"], path.name


def test_provisioned_dashboard_provider_reads_the_folder_the_instructions_mount(provisioning):
    _, providers = provisioning
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    # deploy/dashboards.sh tells users to mount deploy/grafana/dashboards (and the provisioning) there.
    instructions = (DEPLOY / "dashboards.sh").read_text()
    assert f"deploy/grafana/dashboards:{path}" in instructions
    assert "deploy/grafana/provisioning:/etc/grafana/provisioning" in instructions


def test_prometheus_config_scrapes_the_default_control_plane():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "orchard"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8470"]
    from orchard.config import ControlConfig

    assert ControlConfig().port == 8470
    # The datasource's timeInterval is the scrape interval, so $__rate_interval covers >= 4 scrapes.
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert datasources["datasources"][0]["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
