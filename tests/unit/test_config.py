import pytest
import yaml

from orchard.config import DEMO_CONFIG, ConfigError, RunConfig, apply_overrides, config_from_dict, load_config
from orchard.services.cli import main


def problems_of(data):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return dict(caught.value.problems)


def test_demo_config_loads_and_round_trips():
    config = load_config()
    assert config.name == "demo"
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config.model_dump(mode="json"))))
    assert again == config


def test_unknown_keys_are_named_by_dotted_path():
    problems = problems_of({"learner": {"bogus": 1}, "rollout": {"temprature": 1.0}})
    assert set(problems) == {"learner.bogus", "rollout.temprature"}
    assert all("Extra inputs" in message for message in problems.values())


def test_wrong_types_are_named_by_dotted_path():
    problems = problems_of({"learner": {"lr": "fast", "zero_stage": 5}, "max_steps": -1})
    assert set(problems) == {"learner.lr", "learner.zero_stage", "max_steps"}


def test_errors_inside_sources_keep_the_list_index():
    problems = problems_of({"data": {"sources": [{"kind": "procedural"}, {"kind": "procedural", "familes": []}]}})
    assert list(problems) == ["data.sources.1.familes"]
    problems = problems_of({"data": {"sources": [{"kind": "csv"}]}})
    assert list(problems) == ["data.sources.0"]
    assert "'csv'" in problems["data.sources.0"]


def test_cross_field_rules():
    problems = problems_of({"model": {"tiny": {"hidden_size": 130, "num_heads": 4}}})
    assert "divisible" in problems["model.tiny"]
    problems = problems_of({"model": {"kind": "hf"}})
    assert "model.path" in problems["model"]
    problems = problems_of({"rollout": {"engine": "vllm"}, "curriculum": {"pcl": {"features": "policy"}}})
    assert "vLLM exposes no hidden states" in problems["<root>"] and "curriculum.pcl.features" in problems["<root>"]


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides({"learner": {"lr": 1.0}}, ["learner.lr=3.0e-4", "rollout.stop=['x']", "name=abc"])
    assert data == {"learner": {"lr": 3e-4}, "rollout": {"stop": ["x"]}, "name": "abc"}
    config = load_config(DEMO_CONFIG, ["learner.zero_stage=3", "buffer.max_staleness=0", "learner.lr=3e-4"])
    assert config.learner.zero_stage == 3 and config.buffer.max_staleness == 0 and config.learner.lr == 3e-4


@pytest.mark.parametrize("override", ["novalue", "=3", "a..b=1", "learner.lr=[unclosed"])
def test_malformed_overrides_are_refused(override):
    with pytest.raises(ConfigError):
        load_config(DEMO_CONFIG, [override])


def test_override_into_a_scalar_is_refused():
    with pytest.raises(ConfigError) as caught:
        load_config(DEMO_CONFIG, ["max_steps.inner=1"])
    assert caught.value.problems[0][0] == "max_steps.inner"


