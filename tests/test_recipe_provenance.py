"""Recipe provenance: `borrowed:` names where every non-published value comes from, and `recipes show` says it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from ucgm_convert.cli import app
from ucgm_convert.errors import UCGMError
from ucgm_convert.recipe import load_recipe, recipe_names

runner = CliRunner()
FORK_REPAE = "cccvs/UCGM@0b5e768 configs/tuning_few_steps/in1k256_sit_xl_repae_linear.yaml"


def _write(tmp_path: Path, borrowed: Any, drop: tuple[str, ...] = ()) -> str:
    data = yaml.safe_load(load_recipe("repa-e").to_yaml())
    del data["name"]
    for key in drop:
        del data[key]
    data["borrowed"] = borrowed
    path = tmp_path / "prov.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_repa_e_tuning_is_published_by_the_author_fork_objective_included() -> None:
    recipe = load_recipe("repa-e")
    assert recipe.borrowed == {}
    for path in ("tuning.enhanced", "tuning.enhanced_style", "tuning.huber_eps", "tuning.lr", "tuning.optimizer",
                 "tuning.steps", "tuning.global_batch", "tuning.ema_decay", "sampling.steps", "few_step_sampling.gaps",
                 "paper_tuned", "vae"):
        assert recipe.provenance(path) == "published", path
    assert FORK_REPAE in recipe.source
    assert "configs/training_few_steps/" not in recipe.source, "nothing is taken from the training file any more"


def test_a_borrowed_field_reads_borrowed_from_its_source(tmp_path: Path) -> None:
    training = "LINs-lab/UCGM configs/training_few_steps/in1k256_tit_xl_repae.yaml"
    recipe = load_recipe(_write(tmp_path, {"tuning.enhanced": training}))
    assert recipe.provenance("tuning.enhanced") == f"borrowed from {training}"
    assert recipe.provenance("tuning.enhanced_style") == "published"


def test_a_field_key_wins_over_its_section_key() -> None:
    recipe = load_recipe("edm2-s")
    assert recipe.provenance("tuning.lr") == ("borrowed from LINs-lab/UCGM "
                                              "configs/training_few_steps/in1k512_tit_xl_sdvae.yaml")
    assert recipe.provenance("tuning.steps").endswith("configs/tuning_few_steps/in1k256_sit_xl_sdvae_linear.yaml")
    assert recipe.provenance("sampling.steps") == "published"


@pytest.mark.parametrize("name", [n for n in recipe_names() if "not published" in load_recipe(n).description])
def test_a_recipe_without_published_tuning_borrows_every_tuning_value(name: str) -> None:
    recipe = load_recipe(name)
    fields = type(recipe.tuning).model_fields
    assert all(recipe.provenance(f"tuning.{field}").startswith("borrowed from ") for field in fields), name


@pytest.mark.parametrize(("borrowed", "detail"), [
    ({"tuning.lrr": "x"}, "borrowed.tuning.lrr: tuning has no field 'lrr' (did you mean 'tuning.lr'?); its fields: "
                          "optimizer, lr,"),
    ({"tunin": "x"}, "borrowed.tunin: not a recipe field or section (did you mean 'tuning'?); expected one of family,"),
    ({"name": "x"}, "borrowed.name: not a recipe field or section; expected one of"),
    ({"vae.type": "x"}, "borrowed.vae.type: not a recipe field or section"),
    ({"tuning.lr": ""}, "borrowed: expected a mapping of field paths (tuning.lr) or sections (tuning) to a non-empty"),
    (["tuning"], "borrowed: expected a mapping of field paths"),
])
def test_bad_borrowed_key_is_one_error_naming_file_and_key(tmp_path: Path, borrowed: Any, detail: str) -> None:
    file = _write(tmp_path, borrowed)
    with pytest.raises(UCGMError) as info:
        load_recipe(file)
    assert str(info.value).startswith(f"{file}: {detail}"), str(info.value)
    assert "\n" not in str(info.value)


def test_borrowing_from_an_absent_section_is_refused(tmp_path: Path) -> None:
    file = _write(tmp_path, {"tuning.steps": "x"}, drop=("tuning",))
    with pytest.raises(UCGMError, match=r"prov\.yaml: borrowed\.tuning\.steps: this recipe has no tuning section$"):
        load_recipe(file)


def test_cli_show_has_a_source_column(tmp_path: Path) -> None:
    result = runner.invoke(app, ["recipes", "show", "repa"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if len(line.split()) > 2}
    sampling_rows = [line for line in result.stdout.splitlines() if "extrapolation" in line]
    assert "borrowed from" in sampling_rows[0]  # the multi-step sampling section; few-step is published
    assert rows["enhanced_style"].split()[-2] == "published"
    assert rows["lr"].split()[-2] == "published"
    assert rows["global_batch"].split()[-2] == "published"
    assert "derived" in rows["guidance"]
    assert result.stderr == ""
