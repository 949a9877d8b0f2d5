import pytest

from studio.config import (ConfigError, RunConfig, config_from_dict, field_help, load_config, load_preset,
                           preset_names, save_config)

SEED_YAML = """\
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors"
lora_rank: 8
task_type: "image-generation"      # or "text-generation"
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/my_style_lora"
save_steps: 100
resolution: 512
"""


@pytest.fixture
def seed_tree(tmp_path, monkeypatch):
    """The folder layout the lora-scripts seed YAML refers to, with cwd at its root."""
    (tmp_path / "data/style_train").mkdir(parents=True)
    (tmp_path / "data/style_train/metadata.csv").write_text("filename,prompt\n")
    (tmp_path / "models/Stable-diffusion").mkdir(parents=True)
    (tmp_path / "models/Stable-diffusion/v1-5-pruned.safetensors").write_bytes(b"")
    (tmp_path / "my.yaml").write_text(SEED_YAML)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_seed_yaml_loads_unchanged(seed_tree):
    cfg = load_config(seed_tree / "my.yaml")
    assert cfg.learning_rate == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string
    assert isinstance(cfg.learning_rate, float)
    assert cfg.lora_rank == 8 and cfg.batch_size == 4 and cfg.epochs == 10 and cfg.resolution == 512
    assert cfg.task_type == "image-generation"
    # Paths are resolved, so the saved copy reproduces the run from any folder.
    assert cfg.train_data_dir == str(seed_tree / "data/style_train")
    assert cfg.output_dir == str(seed_tree / "output/my_style_lora")
    assert cfg.name == "my_style_lora"


def test_saved_config_round_trips(seed_tree, tmp_path_factory, monkeypatch):
    cfg = load_config(seed_tree / "my.yaml")
    saved = save_config(cfg, seed_tree / "out/config.yaml")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert load_config(saved) == cfg


def test_unknown_key_suggests_closest(seed_tree):
    with pytest.raises(ConfigError) as err:
        load_config(seed_tree / "my.yaml", {"lora_rnak": 4})
    assert "Unknown key 'lora_rnak'" in str(err.value)
    assert "Did you mean 'lora_rank'?" in str(err.value)


@pytest.mark.parametrize("key,value,expected", [
    ("lora_rank", "eight", "'lora_rank' is 'eight', expected a whole number"),
    ("lora_rank", 0, "'lora_rank' is 0; it must be at least 1"),
    ("mixed_precision", "fp8", "Allowed values: auto, no, fp16, bf16"),
    ("task_type", "video", "Allowed values: image-generation, text-generation"),
    ("gradient_checkpointing", "maybe", "expected true or false"),
    ("caption_dropout", 1.5, "must be at most 1.0"),
    ("learning_rate", "fast", "'learning_rate' is 'fast', expected a number"),
])
def test_bad_value_names_key_value_and_allowed(seed_tree, key, value, expected):
    with pytest.raises(ConfigError) as err:
        load_config(seed_tree / "my.yaml", {key: value})
    assert expected in str(err.value)


def test_all_problems_reported_at_once(seed_tree):
    with pytest.raises(ConfigError) as err:
        load_config(seed_tree / "my.yaml", {"lora_rank": -1, "optimiser": "adamw", "mixed_precision": "fp8"})
    message = str(err.value)
    assert "lora_rank" in message and "optimiser" in message and "'optimizer'" in message and "fp8" in message


def test_wrong_values_missing_paths_and_an_unknown_preset_in_one_round(seed_tree):
    """One round of fixes is enough: nothing hides behind the first kind of problem."""
    with pytest.raises(ConfigError) as err:
        load_config(seed_tree / "my.yaml", {"preset": "nope", "lora_rank": -1, "train_data_dir": "./data/nope"})
    problems = str(err.value).splitlines()[1:]
    assert len(problems) == 3, problems
    assert "Unknown preset 'nope'" in problems[0] and "'lora_rank' is -1" in problems[1]
    assert "does not exist" in problems[2]
    with pytest.raises(ConfigError) as err:  # a wrong value is named once, not again as 'empty'
        load_config(seed_tree / "my.yaml", {"base_model": {"a": 1}})
    assert str(err.value).count("base_model") == 1, err.value


