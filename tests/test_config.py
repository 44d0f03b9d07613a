import hashlib
import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_overrides_reach_nested_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 5\n")
    cfg = load_config(path, ["train.epochs=2", "model.branches=4", "select.branch=1", "export.precisions=[fp32,int8]"])
    assert (cfg.train.epochs, cfg.model.branches, cfg.select.branch) == (2, 4, 1)
    assert cfg.export.precisions == ["fp32", "int8"]


BAD = [  # (yaml text, overrides, fragments the one-line message must contain)
    ("train: {epochs: 0}", [], ["train.epochs", "greater than or equal to 1", "got 0"]),
    ("train: {batch_size: -8}", [], ["train.batch_size", "got -8"]),
    ("model: {branches: 1}", [], ["model.branches", "got 1"]),
    ("train: {epoch: 3}", [], ["unknown key 'train.epoch'", "did you mean 'epochs'"]),
    ("trian: {epochs: 3}", [], ["unknown key 'trian'", "did you mean 'train'"]),
    ("train: {epochs: three}", [], ["train.epochs", "integer", "three"]),
    ("data: {dataset: mnist}", [], ["data.dataset", "fashion-mnist", "cifar10", "mnist"]),
    ("model: {arch: resnet99}", [], ["model.arch", "resnet20", "resnet99"]),
    ("train: {milestones: [20, 10]}", [], ["train.milestones", "increase"]),
    ("select: {branch: -1}", [], ["select.branch", "-1"]),
    ("engine: {precision: int8}", [], ["engine.precision int8 is not among export.precisions"]),
    ("name: ../escape", [], ["name", "pattern"]),
    ("train: [1, 2]", [], ["train", "valid dictionary"]),
    ("- just\n- a list", [], ["must be a mapping"]),
    ("train:\n  epochs: 2\n bad", [], ["YAML syntax error at line", "fix the file's syntax"]),
    ("{}", ["train.epochs"], ["expected FIELD=VALUE"]),
    ("{}", ["train.epochs=0"], ["train.epochs", "got 0"]),
    # non-finite numbers pass every bound and used to end epochs later as a nan loss (exit 1)
    ("train: {lr: .inf}", [], ["train.lr", "finite", "inf"]),
    ("loss: {temperature: .inf}", [], ["loss.temperature", "finite"]),
    ("loss: {kd_weight: .nan}", [], ["loss.kd_weight", "finite"]),
    ("export: {atol: .inf}", [], ["export.atol", "finite"]),
    ("{}", ["train.momentum=-.inf"], ["train.momentum", "finite"]),
    ("seed: 99999999999999999999999", [], ["seed", "less than or equal to 2147483647"]),
    ("seed: -1", [], ["seed", "greater than or equal to 0"]),
    # micro-batches of one image crash the gate's BatchNorm1d mid-epoch
    ("train: {batch_size: 8, accumulate: 8}", [], ["train", "micro-batches of one image", "batch_size >= 16"]),
    ("train: {batch_size: 1}", [], ["train", "micro-batches of one image"]),
    # int8_min_agreement moved from export to engine; a field whose name starts with "int" was once taken for
    # pydantic's "int" union tag and dropped from the path ("unknown key 'export'; did you mean 'export'?")
    ("export: {int8_min_agreement: 0.9}", [], ["unknown key 'export.int8_min_agreement'",
                                               "it lives at 'engine.int8_min_agreement' now"]),
    ("engine: {int8_min_agreement: 2}", [], ["engine.int8_min_agreement:", "less than or equal to 1", "got 2"]),
    ("export: {precision: fp16}", [], ["unknown key 'export.precision'", "did you mean 'precisions' or "
                                                                         "'engine.precision'?"]),
    ("select: {enabled: false}", [], ["unknown key 'select.enabled'", "'engine.enabled', 'triton.enabled'"]),
    ("nesterov: true", [], ["unknown key 'nesterov'", "it lives at 'train.nesterov' now"]),
    ("epochs: 3", [], ["unknown key 'epochs'", "fields of that name: 'train.epochs', 'compress.epochs'"]),
    ("data: {label_noise: 1.0}", [], ["data.label_noise", "less than 1", "got 1.0"]),
    ("{}", ["data.label_noise=-0.1"], ["data.label_noise", "greater than or equal to 0", "got -0.1"]),
    ("data: {dataset: imagefolder, label_noise: 0.2}", [], ["data", "label_noise is not supported for imagefolder"]),
    ("train: {eval_every: 0}", [], ["train.eval_every", "greater than or equal to 1"]),
]