def test_unsafe_run_name_is_refused():
    assert "name" in problems_of({"name": "../etc"})


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_cli_check_exits_2_and_names_each_bad_field(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("learner: {lr: fast, bogus: 1}\nrollout: {group_size: 0}\n")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    for field in ("learner.lr", "learner.bogus", "rollout.group_size"):
        assert field in err


def test_cli_check_prints_the_resolved_config(capsys):
    assert main(["check", str(DEMO_CONFIG), "--set", "learner.lr=0.5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["learner"]["lr"] == 0.5
    assert RunConfig.model_validate(resolved).learner.lr == 0.5


def test_learner_algorithm_defaults_keep_plain_grpo():
    learner = RunConfig().learner
    assert learner.advantage == "grpo" and learner.advantage_std == "group"
    assert not (learner.overlong.enabled or learner.overlong.mask_truncated)
    assert not (learner.length_penalty.enabled or learner.lp_reg.enabled or learner.hpt.enabled)
    assert learner.kl_coef == 0.0
    assert learner.hints.clip_low is None and learner.hints.clip_high is None


@pytest.mark.parametrize(
    ("learner", "path", "words"),
    [
        ({"advantage": "dr_grpo"}, "learner.aggregation", "seq-mean-token-sum-norm"),
        ({"length_penalty": {"enabled": True}}, "learner.advantage", "lite_ppo"),
        ({"overlong": {"enabled": True, "max_length": 8, "cache_length": 8}}, "learner.overlong.cache_length", "L_max"),
        ({"lp_reg": {"min_p": 0}}, "learner.lp_reg.min_p", "greater than 0"),
        ({"hpt": {"pass_rate_threshold": 1.5}}, "learner.hpt.pass_rate_threshold", "less than or equal to 1"),
        ({"hints": {"clip_low": 1.0}}, "learner.hints.clip_low", "less than 1"),
        ({"advantage": "ppo"}, "learner.advantage", "'grpo'"),
        ({"advantage_std": "group"}, "learner.advantage_std", "Extra inputs"),
    ],
)
def test_algorithm_options_are_checked_by_dotted_path(learner, path, words):
    problems = problems_of({"learner": learner})
    assert list(problems) == [path]
    assert words in problems[path]


def test_overlong_defaults_follow_the_generation_limit():
    config = config_from_dict({"rollout": {"max_new_tokens": 20}, "learner": {"overlong": {"enabled": True}}})
    assert config.learner.overlong.resolved_lengths(config.rollout.max_new_tokens) == (20, 4)
    # a generation limit of 1 leaves no room for a soft zone
    problems = problems_of({"rollout": {"max_new_tokens": 1}, "learner": {"overlong": {"enabled": True}}})
    assert list(problems) == ["learner.overlong.cache_length"]


def test_valid_algorithm_combinations_load():
    config = config_from_dict(
        {"learner": {"advantage": "dr_grpo", "aggregation": "seq-mean-token-sum-norm", "kl_coef": 0.01}}
    )
    assert config.learner.advantage_std == "none"
    config = config_from_dict({"learner": {"advantage": "lite_ppo", "length_penalty": {"enabled": True}}})
    assert config.learner.advantage_std == "batch"


@pytest.mark.parametrize("recipe", sorted((DEMO_CONFIG.parent / "algorithms").glob("*.yaml")), ids=lambda p: p.stem)
def test_algorithm_recipes_pass_orchard_check(recipe, capsys):
    assert main(["check", str(recipe)]) == 0
    assert "learner:" in capsys.readouterr().out


def test_every_algorithm_has_a_recipe():
    recipes = {path.stem for path in (DEMO_CONFIG.parent / "algorithms").glob("*.yaml")}
    assert {
        *("dr_grpo", "lite_ppo", "rloo", "dapo", "dler", "lp_reg", "hpt_hints", "lora", "disco", "gain_rl"),
        *("gspo", "gspo_token", "reinforce_pp", "reinforce_pp_baseline"),
    } <= recipes


def test_fault_injection_is_refused_unless_the_environment_allows_it(monkeypatch):
    monkeypatch.delenv("ORCHARD_FAULT_INJECTION", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["faults.nonfinite_loss_at_steps=[3]"])
    assert caught.value.problems[0][0] == "faults"
    assert "refused unless ORCHARD_FAULT_INJECTION=1" in caught.value.problems[0][1]
    assert load_config(None, []).faults.nonfinite_loss_at_steps == []
    monkeypatch.setenv("ORCHARD_FAULT_INJECTION", "1")
    assert load_config(None, ["faults.nonfinite_loss_at_steps=[3]"]).faults.nonfinite_loss_at_steps == [3]


def test_gspo_refuses_the_options_it_cannot_apply():
    with pytest.raises(ConfigError) as caught:
        load_config(
            None,
            [
                "rollout.strategy=sample",  # the demo's tree search is refused with gspo on its own (below)
                "learner.objective=gspo",
                "learner.aggregation=token-mean",
                "learner.lp_reg.enabled=true",
            ],
        )
    problems = dict(caught.value.problems)
    assert "set aggregation to 'seq-mean-token-mean'" in problems["learner.aggregation"]
    assert "acts on token ratios" in problems["learner.lp_reg.enabled"]
    with pytest.raises(ConfigError, match="use objective 'gspo_token', or tree_advantage 'outcome'"):
        load_config(
            None, ["learner.objective=gspo", "learner.aggregation=seq-mean-token-mean", "rollout.strategy=mcts"]
        )
    token = load_config(
        None, ["learner.objective=gspo_token", "learner.aggregation=seq-mean-token-mean", "rollout.strategy=mcts"]
    )
    assert token.learner.gspo.clip_low == 3e-4 and token.learner.gspo.clip_high == 4e-4
    assert load_config(None, ["learner.advantage=reinforce_pp"]).learner.advantage_std == "batch"