def test_a_dataset_of_the_other_task_is_refused_before_training(seed_tree):
    from PIL import Image

    images, chats = seed_tree / "images", seed_tree / "chats"
    images.mkdir(), chats.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    (images / "a.txt").write_text("a caption")
    (chats / "talk.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(ConfigError, match="holds 1 image.*Pick a text dataset"):
        load_config(seed_tree / "my.yaml", {"task_type": "text-generation", "base_model": "org/llm",
                                            "train_data_dir": str(images), "metadata_path": None})
    with pytest.raises(ConfigError, match="holds text data and no images.*Pick an image dataset"):
        load_config(seed_tree / "my.yaml", {"train_data_dir": str(chats), "metadata_path": None})
    assert load_config(seed_tree / "my.yaml", {"train_data_dir": str(images), "metadata_path": None}).is_image


def test_a_family_the_model_files_contradict_is_refused(tmp_path):
    """The demo-flux preset (model_family: flux1) over an SD1.5 folder: a message, not a KeyError deep in the plan."""
    from studio.errors import StudioError
    from studio.families import resolve_family

    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    cfg = config_from_dict({"preset": "demo-flux", "base_model": str(tmp_path), "train_data_dir": "d",
                            "output_dir": "o"}, check_paths=False)
    with pytest.raises(StudioError, match=r"is of the SD1\.5 family, but model_family is flux1.*Pick a Flux\.1"):
        resolve_family(cfg)


def test_missing_paths_are_named(seed_tree):
    with pytest.raises(ConfigError) as err:
        load_config(seed_tree / "my.yaml", {"train_data_dir": "./data/nope", "init_lora": "missing.safetensors"})
    message = str(err.value)
    assert str(seed_tree / "data/nope") in message and "does not exist" in message
    assert str(seed_tree / "missing.safetensors") in message


def test_hub_id_is_not_checked_as_path(seed_tree):
    cfg = load_config(seed_tree / "my.yaml", {"base_model": "runwayml/stable-diffusion-v1-5"})
    assert cfg.base_model == "runwayml/stable-diffusion-v1-5"


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("lora_rank: [8\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_presets_are_valid_partial_configs(tmp_path):
    assert {"style", "character", "llm-chat", "demo-image", "demo-llm"} <= set(preset_names())
    for name in preset_names():
        cfg = config_from_dict({"preset": name, "base_model": "x", "train_data_dir": "d", "output_dir": "o"},
                               check_paths=False)
        for key, value in load_preset(name).items():
            got = getattr(cfg, key)
            assert got == (pytest.approx(float(value)) if isinstance(got, float) else value), (name, key)


def test_user_values_override_preset():
    cfg = config_from_dict({"preset": "character", "lora_rank": 4, "base_model": "x", "train_data_dir": "d",
                            "output_dir": "o"}, check_paths=False)
    assert cfg.lora_rank == 4 and cfg.repeats == 5 and cfg.trigger_word == "sks_character"


def test_unknown_preset():
    with pytest.raises(ConfigError, match="Unknown preset 'anime'. Available presets:"):
        config_from_dict({"preset": "anime"}, check_paths=False)


def test_help_lists_choices():
    assert "One of: auto, no, fp16, bf16." in field_help("mixed_precision")
    assert all(field_help(name) for name in RunConfig.__dataclass_fields__)


def test_empty_required_fields(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, check_paths=False)
    assert "'base_model' is empty" in str(err.value) and "'output_dir' is empty" in str(err.value)


def test_train_data_dir_may_be_a_file_for_text_only(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("{}\n")
    common = {"base_model": "org/model", "train_data_dir": str(data), "output_dir": str(tmp_path / "o")}
    assert config_from_dict({**common, "task_type": "text-generation"}).train_data_dir == str(data)
    with pytest.raises(ConfigError, match="for image training it must be the folder"):
        config_from_dict({**common, "task_type": "image-generation"})
