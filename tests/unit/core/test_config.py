"""Config: inheritance, overrides, type errors, unknown keys, every shipped config loads."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.core.config import CONFIG_DIR, ConfigError, load_config, save_config


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    config = load_config(CONFIG_DIR / name)
    assert config.folds.n_splits >= 2


def test_default_is_the_reference_recipe():
    c = load_config()
    assert (c.model.architecture, c.model.backbone) == ("Unet", "efficientnetb2")
    assert c.data.image_size == [384, 576] and c.train.crop_size == [352, 544]
    assert c.data.submission_size == [350, 525]
    assert (c.train.lr, c.train.batch_size, c.train.accumulation_steps) == (1e-3, 16, 8)
    assert c.train.loss == "jaccard" and c.train.monitor == "val_dice"
    assert (c.train.reduce_lr_factor, c.train.reduce_lr_patience) == (0.5, 2)
    assert c.train.early_stopping_patience == 5
    assert (c.folds.n_splits, c.folds.method, c.seed) == (3, "kfold", 12345)


def test_base_inheritance_chain(tmp_path):
    write(tmp_path / "a.yaml", {"base": str(CONFIG_DIR / "default.yaml"), "train": {"lr": 0.01}})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "train": {"epochs": 3}})
    c = load_config(tmp_path / "b.yaml")
    assert c.train.lr == 0.01 and c.train.epochs == 3
    assert c.train.batch_size == 16  # untouched keys come from the default


def test_inheritance_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_overrides_are_parsed_and_typed():
    c = load_config(overrides=["train.lr=3e-4", "train.epochs=2", "data.submission_size=null"])
    assert c.train.lr == pytest.approx(3e-4) and isinstance(c.train.lr, float)
    assert c.train.epochs == 2 and c.data.submission_size is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", r"unknown config key 'train.lrr'; valid keys here: .*lr"),
        ("trian.lr=1", r"unknown config key 'trian'"),
        ("train.lr=fast", r"'train.lr' must be a number > 0 or auto; got 'fast'"),
        ("train.epochs=1.5", r"'train.epochs' must be an integer >= 1; got 1.5"),
        ("train.batch_size=0", r"config key 'train.batch_size' must be an integer >= 1; got 0"),
        ("train.batch_size=true", r"'train.batch_size' must be an integer >= 1; got True"),
        ("train.epochs='5'", r"'train.epochs' must be an integer >= 1; got '5'"),
        ("experiment=5", r"'experiment' must be a string; got 5"),
        ("train.lr=-1", r"'train.lr' must be a number > 0 or auto; got -1"),
        ("train.tensorboard=1", r"must be true or false"),
        ("train.loss=mse", r"must be one of \['jaccard'"),
        ("data.image_size=[384]", r"\[H, W\] positive integers"),
        (
            "train.batch_size=null",
            r"'train.batch_size' may not be null; it must be an integer >= 1",
        ),
        ("train.lr", r"key.path=value"),
        ("train.weight_decay=.nan", r"'train.weight_decay' must be a finite number >= 0; got nan"),
        ("train.encoder_lr_factor=.inf", r"'train.encoder_lr_factor' must be a finite number"),
        ("train.encoder_lr_factor=0", r"'train.encoder_lr_factor' must be a number > 0"),
        ("train.ema_decay=1", r"'train.ema_decay' must be null or a number > 0 and < 1; got 1"),
        ("train.ema_decay=0", r"'train.ema_decay' must be null or a number > 0"),
        ("postprocess.gates=[[none]]", r"'postprocess.gates' must be a non-empty list of"),
        ("postprocess.gates=[]", r"'postprocess.gates' must be a non-empty list of"),
        ("postprocess.gates=[none,fuzed]", r"'postprocess.gates' must be a non-empty list of"),
        # YAML reads yes as true: still named as a choice, not as a type.
        (
            "postprocess.at_least_one=yes",
            r"must be one of \['never', 'always', 'auto', 'search'\]; got True",
        ),
        ("train.swa_top=-1", r"'train.swa_top' must be an integer >= 0; got -1"),
        ("train.reduce_lr_factor=1", r"'train.reduce_lr_factor' must be a number > 0 and < 1"),
        ("classifier.epochs=0", r"'classifier.epochs' must be an integer >= 1; got 0"),
        (
            "data.classes=[a, true]",
            r"'data.classes' must be null or a list of class names \(strings or integers\); "
            r"got \['a', True\]",
        ),
        ("train=3", r"config key 'train' must be a mapping \(a section\); got 3"),
        (
            "train.mixed_precision=float16",
            r"'train.mixed_precision' must be true, false or bfloat16; got 'float16'",
        ),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    path = write(tmp_path / "x.yaml", {"train": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"'train.learning_rate'.*valid keys under 'train'"):
        load_config(path)


def test_unknown_top_level_key_in_file(tmp_path):
    path = write(tmp_path / "x.yaml", {"trian": {"lr": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; valid keys at top level: "):
        load_config(path)


def test_a_renamed_key_is_refused_with_its_new_name(tmp_path):
    path = write(tmp_path / "x.yaml", {"data": {"layout": "instances"}})
    with pytest.raises(ConfigError, match=r"'data.layout' is now 'data.csv_format'.* in .*x.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'data.layout' is now 'data.csv_format'"):
        load_config(overrides=["data.layout=instances"])
    assert load_config(overrides=["data.csv_format=instances"]).data.csv_format == "instances"


def test_bad_augment_entry(tmp_path):
    path = write(tmp_path / "x.yaml", {"augment": [{"transform": "HorizontalFlip"}]})
    with pytest.raises(ConfigError, match=r"'augment\[0\]' must be \{name: a string, params"):
        load_config(path)


def test_augment_params_default_to_none_given():
    c = load_config(overrides=["augment=[{name: HorizontalFlip}, {name: Blur, params: null}]"])
    assert c.augment == [
        {"name": "HorizontalFlip", "params": {}},
        {"name": "Blur", "params": {}},
    ]


def test_several_wrong_keys_are_all_named(tmp_path):
    path = write(tmp_path / "x.yaml", {"train": {"epochs": 0, "lr": "fast"}, "seed": -1})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith("config key 'seed' must be an integer >= 0; got -1")
    assert "also wrong: 'train.epochs', 'train.lr'" in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_the_config_is_typed_and_frozen():
    c = load_config()
    with pytest.raises(AttributeError, match="lrr"):
        _ = c.train.lrr  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="frozen"):
        c.train.lr = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        _ = c["train"]  # type: ignore[index]


def test_save_and_reload_round_trip(tmp_path):
    c = load_config(CONFIG_DIR / "demo.yaml", ["train.epochs=4"])
    path = save_config(c, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again.to_dict() == c.to_dict()


def test_integer_class_names_are_names():
    assert load_config(overrides=["data.classes=[4, 3, '2', 1]"]).data.classes == [
        "4",
        "3",
        "2",
        "1",
    ]


def test_lr_may_be_auto_but_no_other_word():
    assert load_config(overrides=["train.lr=auto"]).train.lr == "auto"
    with pytest.raises(ConfigError, match="'train.lr' must be a number > 0 or auto"):
        load_config(overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match="'classifier.lr' must be a number > 0; got 'auto'"):
        load_config(overrides=["classifier.lr=auto"])


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("[{epoch: 2, fraction: 1.5}]", r"\[0\].fraction' must be a number > 0 and <= 1; got 1.5"),
        ("[{epoch: -1, fraction: 0.5}]", r"\[0\].epoch' must be an integer >= 0; got -1"),
        ("[{epoch: 2, fraction: 0.5}, {epoch: 2, fraction: 1.0}]", r"epoch must increase"),
        ("[{epoch: 2, blocks: 3}]", r"unfreeze_schedule\[0\]' must be \{epoch: an integer"),
        ("[{epoch: 2, fraction: 0.5, lr: 0}]", r"\[0\].lr' must be null or a number > 0; got 0"),
    ],
)
def test_unfreeze_schedule_is_validated(schedule, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[f"model.unfreeze_schedule={schedule}"])


def test_unfreeze_schedule_is_normalised():
    c = load_config(overrides=["model.unfreeze_schedule=[{epoch: 1, fraction: 1, lr: 1e-4}]"])
    assert c.model.unfreeze_schedule == [{"epoch": 1, "fraction": 1.0, "lr": 1e-4}]


def test_decoder_filters_are_null_or_five_positive_integers():
    assert load_config().model.decoder_filters is None
    c = load_config(overrides=["model.decoder_filters=[128, 64, 32, 16, 8]"])
    assert c.model.decoder_filters == [128, 64, 32, 16, 8]
    for bad in ("[128, 64, 32, 16]", "[128, 64, 32, 16, 0]", "[128, 64, 32, 16, 8.5]", "wide"):
        with pytest.raises(
            ConfigError, match="'model.decoder_filters' must be null or 5 positive integers; got "
        ):
            load_config(overrides=[f"model.decoder_filters={bad}"])


def test_classifier_pooling_is_a_choice():
    assert load_config(overrides=["classifier.pooling=avgmax"]).classifier.pooling == "avgmax"
    with pytest.raises(ConfigError, match=r"'classifier.pooling' must be one of \['avg', 'max'"):
        load_config(overrides=["classifier.pooling=sum"])


@pytest.mark.parametrize("value", [True, False, "bfloat16"])
def test_mixed_precision_takes_a_boolean_or_bfloat16(value):
    text = {True: "true", False: "false"}.get(value, value)
    assert load_config(overrides=[f"train.mixed_precision={text}"]).train.mixed_precision == value
