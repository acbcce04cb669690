"""`retrieval datasets`: the table of supported datasets and the layout check of a folder."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from retrieval.cli import datasets as datasets_cli
from retrieval.cli import handle_errors
from tests.fakes import make_fake_inshop

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    datasets_cli.register(app)

    @app.command("noop", hidden=True)
    def _noop() -> None:  # a second command keeps typer from collapsing the app into one command
        pass

    return handle_errors(app)


def test_lists_all_datasets_with_layouts():
    result = runner.invoke(_app(), ["datasets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("cub", "cars", "sop", "inshop", "folder", "demo"):
        assert name in result.output
    assert "cars_annos.mat" in result.output and "Ebay_train.txt" in result.output
    assert "1, 10, 100, 1000" in result.output and "query-gallery" in result.output


def test_checks_a_folder(tmp_path):
    make_fake_inshop(tmp_path, train_items=2, test_items=3, per_item=2)
    result = runner.invoke(_app(), ["datasets", "inshop", "--root", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "query" in result.output and "gallery" in result.output and "all listed image files exist" in result.output


def test_reports_layout_problem(tmp_path):
    result = runner.invoke(_app(), ["datasets", "sop", "--root", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "Ebay_train.txt" in result.output and "Expected layout" in result.output


def test_unknown_name():
    result = runner.invoke(_app(), ["datasets", "imagenet"])
    assert result.exit_code == 2 and "unknown dataset" in result.output