SECTIONS = [name for name in Config.model_fields if isinstance(getattr(Config(), name), BaseModel)]


def _moved_field(section: str) -> tuple[str, str]:
    """A field of exactly one other section (its path there), absent from `section`."""
    fields = {s: set(type(getattr(Config(), s)).model_fields) for s in SECTIONS}
    for other in SECTIONS:
        for name in sorted(fields[other] - fields[section]):
            if sum(name in f for f in fields.values()) == 1:
                return name, f"{other}.{name}"
    raise AssertionError(section)


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_and_moved_fields_of_every_section_are_named(tmp_path, section):
    path = tmp_path / "c.yaml"
    allowed = ", ".join(type(getattr(Config(), section)).model_fields)
    name, lives_at = _moved_field(section)
    for key, hint in (("no_such_field", ""), ("int_like_field", ""), (name, f"it lives at '{lives_at}' now")):
        path.write_text(yaml.safe_dump({section: {key: 1}}))
        with pytest.raises(ConfigError) as err:
            load_config(path)
        message = str(err.value)
        assert f"unknown key '{section}.{key}';" in message and hint in message and message.endswith(allowed), message


def test_a_manifest_passed_as_config_says_to_pass_the_run_directory(tmp_path):
    manifest = tmp_path / "edge" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"stages": {"train": {"status": "done"}}}))
    with pytest.raises(ConfigError, match=r"is a run's manifest, not a config; pass the run directory instead "
                                          rf"\(one-pipeline status {tmp_path / 'edge'}\)"):
        load_config(manifest)


@pytest.mark.parametrize("text,overrides,fragments", BAD, ids=[b[2][0] for b in BAD])
def test_bad_configs_give_one_line_with_field_and_fix(tmp_path, text, overrides, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, message


def test_missing_and_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory


def test_section_hash_tracks_only_its_sections():
    base = Config()
    changed = Config.model_validate({"export": {"opset": 19}})
    assert base.section_hash("train", "model") == changed.section_hash("train", "model")
    assert base.section_hash("export") != changed.section_hash("export")


def test_fields_left_unset_stay_out_of_the_fingerprint():
    """A run trained before an optional field existed stays up to date while the field is left unset."""
    base = Config()
    data = {k: v for k, v in base.model_dump(mode="json")["data"].items() if v is not None}
    assert "train_size" not in data and "root" not in data
    digest = hashlib.sha256(json.dumps({"data": data}, sort_keys=True).encode()).hexdigest()[:16]
    assert base.section_hash("data") == digest
    assert Config.model_validate({"data": {"train_size": 100}}).section_hash("data") != digest


def test_resolved_yaml_round_trips():
    cfg = Config.model_validate({"train": {"epochs": 7}})
    assert Config.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


def test_docs_config_documents_every_config_field_and_is_current():
    from pipeline.config_reference import REFERENCE_PATH, reference_markdown

    text = REFERENCE_PATH.read_text()
    for name, field in Config.model_fields.items():
        sections = getattr(field.annotation, "model_fields", None)
        for path in ([f"{name}.{sub}" for sub in sections] if sections else [name]):
            assert f"| `{path}` |" in text, f"docs/CONFIG.md lacks {path}"
    assert text == reference_markdown(), "docs/CONFIG.md is stale: run `one-pipeline config-reference --write`"


def test_the_readmes_config_keys_exist_in_the_schema():
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    keys = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", readme, flags=re.M))
    assert keys, "the README's table of the config keys people change is missing"
    for key in keys:
        section, name = key.split(".")
        assert name in Config.model_fields[section].annotation.model_fields, f"README names {key}, not in the schema"


def test_output_root_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("output_root: ~/runs\n")
    assert load_config(path).run_dir == tmp_path / "runs" / "edge"
