"""`jaxground data shapes` and `jaxground data inspect` from the command line: what they write and print, and the
one-line refusals (exit 2) for bad counts and paths."""

import json

import pytest

from jaxground import cli
from jaxground.data.records import RecordSource


def test_shapes_then_inspect(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert cli.main(["data", "shapes", "--out", str(out), "--train", "3", "--val", "1", "--test", "2"]) == 0
    assert f"wrote {{'train': 3, 'val': 1, 'test': 2}} to {out}" in capsys.readouterr().out
    assert cli.main(["data", "inspect", str(out / "test.array_record"), "-n", "1"]) == 0
    head, record = capsys.readouterr().out.splitlines()
    assert head == f"{out / 'test.array_record'}: 2 records"
    record = json.loads(record)
    assert record["size"] == [64, 64] and len(record["boxes"]) == len(record["names"]) >= 1


def test_refusals_name_the_problem(tmp_path, capsys):
    for args, message in (
        (["shapes", "--out", str(tmp_path / "a"), "--train", "-1", "--min-objects", "3", "--max-objects", "2"],
         ("jaxground data shapes: --train must be >= 0, got -1; need 1 <= --min-objects <= --max-objects <= 12, "
          "got 3 and 2")),
        (["shapes", "--out", str(tmp_path / "a"), "--workers", "-1"], "need --image-size >= 16 and --workers >= 0"),
        (["shapes", "--out", str(tmp_path / "file" / "a"), "--train", "1", "--val", "1", "--test", "1"],
         f"jaxground data shapes: --out: {tmp_path / 'file'} is a file, not a folder"),
        (["inspect", str(tmp_path / "none.array_record")], "jaxground data inspect: record files not found: "),
    ):
        (tmp_path / "file").write_text("")
        assert cli.main(["data", *args]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err and not captured.out, args
    assert not (tmp_path / "a").exists()


def test_shapes_keeps_a_data_set_unless_overwrite(tmp_path, capsys):
    """A second `data shapes` into the same folder is refused (it replaced the data set silently until
    2026-12-05); --overwrite replaces it."""
    args = ["data", "shapes", "--out", str(tmp_path), "--train", "2", "--val", "1", "--test", "1"]
    assert cli.main(args) == 0
    before = (tmp_path / "train.array_record").read_bytes()
    capsys.readouterr()
    assert cli.main([*args[:-1], "2", "--seed", "1"]) == 2
    assert capsys.readouterr().err == (f"jaxground data shapes: --out {tmp_path} already holds a data set "
                                       "(test.array_record, tokenizer, train.array_record, val.array_record); pass "
                                       "--overwrite to replace it\n")
    assert (tmp_path / "train.array_record").read_bytes() == before
    assert cli.main([*args, "--seed", "1", "--overwrite"]) == 0
    assert (tmp_path / "train.array_record").read_bytes() != before


def test_inspect_refuses_what_is_not_a_whole_record_file(tmp_path, capsys):
    """A folder, a file of another format and a record file cut short (an interrupted write or copy) are refused
    naming the file. ArrayRecord reads the last two as 0 records: until 2026-12-05 `inspect` printed "0 records"
    and training refused with "no samples in shapes", naming no file."""
    out = tmp_path / "shapes"
    assert cli.main(["data", "shapes", "--out", str(out), "--train", "3", "--val", "1", "--test", "2"]) == 0
    whole = (out / "train.array_record").read_bytes()
    (tmp_path / "cut.array_record").write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    unreadable = "not readable as ArrayRecord files (another format, or cut short): "
    for path, message in (
        (out / "tokenizer", f"folders, not record files: {out / 'tokenizer'}"),
        (out / "train.array_record.objects.npy", f"{unreadable}{out / 'train.array_record.objects.npy'}"),
        (tmp_path / "cut.array_record", f"{unreadable}{tmp_path / 'cut.array_record'}"),
    ):
        assert cli.main(["data", "inspect", str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"jaxground data inspect: {message}\n" and not captured.out, path
        # a ValueError, which `train` and `eval` report as a bad config (a folder raised IsADirectoryError, a traceback)
        with pytest.raises(ValueError, match="not record files|not readable"):
            RecordSource(path)
